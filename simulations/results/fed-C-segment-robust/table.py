"""Print the README's table from ``attack.json`` (``attack.py``'s output) and each run's
``metrics.json``. Usage: python simulations/results/fed-C-segment-robust/table.py"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]

print(
    "| run | robust | attack | test NDCG@10 k=0 / k=3 | Recall@10 k=0 / k=3 "
    "| the item in the top 10 (k=0 / k=3) | its median rank (k=0) | model alone k=0 / k=3 |"
)
print("|---|---|---|---|---|---|---:|---|")
base = None
for r in json.loads((HERE / "attack.json").read_text()):
    run = Path(r["run"])
    run = run if run.is_absolute() else ROOT / run
    m = json.loads((run / "metrics.json").read_text())
    alone = m["model"]["segment_prior"]["model_alone"]
    base = base or m["baselines"]
    k0, k3 = r["k=0"], r["k=3"]
    cells = [
        f"`{r['run'].split('simulations/results/')[-1]}`",
        r["robust"],
        r["poison"] or "-",
        f"{k0['NDCG@10']:.4f} / {k3['NDCG@10']:.4f}",
        f"{k0['Recall@10']:.4f} / {k3['Recall@10']:.4f}",
        f"{k0['target in top 10']:.0%} / {k3['target in top 10']:.0%}",
        f"{k0['target median rank']:g}",
        f"{alone['k=0']['NDCG@10']:.4f} / {alone['k=3']['NDCG@10']:.4f}",
    ]
    print("| " + " | ".join(cells) + " |")
if base:
    for name in ("popularity", "profile-popularity"):
        b = base[name]["metrics"]
        print(
            f"| {name} (same split) | | | {b['k=0']['NDCG@10']:.4f} / {b['k=3']['NDCG@10']:.4f} "
            f"| {b['k=0']['Recall@10']:.4f} / {b['k=3']['Recall@10']:.4f} | | | |"
        )
