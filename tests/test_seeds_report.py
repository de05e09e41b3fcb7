"""The README seeds table's bar over baseline seeds (simulations/seeds_report.bar_seeds): the
median and range over `fedrec baselines --seed S` runs, and a refusal, naming the run, of any
seed run that is not the same baseline on the same split, fitted with its folder's seed, tuned
over the suite's grid and made with the same `implicit`."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fedrec.simulations.seeds_report import bar_seeds

SPLIT = {"digest": "abc"}
GRID = [{"params": {"factors": 32, "reg": 0.01}}, {"params": {"factors": 64, "reg": 0.01}}]


def suite() -> dict[str, Any]:
    return {"split": SPLIT, "baselines": {"als": {"seed": 0, "trace": GRID}}}


def seed_run(seed: int, ndcg: float) -> tuple[str, dict[str, Any], dict[str, Any]]:
    metrics = {
        "split": SPLIT,
        "baselines": {"als": {"seed": seed, "trace": GRID, "metrics": {"test": {"NDCG@10": ndcg}}}},
    }
    config = {"command": "baselines", "seed": seed, "versions": {"implicit": "0.7.2"}}
    return f"A-seed{seed}", metrics, config


def bar(runs: list[tuple[str, dict[str, Any], dict[str, Any]]], name: str = "als") -> str:
    return bar_seeds(runs, "A", name, suite(), "0.7.2", "test", "NDCG@10")


def test_the_median_and_range_over_the_seeds() -> None:
    runs = [seed_run(s, v) for s, v in enumerate([0.0763, 0.0707, 0.0734, 0.0720])]
    assert bar(runs) == " (seeds 0 to 3: median 0.0727, 0.0707 to 0.0763)"
    gap = [seed_run(0, 0.07), seed_run(2, 0.08)]
    assert bar(gap) == " (2 seeds: median 0.0750, 0.0700 to 0.0800)"


def test_fewer_than_two_seeds_or_an_unseeded_bar_give_nothing() -> None:
    assert bar([seed_run(0, 0.07)]) == ""
    assert bar([seed_run(0, 0.07), seed_run(1, 0.08)], name="popularity") == ""


def _broken(change: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    runs = [seed_run(0, 0.07), seed_run(1, 0.08)]
    folder, metrics, config = copy.deepcopy(runs[1])
    if change == "command":
        config["command"] = "suite"
    elif change == "split":
        metrics["split"] = {"digest": "other"}
    elif change == "config seed":
        config["seed"] = 2
    elif change == "fit seed":
        metrics["baselines"]["als"]["seed"] = 0
    elif change == "folder":
        folder = "A-seed7"
    elif change == "grid":
        metrics["baselines"]["als"]["trace"] = GRID[:1]
    elif change == "implicit":
        config["versions"]["implicit"] = "0.6.0"
    elif change == "metric":
        del metrics["baselines"]["als"]["metrics"]["test"]
    return [runs[0], (folder, metrics, config)]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("command", "not a `fedrec baselines` run"),
        ("split", "its split differs"),
        ("config seed", "not \\s*both its folder's"),
        ("fit seed", "fit's seed 0"),
        ("folder", "A-seed7: its config's seed 1"),
        ("grid", "another grid"),
        ("implicit", "implicit '0.6.0'"),
        ("metric", "no test NDCG@10"),
    ],
)
def test_a_seed_run_that_is_not_the_same_bar_is_refused_by_name(change: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as err:
        bar(_broken(change))
    assert "baseline-seeds/runs/A-seed" in str(err.value)
