"""Print this folder's tables from its runs' files, their lr-16 twins' and ``paired.json``
(never typed by hand).

Usage, from the repository: python simulations/results/fed-A-pooled-step/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
TWINS = [HERE.parent / "fed-A-silo10-capacity" / "runs" / n for n in ("s1-fac16", "s1-fac16-seed1")]
TWINS += [HERE.parent / "fed-A-silo10-factor-rows" / "runs" / f"fac16-seed{s}" for s in range(3)]


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    valid = [
        json.loads(line)["valid_NDCG@10"]
        for line in (run / "progress.jsonl").read_text().splitlines()
        if "valid_NDCG@10" in line
    ]
    m = json.loads((run / "metrics.json").read_text())
    return {
        "run": str(run.relative_to(HERE.parent)),
        "silos": c["silos"],
        "lr": c["lr"],
        "seed": c["seed"],
        "valid": valid,
        "test": m["model"]["metrics"]["test"],
        "spent": m["privacy"]["epsilon_max"],
        "seconds": m["seconds"],
    }


def main() -> None:
    runs = [load(p) for p in TWINS]
    runs += [load(p.parent) for p in sorted((HERE / "runs").glob("*/metrics.json"))]
    print(
        "| run | silos | lr | seed | epsilon spent | valid NDCG@10 by round (0, 1, 2, 3) | "
        "test NDCG@10 | test HR@10 | test NDCG@20 | seconds |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in runs:
        v = " / ".join(f"{x:.4f}" for x in r["valid"])
        t = r["test"]
        print(
            f"| `{r['run']}` | {r['silos']} | {r['lr']:g} | {r['seed']} | {r['spent']:.3f} | {v} "
            f"| {t['NDCG@10']:.4f} | {t['HR@10']:.4f} | {t['NDCG@20']:.4f} | {r['seconds']:.0f} |"
        )
    print()
    print(
        "| silos | lr | runs | last-round valid NDCG@10 median | test NDCG@10 median (min to max) |"
    )
    print("|---:|---:|---:|---:|---|")
    groups: dict[tuple[int, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["silos"], r["lr"]), []).append(r)
    for (silos, lr), rs in groups.items():
        t = [r["test"]["NDCG@10"] for r in rs]
        v = statistics.median(r["valid"][-1] for r in rs)
        print(
            f"| {silos} | {lr:g} | {len(rs)} | {v:.4f} | "
            f"{statistics.median(t):.4f} ({min(t):.4f} to {max(t):.4f}) |"
        )
    print_paired(HERE / "paired.json")


def print_paired(paired: Path) -> None:
    """ALS's own seeds and each run's paired differences from ``paired.json``, if it exists."""
    if not paired.is_file():
        return
    rows = json.loads(paired.read_text())
    als = [r for r in rows if "ALS seed" in r]
    print()
    print(
        "ALS's own seeds (the suite's settings refitted): test "
        + ", ".join(f"{r['test']:.4f}" for r in als)
        + "; valid "
        + ", ".join(f"{r['valid']:.4f}" for r in als)
    )
    print()
    print(
        "| run | valid | test | test - ALS seed 0: mean [95 % interval] | share <= 0 | "
        "test - ALS: the mean difference against each of its 10 seeds (min to max) |"
    )
    print("|---|---:|---:|---|---:|---|")
    for r in rows:
        if "run" not in r:
            continue
        d0 = r["test - ALS"]["ALS seed 0"]
        means = [d["mean"] for d in r["test - ALS"].values()]
        print(
            f"| `{r['run']}` | {r['valid']:.4f} | {r['test']:.4f} | {d0['mean']:+.4f} "
            f"[{d0['ci95'][0]:+.4f}, {d0['ci95'][1]:+.4f}] | {d0['share_at_or_below_0']:.3f} | "
            f"{min(means):+.4f} to {max(means):+.4f} |"
        )


if __name__ == "__main__":
    main()
