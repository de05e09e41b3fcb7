"""Protocol A: a federated model's scores plus ``w x log(1 + popularity)``, exact or as ten silos
would release it (Gaussian noise ``z`` per item and silo), ``w`` read on validation.

    python simulations/results/fed-A-popularity-blend/pop_blend.py RUN > output.txt

RUN is a ``fedrec simulate`` run on ML-100K protocol A with its model files. Every query is
scored through the public ``Recommender.score_batch`` (the history items excluded), NDCG@10 on
the validation and test queries; the noisy variant is averaged over 5 noise draws (seeds 0-4).
A probe, not a mechanism: nothing here is released or accounted.
"""

from __future__ import annotations

import sys

import numpy as np

from fedrec.shared import metrics as M
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import per_query_metrics
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.inference import Recommender
from fedrec.shared.splitting import EvalSet, make_split

WEIGHTS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SILOS = 10


def main() -> None:
    rec = Recommender.load(sys.argv[1])
    ds = load_dataset(resolve_data_dir("ml-100k"))
    split = make_split(ds, "A")
    assert split.valid is not None
    ids = ds.item_ids
    counts = np.bincount(split.train_item, minlength=split.n_items).astype(float)
    sets = {"valid": split.valid, "test": split.tests["test"]}

    def model_scores(es: EvalSet) -> np.ndarray:
        parts = [
            rec.score_batch([[int(ids[i]) for i in h] for h in es.history[s : s + 256]])
            for s in range(0, len(es), 256)
        ]
        return np.concatenate(parts).astype(np.float64)

    def ndcg(scores: np.ndarray, es: EvalSet) -> float:
        out = per_query_metrics(scores.copy(), es, slice(0, len(es)), with_auc=False)
        return M.mean(out["NDCG@10"])

    scores = {k: model_scores(es) for k, es in sets.items()}
    print("model alone:", {k: round(ndcg(scores[k], sets[k]), 4) for k in sets})
    print(f"spread of the model's scores (std over items, median query): "
          f"{float(np.median(scores['valid'].std(1))):.3f}")  # fmt: skip
    for z in (0.0, 2.0):
        table: dict[float, dict[str, list[float]]] = {w: {k: [] for k in sets} for w in WEIGHTS}
        for draw in range(5 if z else 1):
            noise = np.random.default_rng(draw).normal(0, z * np.sqrt(SILOS), counts.shape)
            log_pop = np.log(np.maximum(counts + noise, 0.0) + 1.0)
            for w in WEIGHTS:
                for k, es in sets.items():
                    table[w][k].append(ndcg(scores[k] + w * log_pop, es))
        print(f"z = {z} per silo (valid / test NDCG@10 by w):")
        for w in WEIGHTS:
            print(f"  w = {w}: {np.mean(table[w]['valid']):.4f} / {np.mean(table[w]['test']):.4f}")


if __name__ == "__main__":
    main()
