"""The linear cold-user references of simulations/cold_transition, on tiny synthetic data."""

from __future__ import annotations

import numpy as np

from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.shared.splitting import EvalSet, Split
from fedrec.simulations.cold_transition import (
    ProfileLogLinear,
    TransitionOnPrior,
    by_history_length,
    profile_onehot,
)

N_ITEMS = 10


def _split(sequences: list[list[int]]) -> Split:
    u = np.concatenate([[k] * len(s) for k, s in enumerate(sequences)]).astype(np.int64)
    i = np.concatenate(sequences).astype(np.int64)
    return Split(
        protocol="C",
        user_ids=np.arange(len(sequences)) + 100,
        item_ids=np.arange(N_ITEMS) + 1,
        train_user=u,
        train_item=i,
        train_time=np.arange(u.shape[0]),
        valid=None,
        tests={},
    )


def _args(n: int, history: list[np.ndarray]) -> tuple:
    return np.arange(n), history, [None] * n, np.zeros(n, dtype=bool)


def test_the_transition_learns_what_the_first_items_say_beyond_the_segment():
    # 10 users start with 0,1,2 and go on to 3,4; 20 start with 5,6,7 and go on to 8.
    # Every user ends with 9. Gender carries nothing: both groups are half M, half F.
    seqs = [[0, 1, 2, 3, 4, 9]] * 10 + [[5, 6, 7, 8, 9]] * 20
    sp = _split(seqs)
    fields = {100 + k: {"gender": "MF"[k % 2]} for k in range(30)}
    pp = ProfilePopularity(sp, fields, fields=["gender"], shrink=0.0)
    hist = [np.array([0, 1, 2])]
    prior = pp.score(*_args(1, hist))[0]
    assert prior[8] > prior[3]  # the segment's popularity ranks the larger group's item first
    model = TransitionOnPrior(sp, pp, lam=1e-4, rank=4, max_iter=300)
    s = model.score(*_args(1, hist))[0]
    s[[0, 1, 2]] = -np.inf
    assert set(np.argsort(-s)[:3].tolist()) == {3, 4, 9}
    assert s[3] > s[8] and s[4] > s[8]
    tied = TransitionOnPrior(sp, pp, lam=1e-4, rank=4, max_iter=300, tied=True)
    assert tied.e.data_ptr() == tied.f.data_ptr()  # one table for given items and candidates
    st = tied.score(*_args(1, hist))[0]
    assert st[3] > st[8] and st[4] > st[8]  # co-occurrence is symmetric here


def test_a_strong_penalty_leaves_the_segments_prior():
    rng = np.random.default_rng(0)
    seqs = [rng.choice(N_ITEMS, size=6, replace=False).tolist() for _ in range(24)]
    sp = _split(seqs)
    fields = {100 + k: {"gender": "MF"[k % 2]} for k in range(24)}
    pp = ProfilePopularity(sp, fields, fields=["gender"], shrink=3.0)
    model = TransitionOnPrior(sp, pp, lam=10.0, rank=4)
    hist = [np.array(seqs[0][:3]), np.array(seqs[1][:3])]
    s = model.score(*_args(2, hist))
    expected = np.log(pp.score(*_args(2, hist)) + 1e-8)
    assert float(model.e.abs().max()) < 1e-3 and float(model.f.abs().max()) < 1e-3
    assert np.allclose(s / model.a, expected, atol=1e-3)


def test_the_loglinear_profile_model_ranks_each_segments_items_first():
    # M users take items 0-4, F users items 5-9; item 0 and 5 by everyone of the segment
    seqs = [[0, 1, 2] if k % 2 == 0 else [5, 6, 7] for k in range(20)]
    sp = _split(seqs)
    fields = {100 + k: {"gender": "MF"[k % 2], "age": str(20 + k)} for k in range(20)}
    x = profile_onehot(sp, fields, ["gender", "age"])
    assert x.shape[0] == 20 and np.all(x.sum(1) == 2)  # one gender column and one age band
    model = ProfileLogLinear(sp, fields, ["gender"], lam=1e-4)
    s = model.score(*_args(2, [np.empty(0, np.int64)] * 2))
    assert set(np.argsort(-s[0])[:3].tolist()) == {0, 1, 2}
    assert set(np.argsort(-s[1])[:3].tolist()) == {5, 6, 7}


def test_by_history_length_keeps_the_queries_of_one_length():
    es = EvalSet(
        name="v",
        users=np.array([0, 0, 1, 1]),
        history=[
            np.array([], np.int64),
            np.array([1, 2, 3]),
            np.array([], np.int64),
            np.array([4, 5, 6]),
        ],  # fmt: skip
        exclude=[np.array([], np.int64)] * 4,
        relevant=[np.array([7])] * 4,
        warm=np.zeros(4, dtype=bool),
        profiles=["a", "a", "b", "b"],
    )
    three = by_history_length(es, 3)
    assert three.users.tolist() == [0, 1] and [h.tolist() for h in three.history] == [
        [1, 2, 3],
        [4, 5, 6],
    ]
    assert three.profiles == ["a", "b"] and len(by_history_length(es, 0)) == 2


def test_segment_priors_rows_are_each_users_segment_log_popularity_and_sets_are_checked():
    import pytest

    from fedrec.shared.model.config import ModelConfig, TrainConfig, from_dict
    from fedrec.simulations.segment_prior import FLOOR, log_prior, settings_from

    seqs = [[0, 1], [0, 2], [3, 4], [3, 3]]
    sp = _split(seqs)
    fields = {100: {"gender": "M"}, 101: {"gender": "M"}, 102: {"gender": "F"}}  # 103: none
    pp = ProfilePopularity(sp, fields, fields=["gender"], shrink=0.0)
    prior = log_prior(pp, sp.n_users)
    assert prior.shape == (4, N_ITEMS)
    m = np.zeros(N_ITEMS)
    m[[0, 1, 2]] = [2, 1, 1]
    assert np.allclose(prior[0], np.log(m / 4 + FLOOR)) and np.allclose(prior[1], prior[0])
    everyone = np.bincount(sp.train_item, minlength=N_ITEMS) / 8  # no profile: popularity
    assert np.allclose(prior[3], np.log(everyone + FLOOR))
    sets = settings_from(["model.init_scale=2", "mask-positives=true", "train.lr=0.01"])
    assert sets == {"model.init_scale": "2", "train.mask_positives": "true", "train.lr": "0.01"}
    assert from_dict(ModelConfig, {"init_scale": sets["model.init_scale"]}).init_scale == 2.0
    train = from_dict(TrainConfig, {k[6:]: v for k, v in sets.items() if k.startswith("train.")})
    assert train.mask_positives is True and train.lr == 0.01
    with pytest.raises(ValueError, match="unknown key 'no_such'"):
        settings_from(["no_such=2"])
    with pytest.raises(ValueError, match="model.KEY=VALUE"):
        settings_from(["init_scale"])
