"""Paired comparison of protocol-A runs against ALS, per query, with a bootstrap over the queries.

    python simulations/results/fed-A-pooled-step/paired.py RUN [RUN ...] > paired.json

For each RUN (a ``fedrec simulate`` protocol-A run whose ``model/`` is on disk): NDCG@10 of every
validation and test query, scored by the saved model as the server's evaluation scores it (its
newest ``history_len`` items; the mean is checked against the run's metrics.json), beside ALS
with the full suite's tuned settings (``suite-full/runs/A-baselines``: 32 factors,
regularization 0.1, alpha 1; the suite's fit is seed 0), fitted here with seeds 0 to 9. For each
ALS seed: the mean paired difference (run - ALS), its 95 % bootstrap interval (10,000 resamples
of the 943 queries, generator seed 0) and the share of resamples at or below 0. The ALS seeds
show how far the baseline's own seed moves it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.shared.baselines.matrix_factorization import ALS
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import per_query_metrics
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.examples import right_aligned
from fedrec.shared.splitting import EvalSet, make_split


class Saved:
    """A saved federated model scoring the catalog from each query's newest items."""

    def __init__(self, run: Path) -> None:
        self.model, _ = load_model(run)
        self.model.eval()
        with torch.no_grad():
            self.items = self.model.item_embeddings()

    @torch.no_grad()
    def score(self, users, history, profiles, warm):  # noqa: ANN001, ANN201
        ctx = torch.as_tensor(right_aligned(history, self.model.cfg.history_len))
        u = self.model.user_embeddings(self.items, ctx, None)
        return self.model.scores(u, self.items).numpy()


def per_query(scorer: Any, es: EvalSet) -> np.ndarray:
    scores = np.asarray(scorer.score(es.users, es.history, es.profiles, es.warm), dtype=float)
    return per_query_metrics(scores.copy(), es, slice(0, len(es)), with_auc=False)["NDCG@10"]


def boot(d: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    means = d[rng.integers(0, len(d), (10000, len(d)))].mean(1)
    return {
        "mean": round(float(d.mean()), 4),
        "ci95": [round(float(np.quantile(means, q)), 4) for q in (0.025, 0.975)],
        "share_at_or_below_0": round(float((means <= 0).mean()), 3),
    }


def main(runs: list[str]) -> None:
    split = make_split(load_dataset(resolve_data_dir("ml-100k")), "A")
    assert split.valid is not None
    sets = {"valid": split.valid, "test": split.tests["test"]}
    als = {s: ALS(split, factors=32, regularization=0.1, alpha=1.0, seed=s) for s in range(10)}
    base = {(s, k): per_query(m, es) for s, m in als.items() for k, es in sets.items()}
    out: list[dict[str, Any]] = [
        {"ALS seed": s} | {k: round(float(base[(s, k)].mean()), 4) for k in sets} for s in als
    ]
    for run in runs:
        saved = Saved(Path(run))
        logged = json.loads((Path(run) / "metrics.json").read_text())["model"]["metrics"]
        row: dict[str, Any] = {"run": run}
        for k, es in sets.items():
            ours = per_query(saved, es)
            row[k] = round(float(ours.mean()), 4)
            if k in logged and abs(logged[k]["NDCG@10"] - ours.mean()) > 5e-5:
                raise SystemExit(f"{run}: {k} NDCG@10 {ours.mean():.5f} here, "
                                 f"{logged[k]['NDCG@10']:.5f} in metrics.json")  # fmt: skip
            rng = np.random.default_rng(0)
            row[f"{k} - ALS"] = {f"ALS seed {s}": boot(ours - base[(s, k)], rng) for s in als}
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
