"""Partitioning a split's training users into federated clients.

``user`` (default): one client per training user (943 clients on ML-100K).
``silo``: K silos of whole users (a user's data never spans two silos), users shuffled with
``default_rng(seed)`` and split as evenly as possible. Cold users (protocol C) get no client.
"""

from __future__ import annotations

import numpy as np

from fedrec.shared.splitting import Split

SCHEMES = ("user", "silo")


def partition_users(
    split: Split, *, scheme: str = "user", n_silos: int = 10, seed: int = 0
) -> list[np.ndarray]:
    """A list, one entry per client, of the user indices whose data that client holds."""
    users = np.unique(split.train_user)
    if scheme == "user":
        return [np.array([u]) for u in users]
    if scheme == "silo":
        if not 1 <= n_silos <= users.shape[0]:
            raise ValueError(
                f"n_silos={n_silos} must be between 1 and the number of training users "
                f"({users.shape[0]})"
            )
        perm = np.random.default_rng(seed).permutation(users)
        return [np.sort(part) for part in np.array_split(perm, n_silos)]
    raise ValueError(f"partition scheme {scheme!r} is unknown; use one of {SCHEMES}")
