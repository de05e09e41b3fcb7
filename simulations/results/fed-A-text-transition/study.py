"""Probe: a text-smoothed transition table added to a federated protocol-A model's scores.

    python simulations/results/fed-A-text-transition/study.py RUN [RUN ...] > output.txt

For each RUN (a ``fedrec simulate`` protocol-A run whose ``model/`` is on disk): ``phi(i)`` is
item i's frozen text embedding (the model's own backbone, no adapter: public) or its adapted
embedding (the released model's, post-processing), projected on that table's top-16 principal
directions after centring, scaled to unit length. From the training sequences' consecutive
pairs (a -> b) two (n_items, 16) tables: ``T[b] = sum phi(a)`` (what came before b) and
``S[a] = sum phi(b)`` (what came after a). For a query whose last items are h_1 (newest),
h_2, h_3 the added score of candidate i is ``beta * sum_j w_j (<phi(h_j), T[i]> +
<S[h_j], phi(i)>) / s`` (w = 0.5, 0.3, 0.2; ``last``: the newest item only, w = 1), s the term's
standard deviation over 256 validation queries. ``sigma``: Gaussian noise of that standard
deviation on every coordinate of both tables (for ten silos' independent noise, the standard
deviation of their sum). beta is chosen on the validation queries (NDCG@10); test is printed for
every beta only to report it. Not a mechanism of fedrec: nothing here is accounted.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import EvalSet, evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import frozen_features
from fedrec.shared.splitting import make_split

K = 16
BETAS = (0.0, 0.25, 0.5, 1.0, 2.0)
SIGMAS = (0.0, 4.0, 12.0)
WEIGHTS = {"last": (1.0,), "last3": (0.5, 0.3, 0.2)}


class Fixed:
    """The model's scores for one eval set (computed once), plus an added term."""

    def __init__(self, base: np.ndarray, add) -> None:
        self.base, self.add, self.at = base, add, 0

    def score(self, users, history, profiles, warm):
        rows = slice(self.at, self.at + len(users))
        self.at += len(users)
        return self.base[rows] + self.add(history)


def model_scores(scorer: ModelScorer, es: EvalSet) -> np.ndarray:
    out = []
    for s in range(0, len(es), 256):
        r = slice(s, min(s + 256, len(es)))
        none = [None] * (r.stop - r.start)
        out.append(scorer.score(es.users[r], es.history[r], none, es.warm[r]))
    return np.concatenate(out)


def term(history, w, phi: np.ndarray, T: np.ndarray, S: np.ndarray, f: float = 1.0) -> np.ndarray:
    """The added (queries, n_items) term, times ``f`` (beta over the spread)."""
    out = np.zeros((len(history), phi.shape[0]))
    for j, wj in enumerate(w):
        idx = np.array([h[-1 - j] if len(h) > j else -1 for h in history])
        ii = np.maximum(idx, 0)
        out += wj * (idx >= 0)[:, None] * (phi[ii] @ T.T + S[ii] @ phi.T)
    return f * out


def unit_pcs(emb: np.ndarray) -> np.ndarray:
    emb = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(emb, full_matrices=False)
    phi = emb @ vt[:K].T
    return phi / np.linalg.norm(phi, axis=1, keepdims=True)


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        cfg = json.loads((run / "config.json").read_text())["federation"]
        ds = load_dataset(resolve_data_dir(str(cfg["data"])))
        split = make_split(ds, "A")
        assert split.valid is not None
        model, _ = load_model(run)
        scorer = ModelScorer(model, ProfileBank(model))
        sets = {"valid": split.valid, "test": split.tests["test"]}
        base = {name: model_scores(scorer, es) for name, es in sets.items()}
        hist = split.train_histories()
        a = np.concatenate([h[:-1] for h in hist])
        b = np.concatenate([h[1:] for h in hist])
        with torch.no_grad():
            adapted = model.item_embeddings().double().numpy()[:, : model.dim]
        for feats, emb in (("text", frozen_features(model)), ("adapted", adapted)):
            phi = unit_pcs(emb)
            T0 = np.zeros_like(phi)
            np.add.at(T0, b, phi[a])
            S0 = np.zeros_like(phi)
            np.add.at(S0, a, phi[b])
            for sigma in SIGMAS:
                rng = np.random.default_rng(0)
                T = T0 + rng.normal(0.0, sigma, T0.shape)
                S = S0 + rng.normal(0.0, sigma, S0.shape)
                for ctx, w in WEIGHTS.items():
                    s = float(np.std(term(split.valid.history[:256], w, phi, T, S)))
                    rows = []
                    for beta in BETAS:
                        res = {}
                        for name, es in sets.items():
                            f = beta / s
                            sc = Fixed(base[name], partial(term, w=w, phi=phi, T=T, S=S, f=f))
                            ndcg = evaluate(sc, es, ks=(10,), with_auc=False)["NDCG@10"]
                            res[name] = round(ndcg, 4)
                        rows.append({"beta": beta, "valid": res["valid"], "test": res["test"]})
                    best = max(rows, key=lambda r: r["valid"])  # first best on ties
                    out = {"run": str(run), "phi": feats, "context": ctx, "sigma": sigma,
                           "chosen_on_validation": best, "rows": rows}  # fmt: skip
                    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
