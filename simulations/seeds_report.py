"""The README's table of medians over seeds for the federated settings run more than once,
generated from the committed runs (never typed by hand).

Run: ``python -m fedrec.simulations.seeds_report [--results DIR] [--readme README.md]``

Each setting of :data:`SETTINGS` names a results folder and a glob of its ``runs/*`` that are one
configuration run with several seeds (refused if their configs differ in anything but the seed).
Each row gives the median, the smallest and the largest of their test metric, the largest epsilon
any of them spent, and the bar: a baseline from the full suite's baselines run of the same
protocol (``suite-full/runs/P-baselines``), refused unless it was fitted on the same split;
beside a seeded bar (ALS), its median and range over the seeds of ``baseline-seeds/runs/P-seed*``
when that folder holds them (``fedrec baselines --seed S``: how far the bar's own seed moves it).
The table goes between ``<!-- seeds-headline:begin -->`` and ``<!-- seeds-headline:end -->`` of
the README; ``tests/test_docs.py`` checks that the committed README holds exactly what this module
generates from the committed runs.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.baselines.runner import SEED_MOVES
from fedrec.simulations.secure_report import _check_same, report_cli

BEGIN, END = "<!-- seeds-headline:begin -->", "<!-- seeds-headline:end -->"
DEFAULT_RESULTS = Path("simulations/results")


@dataclass(frozen=True)
class Setting:
    """One federated configuration run with several seeds."""

    label: str  # what the configuration is, as the table names it
    folder: str  # its results folder, under the results directory
    runs: str  # a glob of its run folders, under ``folder/runs``
    metrics: tuple[tuple[str, str], ...]  # (evaluation set, metric) of each column value
    bar: str  # the baseline the target is set against, from ``P-baselines``


A = (("test", "NDCG@10"),)
SETTINGS = (
    Setting("10 silos, the `silos` preset (sliding windows of two items)", "fed-A-silo10-batch",
            "q10-r3-lr16-seed*", A, "als"),
    Setting("the `silos` preset at epsilon 3", "fed-A-silo10-batch", "batch-eps3-seed*", A, "als"),
    Setting("the `silos` preset at epsilon 1", "fed-A-silo10-batch", "batch-eps1-seed*", A, "als"),
    Setting("the `silos` preset with 16 item factors", "fed-A-silo10-factor-rows", "fac16-seed*",
            A, "als"),
    Setting("the `silos` preset with 16 item factors, 5 rounds", "fed-A-silo10-rounds",
            "fac16-r5-seed*", A, "als"),
    Setting("not a federation: one silo holding every user (the ten silos' noise pooled), 16 "
            "item factors, lr 48", "fed-A-pooled-step", "s1-fac16-lr48-seed*", A, "als"),
    Setting("10 silos, the noise added once a round by a trusted server (no protection against "
            "it; the `silos-trusted-server` preset: 16 item factors, lr 48)", "fed-A-server-noise",
            "srv-fac16-lr48-seed*", A, "als"),
    Setting("the `silos-trusted-server` preset at epsilon 3", "fed-A-server-noise",
            "srv-eps3-seed*", A, "als"),
    Setting("the `silos-trusted-server` preset at epsilon 1, lr 16", "fed-A-server-noise",
            "srv-eps1-lr16-seed*", A, "als"),
    Setting("10 silos, the noise added by the silos inside secure aggregation (no trusted "
            "server; the `silos-secure` preset: every example every round, 16 item factors, lr 48)",
            "fed-A-secure-interaction", "sec-q1-lr48-seed*", A, "als"),
    Setting("10 silos, sliding windows, 10 rounds of small batches", "fed-A-silo10-seeds",
            "seq-h2-eps8-seed*", A, "als"),
    Setting("10 silos, disjoint examples", "fed-A-silo10-seeds", "eps8-seed*", A, "als"),
    Setting("10 silos, disjoint examples, epsilon 3", "fed-A-silo10-seeds", "eps3-seed*", A, "als"),
    Setting("10 silos, disjoint examples, epsilon 1", "fed-A-silo10-seeds", "eps1-seed*", A, "als"),
    Setting("10 silos, disjoint examples, cold prior read by MiniLM", "fed-B-prior-mpnet",
            "minilm-prior-seed*",
            (("cold_items", "Recall@10"),), "text-popularity"),
    Setting("10 silos, disjoint examples, cold prior read by mpnet (server only)",
            "fed-B-prior-mpnet",
            "mpnet-prior-seed*", (("cold_items", "Recall@10"),), "text-popularity"),
    Setting("10 silos, disjoint examples, segment prior (age bands, noise 2)",
            "fed-C-segment-prior", "age-z2-seed*", (("k=0", "NDCG@10"), ("k=3", "NDCG@10")),
            "profile-popularity"),
    Setting("10 silos, disjoint examples, segment prior (age bands, noise 0.7)",
            "fed-C-segment-prior", "age-z07-seed*", (("k=0", "NDCG@10"), ("k=3", "NDCG@10")),
            "profile-popularity"),
)  # fmt: skip


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def load_setting(results: Path, s: Setting) -> list[dict[str, Any]]:
    """``[{name, config, metrics}]`` of the setting's runs, sorted by name, checked to differ
    only in their seed."""
    runs = []
    for m in sorted((results / s.folder / "runs").glob(f"{s.runs}/metrics.json")):
        try:
            config = _read(m.parent / "config.json")["federation"]
        except KeyError:
            raise ValueError(f"{m.parent}/config.json: no 'federation' section") from None
        runs.append({"name": m.parent.name, "config": config, "metrics": _read(m)})
    if len(runs) < 2:
        raise ValueError(
            f"{results / s.folder}/runs/{s.runs}: {len(runs)} run(s) found, a median needs two "
            "or more"
        )
    for r in runs[1:]:
        _check_same(runs[0], r, set(), "a median is over runs that differ only in their seed")
    return runs


def _value(metrics: dict[str, Any], where: str, name: str, node: str) -> float:
    try:
        return float(metrics["metrics"][where][name])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{node}: no {where} {name} in its metrics") from None


SEEDED_BARS = SEED_MOVES  # the baselines whose fit `fedrec baselines --seed` moves


def _grid(entry: dict[str, Any]) -> list[Any]:
    return [t.get("params") for t in entry.get("trace", [])]


def seed_runs(results: Path, protocol: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(folder, metrics, config)`` of each ``baseline-seeds/runs/P-seed*`` run, read once."""
    runs = sorted((results / "baseline-seeds" / "runs").glob(f"{protocol}-seed*/metrics.json"))
    return [(m.parent.name, _read(m), _read(m.parent / "config.json")) for m in runs]


