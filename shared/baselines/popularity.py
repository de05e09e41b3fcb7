"""Popularity: score = number of training interactions of the item."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrec.shared.splitting import Split


class Popularity:
    def __init__(self, split: Split) -> None:
        self.counts = np.bincount(split.train_item, minlength=split.n_items).astype(np.float64)

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), self.counts.shape[0]))
