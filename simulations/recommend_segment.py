"""The public ``Recommender.cold_start(segment=...)`` against a federated run's own evaluation.

``python -m fedrec.simulations.recommend_segment RUN [RUN ...]``: each RUN is a protocol-C
``fedrec simulate`` run trained with ``segment-prior`` (or a ``train-central`` run with
``train.segment_prior``). For every test query of protocol C (a new
user, their profile fields and their first k = 0 or 3 items) it ranks with ``cold_start()`` given
the user's segment fields, and prints NDCG@10 and Recall@10 per k beside the values in the run's
``metrics.json``: they must agree (the API ranks new users as the run's evaluation did). Result:
``simulations/results/fed-C-segment-prior/recommend_api.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared import metrics as M
from fedrec.shared.data import load_dataset
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.inference import Recommender
from fedrec.shared.model.run_central import with_profile_template
from fedrec.shared.splitting import Split, make_split


def api_metrics(run: Path, ds: Dataset, split: Split, k: int = 10) -> dict[str, dict[str, float]]:
    """NDCG@k and Recall@k per test set of ``split``, ranked one query at a time by the public
    ``cold_start()`` with each user's segment fields (and profile text, for a model that reads
    it)."""
    rec = Recommender.load(run)
    if rec.segment is None:
        raise SystemExit(f"{run}: {rec.segment_error or 'the run has no segment prior'}")
    ids = ds.item_ids
    out: dict[str, dict[str, float]] = {}
    for name, q in split.tests.items():
        hits, n_rel = [], []
        for b in range(len(q)):
            fields = ds.user_fields.get(int(split.user_ids[q.users[b]])) or {}
            segment = {f: fields[f] for f in rec.segment.fields if f in fields}
            profile = q.profiles[b] if rec.uses_profile and q.profiles else None
            top = rec.cold_start(
                profile=profile,
                history=[int(ids[i]) for i in q.history[b]],
                k=k,
                segment=segment,
            )
            relevant = {int(ids[i]) for i in q.relevant[b]}
            hits.append([r.item_id in relevant for r in top] + [False] * (k - len(top)))
            n_rel.append(len(relevant))
        h, n = np.array(hits, dtype=bool), np.array(n_rel)
        out[name] = {
            f"NDCG@{k}": M.mean(M.ndcg(h, n, k)),
            f"Recall@{k}": M.mean(M.recall(h, n, k)),
            "n_queries": len(q),
        }
    return out


def compare(run: Path) -> dict[str, Any]:
    """``api_metrics`` beside the run's own ``metrics.json``."""
    config: dict[str, Any] = json.loads((run / "config.json").read_text())
    if "federation" in config:  # fedrec simulate
        fed = config["federation"]
        ds = load_dataset(resolve_data_dir(str(fed["data"])))
        protocol = str(fed["protocol"])
    else:  # fedrec train-central: its profile texts as it rendered them
        ds = load_dataset(resolve_data_dir(str(config["data"])))
        ds = with_profile_template(ds, str(config["model"]["profile_template"]))
        protocol = str(config["protocol"])
    split = make_split(ds, protocol)
    api = api_metrics(run, ds, split)
    evaluated = json.loads((run / "metrics.json").read_text())["model"]["metrics"]
    report: dict[str, Any] = {"run": str(run)}
    for name, values in api.items():
        report[name] = {
            metric: {
                "cold_start()": round(value, 4),
                "metrics.json": round(float(evaluated[name][metric]), 4),
            }
            for metric, value in values.items()
            if metric != "n_queries"
        } | {"queries": values["n_queries"]}
    return report


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m fedrec.simulations.recommend_segment RUN [RUN ...]")
    print(json.dumps([compare(Path(run)) for run in sys.argv[1:]], indent=1))


if __name__ == "__main__":
    main()