def bar_seeds(
    runs: list[tuple[str, dict[str, Any], dict[str, Any]]],
    protocol: str,
    bar: str,
    base: dict[str, Any],
    implicit: str | None,
    where: str,
    name: str,
) -> str:
    """`` (seeds 0 to 9: median M, LO to HI)``: a seeded bar (:data:`SEEDED_BARS`) over the
    seeds of ``runs`` (:func:`seed_runs`; ``fedrec baselines --seed S``), when two or more of them
    hold the bar; else ''. ``base``: the suite's baselines run, made with ``implicit``. A seed run
    is refused unless it is a ``baselines`` run on the same split, fitted with the seed its
    folder names (its config and its metrics say so), tuned over the same grid as the suite's
    bar, and made with the same ``implicit`` version."""
    if bar not in SEEDED_BARS:
        return ""
    vals: dict[int, float] = {}
    suite = base["baselines"][bar]
    for folder, metrics, config in runs:
        node = f"baseline-seeds/runs/{folder}"
        if bar not in metrics.get("baselines", {}):
            continue
        entry = metrics["baselines"][bar]
        if config.get("command") != "baselines":
            raise ValueError(f"{node}: not a `fedrec baselines` run")
        if metrics.get("split") != base.get("split"):
            raise ValueError(f"{node}: its split differs from the suite's baselines run")
        seed = config.get("seed")
        fitted = entry.get("params", {}).get("seed") if bar == "random" else entry.get("seed")
        if not isinstance(seed, int) or folder != f"{protocol}-seed{seed}" or fitted != seed:
            raise ValueError(
                f"{node}: its config's seed {seed!r} and its {bar} fit's seed {fitted!r} are not "
                "both its folder's"
            )
        if _grid(entry) != _grid(suite):
            raise ValueError(f"{node}: {bar} was tuned over another grid than the suite's bar")
        mine = config.get("versions", {}).get("implicit")
        if mine != implicit:
            raise ValueError(
                f"{node}: made with implicit {mine!r}, the suite's bar with {implicit!r}"
            )
        vals[seed] = _value(entry, where, name, f"{node} {bar}")
    if len(vals) < 2:
        return ""
    v = list(vals.values())
    seeds = f"seeds {min(vals)} to {max(vals)}" if len(vals) == max(vals) - min(vals) + 1 else (
        f"{len(vals)} seeds")  # fmt: skip
    return f" ({seeds}: median {statistics.median(v):.4f}, {min(v):.4f} to {max(v):.4f})"


