"""How training examples are built from a user's time-ordered interactions.

``sequence_examples`` (central training, the reference model): one example per interaction
``t`` of a user, its context being the ``history_len`` interactions before it. One interaction
therefore sits in up to ``1 + history_len`` examples (as a target once, as context up to
``history_len`` times). That is fine without DP; under per-example DP-SGD the privacy unit would
be that group of examples, not the interaction, so federated DP training must build its examples
differently (or account for the group): see :mod:`fedrec.client` (federation issue).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def right_aligned(histories: Sequence[np.ndarray], length: int) -> np.ndarray:
    """``(n, length)`` int64: the last ``length`` items of each history, right-aligned, -1 pad."""
    out = np.full((len(histories), length), -1, dtype=np.int64)
    for r, h in enumerate(histories):
        tail = np.asarray(h, dtype=np.int64)[-length:]
        if tail.size:
            out[r, length - tail.size :] = tail
    return out


def sequence_examples(
    histories: Sequence[np.ndarray], history_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user index u and position p: context = history[u][max(0, p-L):p], target = [u][p].

    Returns ``users`` (n,), ``targets`` (n,), ``context`` (n, L) right-aligned with -1 padding.
    Position 0 gives an example with an empty context (it trains bias and profile paths).
    """
    users, targets, contexts = [], [], []
    for u, seq in enumerate(histories):
        for p in range(len(seq)):
            users.append(u)
            targets.append(int(seq[p]))
            contexts.append(seq[max(0, p - history_len) : p])
    return (
        np.asarray(users, dtype=np.int64),
        np.asarray(targets, dtype=np.int64),
        right_aligned(contexts, history_len),
    )
