"""Item-kNN (cosine): score(i) = sum over history items j of sim(i, j), top-``neighbors`` pruned."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrec.shared.baselines.interactions import history_matrix, train_matrix
from fedrec.shared.splitting import Split


class ItemKNN:
    def __init__(self, split: Split, *, neighbors: int = 100) -> None:
        x = train_matrix(split).astype(np.float64)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel())  # (n_items,)
        sim = (x.T @ x).toarray()  # (n_items, n_items) co-occurrence counts
        sim /= np.maximum(np.outer(norms, norms), 1e-12)
        np.fill_diagonal(sim, 0.0)
        if neighbors < sim.shape[0]:
            # keep each item's `neighbors` most similar items (column-wise pruning)
            cut = np.partition(sim, -neighbors, axis=0)[-neighbors]
            sim[sim < cut[None, :]] = 0.0
        self.sim = sim
        self.n_items = split.n_items

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return np.asarray(history_matrix(history, self.n_items) @ self.sim)
