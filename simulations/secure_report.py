"""The README's headline for one-user-per-device federations with user-level DP and secure
aggregation, generated from the committed runs (never typed by hand).

Run: ``python -m fedrec.simulations.secure_report [--results DIR] [--readme README.md]``

``DIR`` (default ``simulations/results/secure-agg``) holds ``runs/NAME/metrics.json`` and
``runs/NAME/config.json`` for each run. Runs whose config has ``secure-agg=true`` are the
private ones (their median is the headline); the others are reference runs of the same
federation with central DP (``secure-agg=false``: a trusted server adds the noise) or without
DP (``user-dp=false`` too), refused if they differ in anything else but the seed. The table
goes between ``<!-- secure-headline:begin -->`` and ``<!-- secure-headline:end -->`` of the
README; ``tests/test_docs.py`` checks that the committed
README holds exactly what this module generates from the committed runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrec.shared.privacy import skellam

BEGIN, END = "<!-- secure-headline:begin -->", "<!-- secure-headline:end -->"
DEFAULT_RESULTS = Path("simulations/results/secure-agg")


def load_runs(results: Path) -> list[dict[str, Any]]:
    """``[{name, config, metrics}]`` of ``results/runs/*``, sorted by name."""
    runs = []
    for run in sorted((results / "runs").glob("*/metrics.json")):
        try:
            metrics = json.loads(run.read_text())
            config = json.loads((run.parent / "config.json").read_text())["federation"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{run.parent}: not a readable fedrec run ({err})") from None
        runs.append({"name": run.parent.name, "config": config, "metrics": metrics})
    if not runs:
        raise ValueError(f"{results}/runs/*/metrics.json: no runs found")
    return runs


def _test(metrics: dict[str, Any], who: str = "model") -> dict[str, float]:
    node = metrics[who] if who == "model" else metrics["baselines"][who]
    return node["metrics"]["test"]


def _valid(metrics: dict[str, Any]) -> float | None:
    v = metrics["model"].get("valid") or {}
    return v.get("NDCG@10")


# What a reference run may change against the private runs (besides the seed): the central-DP
# twin only drops secure aggregation (the server adds the same Gaussian-calibrated noise); the
# no-DP twin also drops user-level DP (no clip, no noise).
TWINS = {
    "central": ("the same federation with central DP", {"secure_agg"}),
    "nodp": ("the same federation without DP", {"secure_agg", "user_dp"}),
}


def _kind(config: dict[str, Any]) -> str:
    if config.get("secure_agg"):
        return "private"
    if config.get("user_dp") and not config.get("dp"):
        return "central"
    if not config.get("user_dp") and not config.get("dp"):
        return "nodp"
    raise ValueError("a run with local DP is not a twin of the secure federation")


def _check_same(base: dict[str, Any], r: dict[str, Any], allowed: set[str], why: str) -> None:
    """ValueError unless the two configs agree outside ``allowed`` and the seed. A key one
    config lacks (written by an older fedrec) counts as FedConfig's default: an option added
    later at its default did not change the run."""
    import dataclasses

    from fedrec.shared.federation.config import FedConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FedConfig)}

    def value(config: dict[str, Any], k: str) -> Any:
        return config[k] if k in config else defaults.get(k, dataclasses.MISSING)

    keys = base["config"].keys() | r["config"].keys()
    diff = sorted(
        k for k in keys
        if k != "seed" and k not in allowed and value(base["config"], k) != value(r["config"], k)
    )  # fmt: skip
    if diff:
        raise ValueError(f"runs/{r['name']}: settings differ from {base['name']} in {diff}; {why}")


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f} (one run)"
    return (
        f"median {statistics.median(values):.4f} over {len(values)} runs (min "
        f"{min(values):.4f}, max {max(values):.4f})"
    )


