"""A data set's vital statistics, as printed by ``fedrec data validate DIR``."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedrec.shared.data.dataset import Dataset, template_fields


def summarize(ds: Dataset) -> dict[str, Any]:
    per_user = np.bincount(np.searchsorted(ds.users, ds.user_ids))
    used = template_fields(ds.item_text_template)
    complete = sum(all(f[c].strip() for c in used) for f in ds.item_fields.values())
    with_text = sum(any(v.strip() for v in f.values()) for f in ds.item_fields.values())
    with_profile = int(np.isin(ds.users, list(ds.user_fields)).sum()) if ds.user_fields else 0
    return {
        "name": ds.name,
        "users": ds.n_users,
        "items": ds.n_items,
        "items_with_interactions": int(np.unique(ds.item_ids_of_interactions).shape[0]),
        "interactions": ds.n_interactions,
        "density": round(ds.n_interactions / max(ds.n_users * ds.n_items, 1), 6),
        "interactions_per_user": {
            "min": int(per_user.min()),
            "median": float(np.median(per_user)),
            "max": int(per_user.max()),
        },
        "item_text_coverage": round(with_text / ds.n_items, 4),
        "item_template_complete": round(complete / ds.n_items, 4),
        "users_with_profile": with_profile,
        "has_ratings": ds.ratings is not None,
        "item_text_template": ds.item_text_template,
        "example_item_text": ds.item_texts()[0],
    }
