"""Evaluation protocols A, B, C (docs/evaluation.md), as pure functions of a :class:`Dataset`.

Conventions shared by all protocols:

* users are indexed ``0..n_users-1`` in ascending user id, items in ascending item id;
* a user's history is in time order: timestamp, then the original file's row order (a stable
  sort, RecBole's convention: 415 of ML-100K's 943 users have ties in their last second);
* seeds: ``numpy.random.default_rng(0)`` over the sorted ids, a fresh generator per protocol.

A (warm, leave-last-out): last -> test, second last -> validation, rest -> train. A user with two
interactions gets no validation item; a user with one keeps it in train.
B (cold items): the first 20% of the permuted item ids lose all interactions from training; each
user with a cold interaction ranks the cold pool from its warm history.
C (cold users): the first 10% of the permuted user ids never train; each is given its profile and
its first k interactions (k = 0 and 3) and ranks all items but those.

Run: ``fedrec baselines --protocol A --out runs/baselines-A``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedrec.shared.data.dataset import Dataset
from fedrec.shared.data.errors import DataError

PROTOCOLS = ("A", "B", "C")
COLD_ITEM_FRACTION = 0.2
COLD_USER_FRACTION = 0.1
COLD_USER_KS = (0, 3)


@dataclass(frozen=True)
class EvalSet:
    """Ranking queries: one per evaluated user.

    ``history[q]`` (time order) is what a model may read for query q; ``exclude[q]`` are removed
    from the ranking; ``relevant[q]`` are the targets. ``candidates`` restricts the ranking to a
    pool (protocol B); None means the whole catalog. ``warm[q]`` says whether the user trained.
    """

    name: str
    users: np.ndarray  # (n_queries,) user index
    history: list[np.ndarray]
    exclude: list[np.ndarray]
    relevant: list[np.ndarray]
    warm: np.ndarray  # (n_queries,) bool
    candidates: np.ndarray | None = None
    profiles: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.users.shape[0])


@dataclass(frozen=True)
class Split:
    """Train interactions (user index, item index, timestamp) in per-user time order + eval sets."""

    protocol: str
    user_ids: np.ndarray  # (n_users,) raw ids; position = user index
    item_ids: np.ndarray  # (n_items,) raw ids; position = item index
    train_user: np.ndarray  # (n_train,)
    train_item: np.ndarray  # (n_train,)
    train_time: np.ndarray  # (n_train,)
    valid: EvalSet | None
    tests: dict[str, EvalSet]
    cold_items: np.ndarray | None = None  # item indices never seen in training (B)
    cold_users: np.ndarray | None = None  # user indices never seen in training (C)

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    def train_histories(self) -> list[np.ndarray]:
        """Per user index, its train item indices in time order (empty for cold users)."""
        bounds = np.searchsorted(self.train_user, np.arange(self.n_users + 1))
        return [self.train_item[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]


def time_ordered(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interactions sorted by (user, timestamp, original row).

    Returns user index, item index, timestamp (each ``(n_interactions,)``) and the sorted user ids.
    """
    user_ids = ds.users
    u = np.searchsorted(user_ids, ds.user_ids)
    rows = np.arange(ds.n_interactions)
    order = np.lexsort((rows, ds.timestamps, u))  # last key is primary
    return u[order], ds.item_index[order], ds.timestamps[order], user_ids


def _user_bounds(u: np.ndarray, n_users: int) -> np.ndarray:
    return np.searchsorted(u, np.arange(n_users + 1))


