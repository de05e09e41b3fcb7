"""Sparse user-item matrices from splits and query histories."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from fedrec.shared.splitting import Split


def train_matrix(split: Split) -> sp.csr_matrix:
    """``(n_users, n_items)`` binary CSR of the training interactions."""
    ones = np.ones(split.train_user.shape[0], dtype=np.float32)
    m = sp.csr_matrix(
        (ones, (split.train_user, split.train_item)),
        shape=(split.n_users, split.n_items),
    )
    m.data[:] = 1.0  # repeated (user, item) pairs count once
    return m


def history_matrix(history: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """``(len(history), n_items)`` binary CSR, one row per query history."""
    rows = np.repeat(np.arange(len(history)), [h.shape[0] for h in history])
    cols = np.concatenate(history) if history else np.empty(0, dtype=np.int64)
    m = sp.csr_matrix(
        (np.ones(rows.shape[0], dtype=np.float32), (rows, cols)), shape=(len(history), n_items)
    )
    m.data[:] = 1.0
    return m
