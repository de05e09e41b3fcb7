"""The in-memory data set: interactions in their original row order, item texts, user profiles.

Items are indexed ``0..n_items-1`` in ascending item-id order, so "ties broken by ascending item
id" (docs/evaluation.md) is the same as "ties broken by ascending item index" everywhere downstream.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a ``str.format`` template uses, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(template: str, fields: Mapping[str, str]) -> str:
    """Fill ``template`` from ``fields``; an empty field renders as ``unknown``."""
    values = {k: (v if v.strip() else "unknown") for k, v in fields.items()}
    return template.format(**values).strip()


@dataclass(frozen=True)
class Dataset:
    """Interactions, items and optional user profiles of one data set.

    Interaction arrays are aligned, shape ``(n_interactions,)``, in the original file's row order
    (which breaks timestamp ties, docs/evaluation.md). ``item_ids`` is the sorted catalog.
    """

    name: str
    user_ids: np.ndarray  # (n_interactions,) int64, raw user id
    item_ids_of_interactions: np.ndarray  # (n_interactions,) int64, raw item id
    timestamps: np.ndarray  # (n_interactions,) int64, Unix seconds
    ratings: np.ndarray | None  # (n_interactions,) float64, or None when the file has none
    item_ids: np.ndarray  # (n_items,) int64, ascending
    item_fields: dict[int, dict[str, str]]
    item_text_template: str
    user_fields: dict[int, dict[str, str]] = field(default_factory=dict)
    user_text_template: str | None = None

    @property
    def n_interactions(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def users(self) -> np.ndarray:
        """Sorted unique ids of users that have at least one interaction."""
        return np.unique(self.user_ids)

    @property
    def n_users(self) -> int:
        return int(self.users.shape[0])

    @property
    def item_index(self) -> np.ndarray:
        """``(n_interactions,)`` int64: the catalog index of each interaction's item."""
        return np.searchsorted(self.item_ids, self.item_ids_of_interactions)

    def item_texts(self) -> list[str]:
        """One text per catalog item, in ``item_ids`` order, from ``item_text_template``."""
        return [render(self.item_text_template, self.item_fields[int(i)]) for i in self.item_ids]

    def user_text(self, user_id: int) -> str | None:
        """The profile text of a user, or None when there is no profile for it."""
        fields = self.user_fields.get(int(user_id))
        if fields is None or self.user_text_template is None:
            return None
        return render(self.user_text_template, fields)
