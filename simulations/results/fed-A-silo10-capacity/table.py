"""Print this folder's tables from its runs' files (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-silo10-capacity/table.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESET = HERE.parent / "fed-A-silo10-batch" / "runs"
CHANGED = (
    "silos",
    "num_rounds",
    "server_lr_final",
    "lora_r",
    "lora_alpha",
    "item_factors",
    "item_offsets",
    "lr_offsets",
)


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    valid = [
        json.loads(line)["valid_NDCG@10"]
        for line in (run / "progress.jsonl").read_text().splitlines()
        if "valid_NDCG@10" in line
    ]
    m = json.loads((run / "metrics.json").read_text())
    ledger = json.loads((run / "privacy" / "ledger.jsonl").read_text().splitlines()[0])
    return {
        "name": run.name,
        "config": {k: c[k] for k in CHANGED},
        "seed": c["seed"],
        "valid": valid,
        "test": m["model"]["metrics"]["test"],
        "spent": m["privacy"]["epsilon_max"],
        "sigma": ledger["noise_multiplier"],
        "seconds": m["seconds"],
    }


def row(r: dict, where: str, base: dict) -> str:
    diff = [f"{k.replace('_', '-')}={v:g}" for k, v in r["config"].items() if base[k] != v]
    r["settings"] = " ".join(diff) or "(the preset)"
    valid = " / ".join(f"{v:.4f}" for v in r["valid"])
    return (
        f"| {where}{r['name']}` | {r['settings']} | {r['seed']} | {r['sigma']:.3f} "
        f"| {r['spent']:.3f} | {valid} | {r['test']['NDCG@10']:.4f} "
        f"| {r['test']['HR@10']:.4f} | {r['seconds']:.0f} |"
    )


print(
    "| run | settings (besides the `silos` preset's) | seed | noise multiplier | epsilon spent "
    "| valid NDCG@10 by round (0, 1, ...) | test NDCG@10 | test HR@10 | seconds |"
)
print("|---|---|---:|---:|---:|---|---:|---:|---:|")
preset = [load(PRESET / f"q10-r3-lr16-seed{s}") for s in (0, 1, 2)]
base = preset[0]["config"]
for r in preset:
    print(row(r, "`../fed-A-silo10-batch/runs/", base))
for p in sorted(HERE.glob("runs/*/config.json")):
    print(row(load(p.parent), "`runs/", base))

print()
print(
    "| diagnose file | examples | norm median (p10 / p90) | above the clip | group shares (mean) |"
)
print("|---|---:|---|---:|---|")
for f in sorted((HERE / "diagnose").glob("*.json")):
    d = json.loads(f.read_text())
    n = d["norm"]
    groups = sorted(d["groups"].items(), key=lambda kv: -kv[1]["mean_share"])
    shares = ", ".join(f"{g} {s['mean_share']:.2f}" for g, s in groups)
    print(
        f"| `diagnose/{f.name}` | {d['examples']} | {n['p50']:.2f} ({n['p10']:.2f} / "
        f"{n['p90']:.2f}) | {100 * d['clipped_fraction']:.0f} % | {shares} |"
    )
