"""Random: seeded uniform scores, the "no signal at all" reference.

It matters on protocol B: a model that cannot score cold items gives them equal scores, and the
tie rule (ascending item id) then ranks them in id order, which in ML-100K correlates with
popularity (low ids are early, popular films). Random shows what truly no signal gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrec.shared.splitting import Split


class RandomScores:
    def __init__(self, split: Split, *, seed: int = 0) -> None:
        self.scores = np.random.default_rng(seed).random((split.n_users, split.n_items))

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return self.scores[users]
