"""Profile-conditioned popularity: what users who share a new user's profile (age band, gender,
occupation, ...) interacted with, shrunk toward global popularity.

    score(item | user) = (c_seg(item) + m * p(item)) / (n_seg + m)

``seg`` is the user's values of the chosen profile ``fields`` (numbers in bands: quantile edges
of the training users' values), ``c_seg`` the segment's training interactions per item, ``n_seg``
their total, ``p`` global popularity as a distribution and ``m`` (``shrink``) a pseudo-count of
interactions: ``m = 0`` is the segment's own popularity, a large ``m`` global popularity. A user
without a profile, or a segment no training user has, is ranked by global popularity.

The history is not used: this is the cold-user reference (protocol C) that a model reading the
profile must beat. Which fields and which ``m`` are chosen on held-out training users
(:func:`fedrec.shared.splitting.holdout_split`), never on test users.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.shared.splitting import Split

GRID_SHRINK = (0.0, 30.0, 300.0, 3000.0)


def _band_edges(values: Sequence[str], bands: int) -> np.ndarray | None:
    """Quantile edges if every value is a number (then the field is banded), else None."""
    try:
        x = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None
    if x.size == 0 or not np.isfinite(x).all():
        return None
    return np.unique(np.quantile(x, np.linspace(0, 1, bands + 1)[1:-1]))


class ProfilePopularity:
    """Scores every item by its popularity among training users of the query user's segment."""

    def __init__(
        self,
        split: Split,
        user_fields: Mapping[int, Mapping[str, str]],
        *,
        fields: Sequence[str],
        shrink: float,
        bands: int = 5,
    ) -> None:
        if shrink < 0:
            raise ValueError(f"shrink={shrink!r} must be >= 0")
        self.fields, self.shrink = tuple(fields), float(shrink)
        raw = [user_fields.get(int(u), {}) for u in split.user_ids]  # by user index
        trained = np.unique(split.train_user)
        self.edges = {
            f: _band_edges([raw[u][f] for u in trained if raw[u].get(f, "").strip()], bands)
            for f in self.fields
        }
        self.keys = [self._key(r) for r in raw]  # segment key per user index (None: no profile)
        n_items = split.n_items
        counts = np.bincount(split.train_item, minlength=n_items).astype(np.float64)
        self.global_counts = counts
        self.p = counts / max(counts.sum(), 1.0)
        self.segments: dict[tuple[str, ...], np.ndarray] = {}
        for key in {self.keys[u] for u in trained} - {None}:
            assert key is not None
            members = np.array([self.keys[u] == key for u in range(len(raw))])
            rows = members[split.train_user]
            self.segments[key] = np.bincount(split.train_item[rows], minlength=n_items).astype(
                np.float64
            )

    def _key(self, fields: Mapping[str, str]) -> tuple[str, ...] | None:
        key = []
        for f in self.fields:
            value = str(fields.get(f, "")).strip()
            if not value:
                return None
            edges = self.edges.get(f)
            if edges is not None:
                try:
                    value = f"band{int(np.searchsorted(edges, float(value), side='right'))}"
                except ValueError:
                    return None
            key.append(value)
        return tuple(key)

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        out = np.empty((len(users), self.p.shape[0]), dtype=np.float64)
        for b, u in enumerate(np.asarray(users).tolist()):
            seg = self.segments.get(self.keys[u]) if self.keys[u] is not None else None
            if seg is None:
                out[b] = self.p
            else:
                out[b] = (seg + self.shrink * self.p) / (seg.sum() + self.shrink or 1.0)
        return out


def field_sets(names: Sequence[str], largest: int = 3) -> list[tuple[str, ...]]:
    """Every non-empty combination of up to ``largest`` profile fields, smallest first."""
    return [c for r in range(1, min(largest, len(names)) + 1) for c in itertools.combinations(
        names, r)]  # fmt: skip
