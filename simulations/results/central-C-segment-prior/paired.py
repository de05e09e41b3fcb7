"""Paired comparison of protocol-C runs with the segment prior against profile-popularity and
popularity, per query, with a bootstrap over the queries.

    python simulations/results/central-C-segment-prior/paired.py RUN [RUN ...] > paired.json

For each RUN (``train-central`` with ``train.segment_prior``, or ``fedrec simulate`` with
``segment-prior``): NDCG@10 of every protocol-C test query ranked through the public
``Recommender.cold_start(segment=...)`` (which reproduces the runs' metrics.json,
``../fed-C-segment-prior/recommend_api.json``), beside the suite's profile-popularity (age and
gender, shrinkage 30: its choice on the holdout) and popularity on the same queries: the mean
paired difference, its 95 % bootstrap interval (10,000 resamples of the queries, seed 0) and the
share of resamples at or below 0. A central run is also scored on its holdout's pseudo-cold
users (10 % of the trained users, seed 1), whose interactions its model and prior never saw; a
federated run's prior counts every trained user, so it gets no validation rows here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import numpy as np

from fedrec.shared import metrics as M
from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import per_query_metrics
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.inference import Recommender
from fedrec.shared.model.run_central import with_profile_template
from fedrec.shared.splitting import EvalSet, Split, holdout_split, make_split


def by_length(es: EvalSet) -> dict[str, EvalSet]:
    out = {}
    for k in sorted({len(h) for h in es.history}):
        idx = [q for q in range(len(es)) if len(es.history[q]) == k]
        out[f"k={k}"] = dataclasses.replace(
            es, users=es.users[idx], history=[es.history[q] for q in idx],
            exclude=[es.exclude[q] for q in idx], relevant=[es.relevant[q] for q in idx],
            warm=es.warm[idx], profiles=[es.profiles[q] for q in idx],
        )  # fmt: skip
    return out


def boot(d: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    means = d[rng.integers(0, len(d), (10000, len(d)))].mean(1)
    return {
        "mean": round(float(d.mean()), 4),
        "ci95": [round(float(np.quantile(means, q)), 4) for q in (0.025, 0.975)],
        "share_at_or_below_0": round(float((means <= 0).mean()), 3),
    }


def one(run: str) -> dict[str, Any]:
    cfg = json.loads(open(f"{run}/config.json").read())
    central = "federation" not in cfg
    ds = load_dataset(resolve_data_dir("ml-100k"))
    if central:  # the profile texts as the run rendered them
        ds = with_profile_template(ds, cfg["model"]["profile_template"])
    split = make_split(ds, "C")
    fit = holdout_split(split, 0.1, [ds.user_text(int(u)) for u in split.user_ids], seed=1)
    rec = Recommender.load(run)
    if rec.segment is None:
        raise SystemExit(f"{run}: {rec.segment_error or 'the run has no segment prior'}")
    fields_of_prior = rec.segment.fields
    ids = ds.item_ids

    def ours(es: EvalSet, sp: Split) -> np.ndarray:
        out = []
        for b in range(len(es)):
            fields = ds.user_fields.get(int(sp.user_ids[es.users[b]])) or {}
            top = rec.cold_start(
                profile=es.profiles[b] if rec.uses_profile else None,
                history=[int(ids[i]) for i in es.history[b]],
                k=10,
                segment={f: fields[f] for f in fields_of_prior if f in fields},
            )
            relevant = {int(ids[i]) for i in es.relevant[b]}
            hits = np.array([[r.item_id in relevant for r in top]])
            out.append(float(M.ndcg(hits, np.array([len(relevant)]), 10)[0]))
        return np.array(out)

    def base(model: Any, es: EvalSet) -> np.ndarray:
        scores = np.asarray(model.score(es.users, es.history, es.profiles, es.warm), dtype=float)
        return per_query_metrics(scores.copy(), es, slice(0, len(es)), with_auc=False)["NDCG@10"]

    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"run": run}
    parts = [("test", split, split.tests)]
    if central:
        assert fit.valid is not None
        parts.append(("valid", fit, by_length(fit.valid)))
    for name, sp, sets in parts:
        pp = ProfilePopularity(sp, ds.user_fields, fields=("age", "gender"), shrink=30.0)
        pop = Popularity(sp)
        for k, es in sets.items():
            a, p, g = ours(es, sp), base(pp, es), base(pop, es)
            result[f"{name} {k}"] = {
                "queries": len(es),
                "run": round(float(a.mean()), 4),
                "profile-popularity": round(float(p.mean()), 4),
                "popularity": round(float(g.mean()), 4),
                "run - profile-popularity": boot(a - p, rng),
                "run - popularity": boot(a - g, rng),
            }
    return result


if __name__ == "__main__":
    print(json.dumps([one(run) for run in sys.argv[1:]], indent=1))
