"""Print this folder's table from its runs' files and their DP twins' (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-silo10-nodp-shape/table.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TWINS = [HERE.parent / "fed-A-silo10-batch" / "runs" / f"q10-r3-lr16-seed{s}" for s in range(3)] + [
    HERE.parent / "fed-A-silo10-factor-rows" / "runs" / f"fac16-seed{s}" for s in range(3)
]


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
        "dp": c["dp"],
        "factors": c["item_factors"],
        "lr": c["lr"],
        "clip": c["max_grad_norm"] if c["dp"] else None,
        "seed": c["seed"],
        "valid": valid,
        "test": m["model"]["metrics"]["test"],
        "spent": m["privacy"].get("epsilon_max"),
        "seconds": m["seconds"],
    }


def main() -> None:
    runs = [load(p) for p in TWINS] + [load(p) for p in sorted((HERE / "runs").iterdir())]
    print(
        "| run | local DP-SGD (clip) | item-factors | lr | seed | epsilon spent | "
        "valid NDCG@10 by round (0, 1, 2, 3) | test NDCG@10 | test HR@10 | seconds |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in runs:
        v = " / ".join(f"{x:.4f}" for x in r["valid"])
        t = r["test"]
        eps = "-" if not r["dp"] else f"{r['spent']:.3f}"
        dp = f"yes ({r['clip']:g})" if r["dp"] else "no"
        print(
            f"| `{r['run']}` | {dp} | {r['factors']} | {r['lr']:g} | "
            f"{r['seed']} | "
            f"{eps} | {v} | {t['NDCG@10']:.4f} | {t['HR@10']:.4f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
