"""Print this folder's tables from its runs' files (never typed by hand).

Usage, from the repository: python simulations/results/fed-C-segment-prior/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = HERE.parent / "suite-full" / "runs" / "C-fed-eps8"


METRIC = "NDCG@10"


def ndcg(metrics: dict, k: str) -> float:
    return float(metrics[k][METRIC])


def load(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    ledger = [json.loads(x) for x in (run / "privacy" / "ledger.jsonl").read_text().splitlines()]
    ledger = [x for x in ledger if "client" in x]
    seg = m["model"].get("segment_prior", {})
    audit = (run / "audit.txt").read_text() if (run / "audit.txt").is_file() else ""
    return {
        "name": run.name,
        "seed": json.loads((run / "config.json").read_text())["federation"]["seed"],
        "with": {k: ndcg(m["model"]["metrics"], k) for k in ("k=0", "k=3")},
        "alone": {k: ndcg(seg["model_alone"], k) for k in ("k=0", "k=3")} if seg else None,
        "base": {
            n: {k: ndcg(b["metrics"], k) for k in ("k=0", "k=3")} for n, b in m["baselines"].items()
        },  # fmt: skip
        "epsilon": m["privacy"]["epsilon_max"],
        "sigma": ledger[0]["noise_multiplier"],
        "release": ledger[0].get("release"),
        "tables": seg.get("tables"),
        "seconds": m["seconds"],
        "audit": "PASS" if "Result: PASS" in audit else ("FAIL" if audit else ""),
    }


runs = [load(p.parent) for p in sorted(HERE.glob("runs/*/metrics.json"))]
suite = load(SUITE)
print(f"Test {METRIC}:")
print()
print("| run | seed | release (run charged) | DP-SGD noise multiplier | epsilon | tables summed "
      "| test k=0 with prior | k=3 with prior | k=0 model alone | k=3 model alone "
      "| popularity k=0 / k=3 | profile-popularity k=0 / k=3 | seconds | audit |")  # fmt: skip
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|")
for r in [suite, *runs]:
    name = "`../suite-full/runs/C-fed-eps8` (no prior)" if r is suite else f"`runs/{r['name']}`"
    w, a = r["with"], r["alone"] or r["with"]
    pair = {
        n: f"{b['k=0']:.4f} / {b['k=3']:.4f}" if b else ""
        for n, b in (("pop", r["base"].get("popularity")),
                     ("pp", r["base"].get("profile-popularity")))
    }  # fmt: skip
    print(
        f"| {name} | {r['seed']} | {r['release'] or 'none'} | {r['sigma']:.4f} "
        f"| {r['epsilon']:.3f} | {r['tables'] or ''} | {w['k=0']:.4f} | {w['k=3']:.4f} "
        f"| {a['k=0']:.4f} | {a['k=3']:.4f} "
        f"| {pair['pop']} | {pair['pp']} | {r['seconds']:.0f} | {r['audit']} |"
    )
# one setting per run-name prefix (`age-z2-seed0` -> `age-z2`: segment-noise 2)
settings = sorted({r["name"].rsplit("-seed", 1)[0] for r in runs})
if runs:
    print()
    print("| medians over the runs of a setting | runs | k=0 | k=3 |")
    print("|---|---:|---:|---:|")
    for setting in settings:
        mine = [r for r in runs if r["name"].rsplit("-seed", 1)[0] == setting]
        for label, key in (("with the segment prior", "with"), ("the model alone", "alone")):
            vals = {k: statistics.median(r[key][k] for r in mine) for k in ("k=0", "k=3")}
            print(f"| `{setting}`, {label} | {len(mine)} | {vals['k=0']:.4f} | {vals['k=3']:.4f} |")

# the same runs on Recall@10 (the suite's C tables show both)
METRIC = "Recall@10"
print()
print("Test Recall@10 (k=0 / k=3):")
print()
print("| run | with prior | model alone | popularity | profile-popularity |")
print("|---|---|---|---|---|")
for r in [load(p.parent) for p in sorted(HERE.glob("runs/*/metrics.json"))]:
    cells = [r["with"], r["alone"], r["base"]["popularity"], r["base"]["profile-popularity"]]
    row = " | ".join(f"{c['k=0']:.4f} / {c['k=3']:.4f}" for c in cells)
    print(f"| `runs/{r['name']}` | {row} |")
