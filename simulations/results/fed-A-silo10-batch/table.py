"""Print this folder's tables from its runs' files (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-silo10-batch/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = HERE.parent / "fed-A-silo10-seeds" / "runs"


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    valid = [
        json.loads(line)
        for line in (run / "progress.jsonl").read_text().splitlines()
        if "valid_NDCG@10" in line
    ]
    out = {
        "name": run.name,
        "seed": c["seed"],
        "shape": f"q {c['sample_rate']:g}, {c['num_rounds']} x {c['local_steps']} steps, "
        f"lr {c['lr']:g}, epsilon {c['epsilon']:g}",
        "valid": [(v["round"], v["valid_NDCG@10"]) for v in valid],
        "test": None,
    }
    if (run / "metrics.json").is_file():
        m = json.loads((run / "metrics.json").read_text())
        out["test"] = m["model"]["metrics"]["test"]
        out["spent"] = m["privacy"]["epsilon_max"]
        out["sigma"] = json.loads((run / "privacy" / "ledger.jsonl").read_text().splitlines()[0])[
            "noise_multiplier"
        ]
        out["seconds"] = m["seconds"]
        out["baselines"] = {k: v["metrics"]["test"]["NDCG@10"] for k, v in m["baselines"].items()}
    return out


runs = [load(p.parent) for p in sorted(HERE.glob("runs/*/config.json"))]
preset = [load(SEEDS / f"seq-h2-eps8-seed{s}") for s in (0, 1, 2)]
print(
    "| run | seed | shape (sample rate, rounds x local steps, lr, epsilon budget) "
    "| noise multiplier | epsilon spent | valid NDCG@10 by round | test NDCG@10 | test HR@10 "
    "| seconds |"
)
print("|---|---:|---|---:|---:|---|---:|---:|---:|")
for r in preset + runs:
    where = "`../fed-A-silo10-seeds/runs/" if r in preset else "`"
    valid = ", ".join(f"{n}: {v:.4f}" for n, v in r["valid"])
    if r["test"] is None:
        print(f"| {where}{r['name']}` | {r['seed']} | {r['shape']} | | | {valid} (stopped) "
              "| | | |")  # fmt: skip
        continue
    print(
        f"| {where}{r['name']}` | {r['seed']} | {r['shape']} | {r['sigma']:.3f} "
        f"| {r['spent']:.3f} | {valid} | {r['test']['NDCG@10']:.4f} | {r['test']['HR@10']:.4f} "
        f"| {r['seconds']:.0f} |"
    )
print()
groups: dict[str, list[dict]] = {}
for r in preset + runs:
    if r["test"] is not None:
        groups.setdefault(r["shape"], []).append(r)
print("| shape | runs | median test NDCG@10 | min | max | median last valid NDCG@10 |")
print("|---|---:|---:|---:|---:|---:|")
for shape, rs in groups.items():
    t = [r["test"]["NDCG@10"] for r in rs]
    v = [r["valid"][-1][1] for r in rs]
    print(f"| {shape} | {len(rs)} | {statistics.median(t):.4f} | {min(t):.4f} | {max(t):.4f} "
          f"| {statistics.median(v):.4f} |")  # fmt: skip
base = {k: v for r in runs if r["test"] is not None for k, v in r.get("baselines", {}).items()}
print()
print("Baselines on the same split: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(base.items())))
