"""ALS and BPR from the `implicit` library (CPU), on the binary training matrix.

BPR trains with one thread: implicit's multi-threaded BPR is Hogwild SGD, whose result changes
from run to run even with a fixed seed (seen: NDCG@10 0.0622 vs 0.0619 on protocol A).

Warm users (``warm=True``) are scored with their learned factors, recomputed from the query
history for ALS (exact fold-in, so a history longer than the training rows is used); users
unseen in training get ALS fold-in, or for BPR the mean of their history items' factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from fedrec.shared.baselines.interactions import history_matrix, train_matrix
from fedrec.shared.splitting import Split


def _fit(factory: Any, split: Split, **params: Any) -> Any:
    """Build and fit an implicit model. implicit runs its own threads and checks, in the
    constructor, that BLAS does not: both happen under a one-thread BLAS limit."""
    with threadpool_limits(1, "blas"):
        model = factory(**params)
        model.fit(train_matrix(split), show_progress=False)
    return model


class ALS:
    def __init__(
        self,
        split: Split,
        *,
        factors: int = 64,
        regularization: float = 0.1,
        alpha: float = 1.0,
        iterations: int = 20,
        seed: int = 0,
    ) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        self.model = _fit(
            AlternatingLeastSquares,
            split,
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
        )
        self.n_items = split.n_items

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        hist = history_matrix(history, self.n_items)
        with threadpool_limits(1, "blas"):
            uf = self.model.recalculate_user(np.arange(len(history)), hist)
        return np.asarray(uf) @ self.model.item_factors.T


class BPR:
    def __init__(
        self,
        split: Split,
        *,
        factors: int = 64,
        learning_rate: float = 0.01,
        regularization: float = 0.01,
        iterations: int = 100,
        seed: int = 0,
    ) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        self.model = _fit(
            BayesianPersonalizedRanking,
            split,
            factors=factors,
            learning_rate=learning_rate,
            regularization=regularization,
            iterations=iterations,
            random_state=seed,
            num_threads=1,
        )

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        items = self.model.item_factors  # (n_items, factors + 1); last column = item bias
        uf = np.zeros((len(users), items.shape[1]), dtype=items.dtype)
        for b, (u, h) in enumerate(zip(users, history, strict=True)):
            if warm[b]:
                uf[b] = self.model.user_factors[u]
            elif h.shape[0]:
                uf[b, :-1] = items[h, :-1].mean(axis=0)
                uf[b, -1] = 1.0
        return uf @ items.T
