"""How training examples are built from a user's time-ordered interactions.

``sequence_examples`` (central training, the reference model): one example per interaction
``t`` of a user, its context being the ``history_len`` interactions before it. One interaction
therefore sits in up to ``1 + history_len`` examples (as a target once, as context up to
``history_len`` times). That is fine without DP; under per-example DP-SGD the privacy unit would
be that group of examples, not the interaction, so federated DP training must build its examples
differently (or account for the group).

``set_examples`` (central training for the cold protocols): one example per interaction, its
context a uniformly random subset of the user's *other* interactions (earlier or later), of a
size drawn uniformly from 0 to ``min(history_len, n - 1)``, kept in time order; resampled every
epoch. Protocol B asks for items anywhere in a user's timeline from all their warm items, and
protocol C for all of a new user's future items from 0 or 3 items: next-item examples teach a
recency weighting and long contexts only, which both tasks punish. Same group size as
``sequence_examples``; no DP.

``disjoint_examples`` (per-interaction DP): each interaction is hashed, by its own (item,
timestamp) and a key, into one of ``slots`` groups; a non-empty group is one example whose
target is its latest interaction and whose context is the group's other interactions. Every
interaction is in exactly one example, and which example does not depend on any other
interaction, so adding or removing one interaction changes exactly one example: per-example
DP-SGD is then DP for the interaction (add/remove adjacency), with no group-privacy factor.
The price: at most ``slots`` examples per user, and contexts that are random subsets of the
history rather than its most recent items.
"""

from __future__ import annotations

import hashlib
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


def set_examples(
    histories: Sequence[np.ndarray],
    history_len: int,
    rng: np.random.Generator,
    max_context: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user index u and position p: target = [u][p], context = a random subset of the other
    positions of u, of uniform random size in ``0..min(m, len - 1)``, in time order, where
    ``m = max_context or history_len`` (a small ``m`` trains for users who gave a few items).

    Returns ``users`` (n,), ``targets`` (n,), ``context`` (n, L) right-aligned with -1 padding.
    """
    users, targets, contexts = [], [], []
    for u, seq in enumerate(histories):
        seq = np.asarray(seq, dtype=np.int64)
        n = seq.shape[0]
        for p in range(n):
            others = np.delete(np.arange(n), p)
            size = int(rng.integers(0, min(max_context or history_len, history_len, n - 1) + 1))
            pick = np.sort(rng.choice(others, size=size, replace=False)) if size else others[:0]
            users.append(u)
            targets.append(int(seq[p]))
            contexts.append(seq[pick])
    return (
        np.asarray(users, dtype=np.int64),
        np.asarray(targets, dtype=np.int64),
        right_aligned(contexts, history_len),
    )


def slot_of(item: int, timestamp: int, *, key: int, slots: int) -> int:
    """The group of one interaction: a keyed hash of that interaction alone."""
    digest = hashlib.blake2b(f"{key}:{item}:{timestamp}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % slots


def disjoint_examples(
    items: np.ndarray, timestamps: np.ndarray, *, slots: int, history_len: int, key: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One user's interactions (time order) -> ``targets`` (n_ex,), ``context`` (n_ex, L).

    Examples come in slot order; contexts are right-aligned in time order, -1 padded, and keep
    the group's ``history_len`` most recent members before the target.
    """
    if slots < 1:
        raise ValueError(f"slots={slots} must be >= 1")
    groups: dict[int, list[int]] = {}
    for j, (i, t) in enumerate(zip(items.tolist(), timestamps.tolist(), strict=True)):
        groups.setdefault(slot_of(i, t, key=key, slots=slots), []).append(j)
    targets, contexts = [], []
    for slot in sorted(groups):
        members = groups[slot]  # positions, ascending = time order
        targets.append(int(items[members[-1]]))
        contexts.append(items[members[:-1]])
    return np.asarray(targets, dtype=np.int64), right_aligned(contexts, history_len)
