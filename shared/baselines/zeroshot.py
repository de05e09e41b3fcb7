"""Zero-shot text model: the untrained backbone, no collaborative signal at all.

Item = mean-pooled, normalized embedding of its text. User = mean of its history items'
embeddings, or, with an empty history, the embedding of its profile text. Score = cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrec.shared.backbone import DEFAULT_BACKBONE, TextEncoder


class ZeroShotText:
    def __init__(self, item_texts: list[str], *, backbone: str = DEFAULT_BACKBONE) -> None:
        self.encoder = TextEncoder(backbone)
        self.items = self.encoder.encode_cached(item_texts)  # (n_items, dim), unit rows

    def user_vectors(
        self, history: Sequence[np.ndarray], profiles: Sequence[str | None]
    ) -> np.ndarray:
        users = np.zeros((len(history), self.items.shape[1]), dtype=np.float32)
        need = [(b, p) for b, (h, p) in enumerate(zip(history, profiles, strict=True))
                if h.shape[0] == 0 and p]  # fmt: skip
        if need:
            users[[b for b, _ in need]] = self.encoder.encode([p for _, p in need if p])
        for b, h in enumerate(history):
            if h.shape[0]:
                users[b] = self.items[h].mean(axis=0)
        norms = np.linalg.norm(users, axis=1, keepdims=True)
        return users / np.maximum(norms, 1e-12)

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return self.user_vectors(history, profiles) @ self.items.T
