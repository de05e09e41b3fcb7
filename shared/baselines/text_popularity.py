"""Text-popularity: popularity, with a never-trained item's count predicted from its text.

A trained item scores ``log(1 + n_i)``, its training interactions (popularity's order). An item
never trained scores the ridge prediction of that value from its frozen, normalized text
embedding (the zero-shot baseline's), fitted on the trained items with the strength chosen by
5-fold cross-validation on them (:func:`fedrec.shared.model.cold_prior.fit_text_prior`). On
protocol B it is the reference for cold items that fedrec's cold prior must add to: how far
popularity read off the catalog text goes by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrec.shared.backbone import DEFAULT_BACKBONE, TextEncoder
from fedrec.shared.model.cold_prior import fit_text_prior
from fedrec.shared.splitting import Split


class TextPopularity:
    def __init__(self, split: Split, item_texts: list[str], *, backbone: str = DEFAULT_BACKBONE):
        counts = np.bincount(split.train_item, minlength=split.n_items)
        feats = TextEncoder(backbone).encode_cached(item_texts)  # (n_items, dim), unit rows
        trained = counts > 0
        self.prior = fit_text_prior(feats, np.log1p(counts), trained)
        self.scores = np.where(trained, np.log1p(counts), self.prior.predict(feats))

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return np.broadcast_to(self.scores, (len(users), self.scores.shape[0]))
