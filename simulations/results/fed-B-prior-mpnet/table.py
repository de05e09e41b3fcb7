"""Print this folder's tables from its runs' metrics.json and reprior.jsonl.

python simulations/results/fed-B-prior-mpnet/table.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("Recall@10", "NDCG@10", "MRR@10", "Recall@20")


def _row(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    cfg = json.loads((run / "config.json").read_text())["federation"]
    prior = m["model"]["cold_prior"]
    own = prior.get("own_backbone")
    return {
        "run": run.name,
        "seed": cfg["seed"],
        "prior": prior.get("backbone", cfg["backbone"]),  # runs before the key: their own
        "metrics": {k: m["model"]["metrics"]["cold_items"][k] for k in KEYS},
        "own": {k: own["metrics"]["cold_items"][k] for k in KEYS} if own else None,
        "epsilon": m["privacy"]["epsilon_max"],
        "seconds": m["seconds"],
    }


def main() -> None:
    runs = sorted((HERE / "runs").glob("*-prior-seed*"))  # the federated runs
    rows = [_row(r) for r in runs if (r / "metrics.json").is_file()]
    print("Runs (test, cold items; `own` = the same model with the prior on its own MiniLM):\n")
    print("| run | seed | prior read by | Recall@10 | NDCG@10 | MRR@10 | Recall@20 "
          "| own-MiniLM prior Recall@10 / NDCG@10 | epsilon | seconds |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        own = f"{r['own']['Recall@10']:.4f} / {r['own']['NDCG@10']:.4f}" if r["own"] else ""
        vals = " | ".join(f"{r['metrics'][k]:.4f}" for k in KEYS)
        print(f"| `{r['run']}` | {r['seed']} | {r['prior']} | {vals} | {own} "
              f"| {r['epsilon']:.3f} | {r['seconds']:.0f} |")  # fmt: skip
    print("\nMedians over the runs of each setting (Recall@10 / NDCG@10):\n")
    for prefix in ("minilm-prior", "mpnet-prior"):
        sel = [r for r in rows if r["run"].startswith(prefix)]
        if not sel:
            continue
        med = {k: statistics.median(r["metrics"][k] for r in sel) for k in ("Recall@10", "NDCG@10")}
        line = (
            f"- `{prefix}-seed*` ({len(sel)} runs): {med['Recall@10']:.4f} / {med['NDCG@10']:.4f}"
        )
        owns = [r["own"] for r in sel if r["own"]]
        if owns:
            o = {k: statistics.median(x[k] for x in owns) for k in ("Recall@10", "NDCG@10")}
            gains = [r["metrics"]["Recall@10"] - r["own"]["Recall@10"] for r in sel if r["own"]]
            line += (f"; the same models with the MiniLM prior {o['Recall@10']:.4f} / "
                     f"{o['NDCG@10']:.4f}; paired Recall@10 gains "
                     + ", ".join(f"{g:+.4f}" for g in gains))  # fmt: skip
        print(line)
        first = [r for r in sel if r["seed"] in (0, 1, 2)]
        if len(first) < len(sel):
            m3 = {
                k: statistics.median(r["metrics"][k] for r in first)
                for k in ("Recall@10", "NDCG@10")
            }
            print(f"  - seeds 0, 1, 2 only: {m3['Recall@10']:.4f} / {m3['NDCG@10']:.4f}")
    probe = HERE / "reprior.jsonl"
    if probe.is_file():
        print("\nProbe (`reprior.py` on the `minilm-prior-seed*` models, Recall@10 / NDCG@10):\n")
        print("| run | MiniLM prior (as run) | mpnet prior | no prior |")
        print("|---|---|---|---|")
        for line in probe.read_text().splitlines():
            d = json.loads(line)
            cells = [
                f"{d[k]['Recall@10']:.4f} / {d[k]['NDCG@10']:.4f}"
                for k in ("own_prior", "other_prior", "no_prior")
            ]
            print(f"| `{Path(d['run']).name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
