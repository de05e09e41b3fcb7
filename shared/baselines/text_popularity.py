"""Text-popularity: popularity, with a never-trained item's count predicted from its text.

A trained item scores ``log(1 + n_i)``, its training interactions (popularity's order). An item
never trained scores the ridge prediction of that value from its frozen, normalized text
embedding (the zero-shot baseline's), fitted on the trained items with the strength chosen by
5-fold cross-validation on them (:func:`fedrec.shared.model.cold_prior.fit_text_prior`). On
protocol B it is the reference for cold items that fedrec's cold prior must add to: how far
popularity read off the catalog text goes by itself.
"""

from __future__ import annotations

import numpy as np

from fedrec.shared.backbone import DEFAULT_BACKBONE, TextEncoder
from fedrec.shared.baselines.popularity import ConstantScorer
from fedrec.shared.model.cold_prior import fit_text_prior
from fedrec.shared.splitting import Split


class TextPopularity(ConstantScorer):
    def __init__(self, split: Split, item_texts: list[str], *, backbone: str = DEFAULT_BACKBONE):
        counts = np.bincount(split.train_item, minlength=split.n_items)
        feats = TextEncoder(backbone).encode_cached(item_texts)  # (n_items, dim), unit rows
        trained = counts > 0
        self.prior = fit_text_prior(feats, np.log1p(counts), trained)
        super().__init__(np.where(trained, np.log1p(counts), self.prior.predict(feats)))