def cold_ids(ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The first ``int(fraction * n)`` of ``default_rng(seed).permutation(sorted ids)``."""
    perm = np.random.default_rng(seed).permutation(np.sort(ids))
    return perm[: int(fraction * ids.shape[0])]


def _cold_item_queries(
    items: np.ndarray, held: np.ndarray, bounds: np.ndarray
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Protocol B's queries: each user with a ``held`` interaction ranks from its other items;
    relevant = its held items. ``items``/``held`` per-user time order, ``bounds`` per user."""
    users, hist, rel = [], [], []
    for x in range(bounds.shape[0] - 1):
        seq, c = items[bounds[x] : bounds[x + 1]], held[bounds[x] : bounds[x + 1]]
        if c.any():
            users.append(x)
            hist.append(seq[~c])
            rel.append(np.unique(seq[c]))
    return users, hist, rel


def _cold_user_queries(
    items: np.ndarray, bounds: np.ndarray, cold: np.ndarray, k: int
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Protocol C's queries: each ``cold`` user is given its first ``k`` items; relevant = the
    rest (those with nothing left are skipped)."""
    users, hist, rel = [], [], []
    for x in cold:
        seq = items[bounds[x] : bounds[x + 1]]
        given = seq[:k]
        relevant = np.setdiff1d(seq[k:], given)
        if relevant.size:
            users.append(int(x))
            hist.append(given)
            rel.append(relevant)
    return users, hist, rel


def _profiles(ds: Dataset, users: np.ndarray, user_ids: np.ndarray) -> list[str | None]:
    return [ds.user_text(int(user_ids[u])) for u in users]


def protocol_a(ds: Dataset) -> Split:
    """Warm leave-last-out."""
    u, i, t, user_ids = time_ordered(ds)
    bounds = _user_bounds(u, user_ids.shape[0])
    keep = np.ones(u.shape[0], dtype=bool)
    val_q, test_q = [], []
    for x in range(user_ids.shape[0]):
        lo, hi = bounds[x], bounds[x + 1]
        n = hi - lo
        if n >= 2:
            keep[hi - 1] = False
            test_q.append((x, lo, hi - 1, hi - 1))  # history rows [lo, hi-1), target row hi-1
        if n >= 3:
            keep[hi - 2] = False
            val_q.append((x, lo, hi - 2, hi - 2))

    def evalset(name: str, queries: list[tuple[int, int, int, int]]) -> EvalSet:
        users = np.array([q[0] for q in queries], dtype=np.int64)
        hist = [i[lo:end] for _, lo, end, _ in queries]
        return EvalSet(
            name=name,
            users=users,
            history=hist,
            exclude=hist,
            relevant=[i[r : r + 1] for *_, r in queries],
            warm=np.ones(users.shape[0], dtype=bool),
            profiles=_profiles(ds, users, user_ids),
        )

    return Split(
        protocol="A",
        user_ids=user_ids,
        item_ids=ds.item_ids,
        train_user=u[keep],
        train_item=i[keep],
        train_time=t[keep],
        valid=evalset("valid", val_q),
        tests={"test": evalset("test", test_q)},
    )


def protocol_b(ds: Dataset, seed: int = 0) -> Split:
    """Cold items: 20% of items never train; users rank the cold pool from warm history."""
    u, i, t, user_ids = time_ordered(ds)
    cold = np.searchsorted(ds.item_ids, cold_ids(ds.item_ids, COLD_ITEM_FRACTION, seed))
    is_cold = np.isin(i, cold)
    bounds = _user_bounds(u, user_ids.shape[0])
    users, hist, rel = _cold_item_queries(i, is_cold, bounds)
    users_arr = np.array(users, dtype=np.int64)
    test = EvalSet(
        name="cold_items",
        users=users_arr,
        history=hist,
        exclude=[np.empty(0, dtype=np.int64)] * len(users),
        relevant=rel,
        warm=np.ones(len(users), dtype=bool),
        candidates=np.sort(cold),
        profiles=_profiles(ds, users_arr, user_ids),
    )
    return Split(
        protocol="B",
        user_ids=user_ids,
        item_ids=ds.item_ids,
        train_user=u[~is_cold],
        train_item=i[~is_cold],
        train_time=t[~is_cold],
        valid=None,
        tests={"cold_items": test},
        cold_items=np.sort(cold),
    )


def protocol_c(ds: Dataset, seed: int = 0, ks: tuple[int, ...] = COLD_USER_KS) -> Split:
    """Cold users: 10% of users never train; each is given its profile and first k items."""
    u, i, t, user_ids = time_ordered(ds)
    cold = np.searchsorted(user_ids, cold_ids(user_ids, COLD_USER_FRACTION, seed))
    cold.sort()
    is_cold = np.isin(u, cold)
    bounds = _user_bounds(u, user_ids.shape[0])
    tests = {}
    for k in ks:
        users, hist, rel = _cold_user_queries(i, bounds, cold, k)
        users_arr = np.array(users, dtype=np.int64)
        tests[f"k={k}"] = EvalSet(
            name=f"cold_users_k{k}",
            users=users_arr,
            history=hist,
            exclude=hist,
            relevant=rel,
            warm=np.zeros(len(users), dtype=bool),
            profiles=_profiles(ds, users_arr, user_ids),
        )
    return Split(
        protocol="C",
        user_ids=user_ids,
        item_ids=ds.item_ids,
        train_user=u[~is_cold],
        train_item=i[~is_cold],
        train_time=t[~is_cold],
        valid=None,
        tests=tests,
        cold_users=cold,
    )


def holdout_split(
    split: Split, fraction: float, profiles: list[str | None], seed: int = 1
) -> Split:
    """A validation split carved from a cold protocol's (B, C) training data, for model selection.

    B and C have no validation queries, and choosing epochs on their test queries would be tuning
    on test. This repeats the protocol inside the training data: B holds out the first
    ``fraction`` of ``default_rng(seed).permutation`` of the trained items as pseudo-cold items
    (each user with one ranks that pool from its other items); C holds out that fraction of the
    trained users as pseudo-cold users (each given its profile and first k = 0 and 3 items, both
    queries in one validation set). Their interactions leave the training data, so the model
    never sees them, as with the real cold items or users. ``profiles[u]``: user u's profile.
    """
    if split.protocol not in ("B", "C"):
        raise ValueError(
            f"holdout is for the cold protocols B and C; protocol {split.protocol} has its own "
            "validation queries (set train.holdout=0)"
        )
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction {fraction!r} must be in (0, 1)")
    u, i = split.train_user, split.train_item
    bounds = _user_bounds(u, split.n_users)
    users: list[int] = []
    hist: list[np.ndarray] = []
    rel: list[np.ndarray] = []
    candidates: np.ndarray | None
    cold_items: np.ndarray | None
    cold_users: np.ndarray | None
    if split.protocol == "B":
        pseudo = cold_ids(np.unique(i), fraction, seed)
        held = np.isin(i, pseudo)
        users, hist, rel = _cold_item_queries(i, held, bounds)
        excl = [np.empty(0, dtype=np.int64)] * len(users)
        prior = split.cold_items if split.cold_items is not None else np.empty(0, np.int64)
        cold_items, cold_users, candidates = np.union1d(prior, pseudo), split.cold_users, pseudo
        warm = True
    else:
        pseudo = cold_ids(np.unique(u), fraction, seed)
        held = np.isin(u, pseudo)
        for x in np.sort(pseudo):  # the k = 0 and k = 3 queries of one user side by side
            for k in COLD_USER_KS:
                qu, qh, qr = _cold_user_queries(i, bounds, np.array([x]), k)
                users += qu
                hist += qh
                rel += qr
        excl = hist
        prior = split.cold_users if split.cold_users is not None else np.empty(0, np.int64)
        cold_items, cold_users, candidates = split.cold_items, np.union1d(prior, pseudo), None
        warm = False
    users_arr = np.array(users, dtype=np.int64)
    valid = EvalSet(
        name=f"holdout_{split.protocol}",
        users=users_arr,
        history=hist,
        exclude=excl,
        relevant=rel,
        warm=np.full(len(users), warm, dtype=bool),
        candidates=None if candidates is None else np.sort(candidates),
        profiles=[profiles[x] for x in users],
    )
    return Split(
        protocol=split.protocol,
        user_ids=split.user_ids,
        item_ids=split.item_ids,
        train_user=u[~held],
        train_item=i[~held],
        train_time=split.train_time[~held],
        valid=valid,
        tests=split.tests,
        cold_items=cold_items,
        cold_users=cold_users,
    )


def make_split(ds: Dataset, protocol: str) -> Split:
    """Dispatch on the protocol name (``A``, ``B`` or ``C``)."""
    builders = {"A": protocol_a, "B": protocol_b, "C": protocol_c}
    if protocol not in builders:
        raise ValueError(f"protocol {protocol!r} is unknown; use one of {PROTOCOLS}")
    split = builders[protocol](ds)
    _require_queries(split, ds.name)
    return split


# who a protocol evaluates: the hint when a data set gives it nobody to evaluate
_WHO = {
    "A": "users with at least 2 interactions are tested and users with 3 validated (their last "
    "and second-to-last items)",
    "B": f"the {COLD_ITEM_FRACTION:.0%} of items held out as cold must be interacted with by "
    "users who also have other items",
    "C": f"the {COLD_USER_FRACTION:.0%} of users held out as cold need more interactions than "
    "the items they are given (k)",
}


def _require_queries(split: Split, name: str) -> None:
    """A split with nothing to train on or nobody to evaluate is bad input, not an empty table."""
    sets = ([split.valid] if split.valid is not None else []) + list(split.tests.values())
    empty = [e.name for e in sets if len(e) == 0]
    if split.train_user.shape[0] == 0:
        empty.insert(0, "train")
    if empty:
        raise DataError(
            f"protocol {split.protocol} finds nothing to "
            f"{'train on or ' if 'train' in empty else ''}evaluate in data set {name!r} "
            f"(empty: {', '.join(empty)})",
            fix=f"Under protocol {split.protocol}, {_WHO[split.protocol]}; use a data set with "
            "longer histories (`fedrec data validate DIR` shows them) or another protocol.",
        )
