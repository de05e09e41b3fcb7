"""The README's headline for one-user-per-device federations with user-level DP and secure
aggregation, generated from the committed runs (never typed by hand).

Run: ``python -m fedrec.simulations.secure_report [--results DIR] [--readme README.md]``

``DIR`` (default ``simulations/results/secure-agg``) holds ``runs/NAME/metrics.json`` and
``runs/NAME/config.json`` for each run. Runs whose config has ``secure-agg=true`` are the
private ones (their median is the headline); the others are reference runs of the same
federation without DP. The table goes between ``<!-- secure-headline:begin -->`` and
``<!-- secure-headline:end -->`` of the README; ``tests/test_docs.py`` checks that the committed
README holds exactly what this module generates from the committed runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

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


def headline(results: Path, *, label: str | None = None) -> str:
    """The Markdown block (without the markers); ``label``: how the text names ``results``
    (default: as given)."""
    runs = load_runs(results)
    private = [r for r in runs if r["config"].get("secure_agg")]
    plain = [r for r in runs if not r["config"].get("secure_agg")]
    if not private:
        raise ValueError(f"{results}/runs: no run with secure_agg true")
    same = {k: v for k, v in private[0]["config"].items() if k != "seed"}
    for r in private[1:]:
        diff = sorted(
            k
            for k in same.keys() | r["config"].keys()
            if k != "seed" and same.get(k) != r["config"].get(k)
        )
        if diff:
            raise ValueError(
                f"{results}/runs/{r['name']}: settings differ from {private[0]['name']} in "
                f"{diff}; a median is over runs that differ only in their seed"
            )
    rows = [
        "| run | seed | privacy | test NDCG@10 | test HR@10 | valid NDCG@10 | popularity | "
        "item-kNN | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(r: dict[str, Any]) -> str:
        m, c = r["metrics"], r["config"]
        u = m["privacy"].get("user_level") or {}
        if u.get("enabled"):
            priv = f"{u['epsilon']:.2f} / user (delta {u['delta']:g})"
        elif c.get("dp"):
            priv = "local DP (see the run)"
        else:
            priv = "none"
        valid = _valid(m)
        return (
            f"| `{r['name']}` | {c.get('seed', 0)} | {priv} | {_test(m)['NDCG@10']:.4f} | "
            f"{_test(m)['HR@10']:.4f} | {'-' if valid is None else f'{valid:.4f}'} | "
            f"{_test(m, 'popularity')['NDCG@10']:.4f} | {_test(m, 'itemknn')['NDCG@10']:.4f} | "
            f"{m.get('seconds', 0):.0f} |"
        )

    rows += [row(r) for r in private + plain]
    ndcg = [_test(r["metrics"])["NDCG@10"] for r in private]
    eps = [r["metrics"]["privacy"]["user_level"]["epsilon"] for r in private]
    secs = [r["metrics"].get("seconds", 0.0) for r in private]
    c0 = private[0]["config"]
    u0 = private[0]["metrics"]["privacy"]["user_level"]
    pop = _test(private[0]["metrics"], "popularity")["NDCG@10"]
    knn = _test(private[0]["metrics"], "itemknn")["NDCG@10"]
    lines = [
        f"**One user per device, user-level DP, no trusted server** (SecAgg+ with distributed "
        f"Skellam noise): median test NDCG@10 **{statistics.median(ndcg):.4f}** over "
        f"{len(private)} runs (min {min(ndcg):.4f}, max {max(ndcg):.4f}) against popularity "
        f"{pop:.4f} and item-kNN {knn:.4f} on the same split; epsilon at most "
        f"{max(eps):.2f} per user at delta {u0['delta']:g} ({u0['sampled_per_round']} of "
        f"{u0['clients']} users per round, {c0['num_rounds']} rounds, clip "
        f"{c0['user_clip']:g}, server lr {c0['server_lr']:g}); median "
        f"{statistics.median(secs) / 60:.1f} min a run on 2 cores."
        + "".join(
            f" The same federation without DP (`{r['name']}`: no clip, no noise, no secure "
            f"aggregation): {_test(r['metrics'])['NDCG@10']:.4f}."
            for r in plain
        ),
        "",
        *rows,
        "",
        f"Generated from `{label or results.as_posix()}/runs/*/metrics.json` by `python -m "
        "fedrec.simulations.secure_report`.",
    ]
    return "\n".join(lines)


def write_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme}: needs the markers {BEGIN} and {END}, in that order")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--readme", type=Path, default=None, help="write the block into this file")
    args = ap.parse_args()
    try:
        block = headline(args.results)
        if args.readme is not None:
            write_readme(args.readme, block)
    except ValueError as err:
        ap.exit(2, f"secure_report: {err}\n")
    print(block)


if __name__ == "__main__":
    main()
