"""Print this folder's tables from its runs' files (never typed by hand): each run's released
model (the average of the rounds' global models, ``ema-decay``) beside the same run's last-round
model, and the earlier runs of the same preset without the average: ``srv-*`` (the
``silos-trusted-server`` preset) against ``../fed-A-server-noise``, ``sec-*`` (the default
``secure`` preset, the main job) against ``../secure-agg``.

Usage, from the repository: python simulations/results/fed-A-server-ema/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUPS = (
    ("srv-", "`../fed-A-server-noise`, seeds 0 to 4 (no average; other runs)",
     [HERE.parent / "fed-A-server-noise" / "runs" / f"srv-fac16-lr48-seed{s}" for s in range(5)]),
    ("sec-", "`../secure-agg`, seeds 0 to 2 (no average; other runs)",
     [HERE.parent / "secure-agg" / "runs" / f"seed{s}" for s in range(3)]),
)  # fmt: skip


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    m = json.loads((run / "metrics.json").read_text())["model"]
    avg = m.get("average")
    row = {
        "run": str(run.relative_to(HERE.parent)),
        "seed": c["seed"],
        "decay": c.get("ema_decay", 0.0),
        "test": m["metrics"]["test"]["NDCG@10"],
        "hr": m["metrics"]["test"]["HR@10"],
        "valid": m["valid"]["NDCG@10"],
    }
    if avg is not None:
        row["last_test"] = avg["last_round"]["test"]["NDCG@10"]
        row["last_valid"] = avg["last_round"]["valid"]["NDCG@10"]
    return row


def table(prefix: str, label: str, earlier_runs: list[Path]) -> None:
    runs = [load(r) for r in sorted((HERE / "runs").glob(f"{prefix}*"))
            if (r / "metrics.json").is_file()]  # fmt: skip
    print(
        "| run | seed | ema-decay | valid NDCG@10: average / last round | test NDCG@10: "
        "average / last round | test difference | test HR@10 (average) |"
    )
    print("|---|---:|---:|---|---|---:|---:|")
    for r in runs:
        print(
            f"| `{r['run']}` | {r['seed']} | {r['decay']:g} | {r['valid']:.4f} / "
            f"{r['last_valid']:.4f} | {r['test']:.4f} / {r['last_test']:.4f} | "
            f"{r['test'] - r['last_test']:+.4f} | {r['hr']:.4f} |"
        )
    print()
    print("| models | runs | valid NDCG@10 median | test NDCG@10 median (min to max) |")
    print("|---|---:|---:|---|")

    def line(label: str, valid: list[float], test: list[float]) -> None:
        print(
            f"| {label} | {len(test)} | {statistics.median(valid):.4f} | "
            f"{statistics.median(test):.4f} ({min(test):.4f} to {max(test):.4f}) |"
        )

    line(
        "these runs, the average (released)", [r["valid"] for r in runs], [r["test"] for r in runs]
    )
    line(
        "these runs, the last round's model",
        [r["last_valid"] for r in runs],
        [r["last_test"] for r in runs],
    )
    earlier = [load(run) for run in earlier_runs]
    line(label, [r["valid"] for r in earlier], [r["test"] for r in earlier])
    diffs = [r["test"] - r["last_test"] for r in runs]
    vdiffs = [r["valid"] - r["last_valid"] for r in runs]
    print()
    print(
        f"paired, average minus last round: test {', '.join(f'{d:+.4f}' for d in diffs)} "
        f"(median {statistics.median(diffs):+.4f}); valid "
        f"{', '.join(f'{d:+.4f}' for d in vdiffs)} (median {statistics.median(vdiffs):+.4f})"
    )


def main() -> None:
    for i, group in enumerate(GROUPS):
        if i:
            print()
        table(*group)


if __name__ == "__main__":
    main()
