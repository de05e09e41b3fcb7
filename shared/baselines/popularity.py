"""Popularity: score = number of training interactions of the item."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrec.shared.splitting import Split


class ConstantScorer:
    """One score vector for every query (a :class:`~fedrec.shared.evaluation.Scorer`): the
    popularity-style baselines, and a prior scored on its own."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = np.asarray(scores, dtype=np.float64)
        if self.scores.ndim != 1:
            raise ValueError(f"a constant scorer needs one score per item, got {self.scores.shape}")

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return np.broadcast_to(self.scores, (len(users), self.scores.shape[0]))


class Popularity(ConstantScorer):
    def __init__(self, split: Split) -> None:
        super().__init__(np.bincount(split.train_item, minlength=split.n_items))
