"""Print this folder's tables from its runs' files (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-silo10-rounds/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
# the same seeds at the preset's 3 rounds, without and with 16 item factors
EARLIER = [RESULTS / "fed-A-silo10-batch" / "runs" / f"q10-r3-lr16-seed{s}" for s in range(3)]
EARLIER += [RESULTS / "fed-A-silo10-factor-rows" / "runs" / f"fac16-seed{s}" for s in range(3)]


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    valid = [
        json.loads(line)["valid_NDCG@10"]
        for line in (run / "progress.jsonl").read_text().splitlines()
        if "valid_NDCG@10" in line
    ]
    m = json.loads((run / "metrics.json").read_text())
    return {
        "run": str(run.relative_to(RESULTS)),
        "factors": c["item_factors"],
        "rounds": c["num_rounds"],
        "seed": c["seed"],
        "valid": valid,
        "test": m["model"]["metrics"]["test"],
        "spent": m["privacy"]["epsilon_max"],
        "seconds": m["seconds"],
    }


def main() -> None:
    runs = [load(p) for p in EARLIER]
    runs += [load(p) for p in sorted((HERE / "runs").iterdir()) if p.is_dir()]
    runs += [load(p) for p in sorted((HERE / "probes").iterdir()) if p.is_dir()]
    print(
        "| run | item-factors | rounds | seed | epsilon spent | valid NDCG@10 by round "
        "(0, 1, ...) | test NDCG@10 | test HR@10 | seconds |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in runs:
        v = " / ".join(f"{x:.4f}" for x in r["valid"])
        t = r["test"]
        print(
            f"| `{r['run']}` | {r['factors']} | {r['rounds']} | {r['seed']} | {r['spent']:.3f} | "
            f"{v} | {t['NDCG@10']:.4f} | {t['HR@10']:.4f} | {r['seconds']:.0f} |"
        )
    print()
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["run"].startswith(f"{HERE.name}/probes/"):  # one run: in the first table only
            continue
        groups.setdefault(f"item-factors {r['factors']}, {r['rounds']} rounds", []).append(r)
    print(
        "| setting | runs | valid NDCG@10 (last round) median | test NDCG@10 median (min-max) "
        "| seconds median |"
    )
    print("|---|---:|---:|---|---:|")
    for k, rs in groups.items():
        tests = [r["test"]["NDCG@10"] for r in rs]
        vals = [r["valid"][-1] for r in rs]
        secs = [r["seconds"] for r in rs]
        print(
            f"| {k} | {len(rs)} | {statistics.median(vals):.4f} | "
            f"{statistics.median(tests):.4f} ({min(tests):.4f}-{max(tests):.4f}) | "
            f"{statistics.median(secs):.0f} |"
        )


if __name__ == "__main__":
    main()
