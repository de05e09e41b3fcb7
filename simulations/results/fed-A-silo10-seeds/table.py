"""Print this folder's tables from its runs' files (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-silo10-seeds/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def adjacency(run: Path) -> str:
    """What the ledger's epsilons bound: one interaction replaced, or added or removed."""
    kinds = {
        json.loads(line)["adjacency"]
        for line in (run / "privacy" / "ledger.jsonl").read_text().splitlines()
        if line.strip()
    }
    return " and ".join(sorted(kinds))


def load(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    c = json.loads((run / "config.json").read_text())["federation"]
    valid = [
        json.loads(line)
        for line in (run / "progress.jsonl").read_text().splitlines()
        if "valid_NDCG@10" in line
    ]
    return {
        "name": run.name,
        "seed": c["seed"],
        "setting": f"{c['examples']} examples, history {c['history_len']}, {c['accountant']}, "
        f"{adjacency(run)}",
        "budget": m["privacy"]["epsilon_budget"],
        "spent": m["privacy"]["epsilon_max"],
        "delta": m["privacy"]["delta"],
        "test": m["model"]["metrics"]["test"],
        "valid": [v["valid_NDCG@10"] for v in valid],
        "baselines": {k: v["metrics"]["test"]["NDCG@10"] for k, v in m["baselines"].items()},
        "seconds": m["seconds"],
    }


runs = [load(p.parent) for p in sorted(HERE.glob("runs/*/metrics.json"))]
print(
    "| run | setting | seed | epsilon per interaction and silo (budget / spent) "
    "| test NDCG@10 | test HR@10 | valid NDCG@10 (rounds 0 / 5 / 10) | seconds |"
)
print("|---|---|---:|---|---:|---:|---|---:|")
for r in sorted(runs, key=lambda r: (r["setting"], -r["budget"], r["seed"])):
    print(
        f"| `{r['name']}` | {r['setting']} | {r['seed']} | {r['budget']:g} / {r['spent']:.3f} "
        f"at delta {r['delta']:g} | {r['test']['NDCG@10']:.4f} | {r['test']['HR@10']:.4f} "
        f"| {' / '.join(f'{v:.4f}' for v in r['valid'])} | {r['seconds']:.0f} |"
    )
print()
print("| setting | epsilon | runs | median test NDCG@10 | min | max |")
print("|---|---:|---:|---:|---:|---:|")
for setting, eps in sorted(
    {(r["setting"], r["budget"]) for r in runs}, key=lambda k: (k[0], -k[1])
):
    t = [r["test"]["NDCG@10"] for r in runs if (r["setting"], r["budget"]) == (setting, eps)]
    med, lo, hi = statistics.median(t), min(t), max(t)
    print(f"| {setting} | {eps:g} | {len(t)} | {med:.4f} | {lo:.4f} | {hi:.4f} |")
print()
base: dict[str, set[float]] = {}
for r in runs:
    for k, v in r["baselines"].items():
        base.setdefault(k, set()).add(round(v, 4))
print(
    "Baselines on the same split (test NDCG@10, every run that fitted them): "
    + ", ".join(f"{k} {' / '.join(f'{v:.4f}' for v in sorted(vs))}" for k, vs in base.items())
)