def row(results: Path, s: Setting) -> str:
    runs = load_setting(results, s)
    protocol = str(runs[0]["config"]["protocol"])
    base_path = results / "suite-full" / "runs" / f"{protocol}-baselines" / "metrics.json"
    base = _read(base_path)
    base_config = base_path.parent / "config.json"
    implicit = (
        _read(base_config).get("versions", {}).get("implicit") if base_config.is_file() else None
    )
    seeds = seed_runs(results, protocol) if s.bar in SEEDED_BARS else []
    for r in runs:
        if r["metrics"].get("split") != base.get("split"):
            raise ValueError(
                f"{s.folder}/runs/{r['name']}: its split differs from {base_path}'s, so the "
                "baseline is not on the same split"
            )
    if s.bar not in base.get("baselines", {}):
        raise ValueError(f"{base_path}: no baseline {s.bar!r}")
    cells, bars = [], []
    for where, name in s.metrics:
        vals = [_value(r["metrics"]["model"], where, name, f"{s.folder}/runs/{r['name']}")
                for r in runs]  # fmt: skip
        bar = _value(base["baselines"][s.bar], where, name, f"{base_path} {s.bar}")
        at = "" if len(s.metrics) == 1 else f"{where}: "
        cells.append(f"{at}**{statistics.median(vals):.4f}** ({min(vals):.4f} to {max(vals):.4f})")
        spread = bar_seeds(seeds, protocol, s.bar, base, implicit, where, name)
        bars.append(f"{at}{bar:.4f}{spread}")
    # "at most": rounded up, never below what a run spent
    eps = math.ceil(max(float(r["metrics"]["privacy"]["epsilon_max"]) for r in runs) * 100) / 100
    delta = runs[0]["metrics"]["privacy"]["delta"]
    label = f"{s.label} ([runs](simulations/results/{s.folder}/README.md))"
    metric = f"{s.metrics[0][1]} ({'cold items' if s.metrics[0][0] == 'cold_items' else 'test'})"
    return (
        f"| {protocol} | {label} | {len(runs)} | {eps:.2f} / interaction (delta {delta:g}) "
        f"| {metric} | {'; '.join(cells)} | {s.bar}: {'; '.join(bars)} |"
    )


def headline(results: Path = DEFAULT_RESULTS, settings: tuple[Setting, ...] = SETTINGS) -> str:
    """The Markdown block (without the markers)."""
    lines = [
        "| protocol | federated setting (local DP-SGD, epsilon 8 unless named) | runs | "
        "epsilon at most | metric | median (min to max) | the bar, same split |",
        "|---|---|---:|---|---|---|---|",
        *(row(results, s) for s in settings),
        "",
        "Generated from the runs' `metrics.json` (their seeds are their only difference) and "
        "the full suite's baselines runs of each protocol (`simulations/results/suite-full/runs/`;"
        " in brackets, a seeded bar refitted with other seeds: `simulations/results/"
        "baseline-seeds/`) by `python -m fedrec.simulations.seeds_report --readme README.md`.",
    ]
    return "\n".join(lines)


def main() -> None:
    report_cli(__doc__, DEFAULT_RESULTS, headline, BEGIN, END, "seeds_report")


if __name__ == "__main__":
    main()
