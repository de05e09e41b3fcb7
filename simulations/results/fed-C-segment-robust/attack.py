"""What one silo's promoted counts do to the segment prior's new users, and what robust
aggregation keeps of it. Usage (from the repository, after ``fedrec data fetch ml-100k``):

    python simulations/results/fed-C-segment-robust/attack.py RUN [RUN ...] > attack.json

Each RUN is a protocol-C ``fedrec simulate`` run with ``segment-prior`` (its README gives the
commands). For every test query of protocol C (a new user, k = 0 or 3 first items) the public
``Recommender.cold_start(segment=...)`` ranks the whole catalog; printed per run and k: NDCG@10
and Recall@10 (as the run's ``metrics.json``), and for the attacked item (the catalog's last
item, the one the ``promote`` attack pushes) the share of queries with it in the top 10 and
its median rank (1 = first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared import metrics as M
from fedrec.shared.data import load_dataset
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.inference import Recommender
from fedrec.shared.splitting import make_split


def measure(run: Path) -> dict[str, Any]:
    fed = json.loads((run / "config.json").read_text())["federation"]
    ds = load_dataset(resolve_data_dir(str(fed["data"])))
    split = make_split(ds, str(fed["protocol"]))
    rec = Recommender.load(run)
    if rec.segment is None:
        raise SystemExit(f"{run}: {rec.segment_error or 'no segment prior'}")
    ids = split.item_ids
    target = int(ids[-1])
    out: dict[str, Any] = {
        "run": str(run),
        "robust": fed["robust"],
        "poison": fed["poison"],
        "target_item": target,
    }
    evaluated = json.loads((run / "metrics.json").read_text())["model"]["metrics"]
    for name, q in split.tests.items():
        hits, n_rel, ranks = [], [], []
        for b in range(len(q)):
            fields = ds.user_fields.get(int(split.user_ids[q.users[b]])) or {}
            segment = {f: fields[f] for f in rec.segment.fields if f in fields}
            given = [int(ids[i]) for i in q.history[b]]
            ranked = rec.cold_start(history=given, k=len(ids), segment=segment)
            order = [r.item_id for r in ranked]
            relevant = {int(ids[i]) for i in q.relevant[b]}
            hits.append([i in relevant for i in order[:10]] + [False] * (10 - len(order[:10])))
            n_rel.append(len(relevant))
            ranks.append(order.index(target) + 1 if target in order else len(ids) + 1)
        h, n, r = np.array(hits, dtype=bool), np.array(n_rel), np.array(ranks)
        out[name] = {
            "NDCG@10": round(M.mean(M.ndcg(h, n, 10)), 4),
            "Recall@10": round(M.mean(M.recall(h, n, 10)), 4),
            "metrics.json NDCG@10": round(float(evaluated[name]["NDCG@10"]), 4),
            "target in top 10": round(float((r <= 10).mean()), 4),
            "target median rank": float(np.median(r)),
            "n_queries": len(q),
        }
    return out


if __name__ == "__main__":
    print(json.dumps([measure(Path(a)) for a in sys.argv[1:]], indent=1))