def headline(results: Path, *, label: str | None = None) -> str:
    """The Markdown block (without the markers); ``label``: how the text names ``results``
    (default: as given)."""
    runs = load_runs(results)
    groups: dict[str, list[dict[str, Any]]] = {"private": [], "central": [], "nodp": []}
    for r in runs:
        try:
            groups[_kind(r["config"])].append(r)
        except ValueError as err:
            raise ValueError(f"{results}/runs/{r['name']}: {err}") from None
    private = groups["private"]
    if not private:
        raise ValueError(f"{results}/runs: no run with secure_agg true")
    for r in private[1:]:
        _check_same(private[0], r, set(), "a median is over runs that differ only in their seed")
    for kind, (what, allowed) in TWINS.items():
        for r in groups[kind]:
            _check_same(private[0], r, allowed, f"not {what}")
    rows = [
        "| run | seed | privacy | test NDCG@10 | test HR@10 | valid NDCG@10 | popularity | "
        "item-kNN | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(r: dict[str, Any]) -> str:
        m, c = r["metrics"], r["config"]
        u = m["privacy"].get("user_level") or {}
        if u.get("enabled"):
            where = "no trusted server" if c.get("secure_agg") else "trusted server"
            priv = f"{u['epsilon']:.2f} / user (delta {u['delta']:g}), {where}"
        else:
            priv = "none"
        valid = _valid(m)
        return (
            f"| `{r['name']}` | {c.get('seed', 0)} | {priv} | {_test(m)['NDCG@10']:.4f} | "
            f"{_test(m)['HR@10']:.4f} | {'-' if valid is None else f'{valid:.4f}'} | "
            f"{_test(m, 'popularity')['NDCG@10']:.4f} | {_test(m, 'itemknn')['NDCG@10']:.4f} | "
            f"{m.get('seconds', 0):.0f} |"
        )

    rows += [row(r) for r in private + groups["central"] + groups["nodp"]]
    ndcg = [_test(r["metrics"])["NDCG@10"] for r in private]
    eps = [r["metrics"]["privacy"]["user_level"]["epsilon"] for r in private]
    secs = [r["metrics"].get("seconds", 0.0) for r in private]
    c0 = private[0]["config"]
    u0 = private[0]["metrics"]["privacy"]["user_level"]
    pop = _test(private[0]["metrics"], "popularity")["NDCG@10"]
    knn = _test(private[0]["metrics"], "itemknn")["NDCG@10"]
    # the adjacency the epsilon is for (a user's data present or zeroed out), and what the same
    # release gives when one user's data is replaced by another's, where the runs report it
    rep = [r["metrics"]["privacy"]["user_level"].get("epsilon_replace_one") for r in private]
    replace_one = (
        f" with or without one user's data (zero-out adjacency; at most {max(rep):.2f} if one "
        "user's data is replaced by another's)"
        if rep and all(x is not None for x in rep)
        else " with or without one user's data (zero-out adjacency)"
    )
    # the a-priori bound: every release at the plan's noise for the minimum survivors
    prior = []
    for r in private:
        u = r["metrics"]["privacy"]["user_level"]
        sa = u["secure_agg"]
        prior.append(
            skellam.skellam_epsilon(sa["mu_total_claimed"], sa["l1_sensitivity"],
                                    sa["l2_sensitivity"], u["releases"], sa["delta_accountant"])
        )  # fmt: skip
    twins = ""
    if groups["central"]:
        ce = [r["metrics"]["privacy"]["user_level"]["epsilon"] for r in groups["central"]]
        twins += (
            " The same federation with central DP (a trusted server clips and adds Gaussian "
            f"noise, epsilon at most {max(ce):.2f}): "
            + _spread([_test(r["metrics"])["NDCG@10"] for r in groups["central"]])
            + "."
        )
    if groups["nodp"]:
        twins += (
            " Without DP (no clip, no noise, no secure aggregation): "
            + _spread([_test(r["metrics"])["NDCG@10"] for r in groups["nodp"]])
            + "."
        )
    sa0 = u0["secure_agg"]
    colluders = (
        f"at most {sa0['colluders']} of all {u0['clients']} users collude with it, all assumed "
        "to be in every round's cohort"
        if sa0.get("colluders_scope") == "population"
        else f"at most {sa0['colluders']} of each round's {sa0['cohort']} users collude with it"
    )
    lines = [
        f"**One user per device, user-level DP, no trusted server** (SecAgg+ with distributed "
        f"Skellam noise: the server sees only the noisy sum; it is assumed honest but curious, "
        f"i.e. it follows the protocol; {colluders}): median test NDCG@10 "
        f"**{statistics.median(ndcg):.4f}** over "
        f"{len(private)} runs (min {min(ndcg):.4f}, max {max(ndcg):.4f}) against popularity "
        f"{pop:.4f} and item-kNN {knn:.4f} on the same split; epsilon at most "
        f"{max(eps):.2f} per user at delta {u0['delta']:g}{replace_one}, counted at the "
        f"survivors the rounds had (at most {max(prior):.2f} had every round kept only the "
        "minimum); "
        f"{u0['sampled_per_round']} of "
        f"{u0['clients']} users per round, {c0['num_rounds']} rounds, clip "
        f"{c0['user_clip']:g}, server {c0.get('server_opt', 'sgd')} lr {c0['server_lr']:g}; "
        f"median {statistics.median(secs) / 60:.1f} min a run on 2 cores." + twins,
        "",
        *rows,
        "",
        f"Generated from `{label or results.as_posix()}/runs/*/metrics.json` by `python -m "
        "fedrec.simulations.secure_report`.",
    ]
    return "\n".join(lines)


def write_block(readme: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``block`` between the markers ``begin`` and ``end`` of ``readme`` (the suite report's
    block splicing); the file is rewritten atomically, and left alone when the markers are not
    there once each, in that order."""
    import os

    from fedrec.simulations.suite_report import _has_block, _replace_block

    text = readme.read_text()
    if not _has_block(text, begin, end):
        raise ValueError(f"{readme}: needs the markers {begin} and {end}, in that order")
    tmp = readme.with_name(f".{readme.name}.{os.getpid()}.tmp")
    tmp.write_text(_replace_block(text, begin, end, [block]))
    os.replace(tmp, readme)


def report_cli(
    doc: str | None,
    default_results: Path,
    make: Callable[[Path], str],
    begin: str,
    end: str,
    prog: str,
) -> None:
    """The command line both README generators share: ``[--results DIR] [--readme FILE]``;
    prints the block, writes it into FILE between the markers, exits 2 on a bad input."""
    ap = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    ap.add_argument("--results", type=Path, default=default_results)
    ap.add_argument("--readme", type=Path, default=None, help="write the block into this file")
    args = ap.parse_args()
    try:
        block = make(args.results)
        if args.readme is not None:
            write_block(args.readme, block, begin, end)
    except ValueError as err:
        ap.exit(2, f"{prog}: {err}\n")
    print(block)


def main() -> None:
    report_cli(__doc__, DEFAULT_RESULTS, headline, BEGIN, END, "secure_report")


if __name__ == "__main__":
    main()
