"""Baselines on the synthetic set: they learn something, tuning reads validation only."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.shared.baselines import run_baselines
from fedrec.shared.baselines.itemknn import ItemKNN
from fedrec.shared.baselines.matrix_factorization import ALS
from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.baselines.runner import PopularityFallback, tune
from fedrec.shared.baselines.zeroshot import ZeroShotText
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.splitting import protocol_a, protocol_c


class BagOfWords:
    """Text-only reference: cosine between word counts of history texts and each item's text."""

    def __init__(self, texts):
        vocab = sorted({w for t in texts for w in t.lower().split()})
        self.x = np.array([[t.lower().split().count(w) for w in vocab] for t in texts], float)
        self.x /= np.linalg.norm(self.x, axis=1, keepdims=True)

    def score(self, users, history, profiles, warm):
        u = np.stack([self.x[h].sum(0) for h in history])
        return u @ self.x.T


@pytest.fixture(scope="module")
def ds(synth_dir):
    return load_dataset(synth_dir)


def ndcg(model, es):
    return evaluate(model, es, ks=(10,), with_auc=False)["NDCG@10"]


def test_synthetic_texts_carry_preferences(ds):
    sp = protocol_a(ds)
    test = sp.tests["test"]
    assert ndcg(BagOfWords(ds.item_texts()), test) > 1.5 * ndcg(Popularity(sp), test)


def test_collaborative_baselines_beat_popularity(ds):
    sp = protocol_a(ds)
    test = sp.tests["test"]
    pop = ndcg(Popularity(sp), test)
    assert ndcg(ItemKNN(sp, neighbors=50), test) > pop
    assert ndcg(ALS(sp, factors=8, regularization=0.1), test) > pop


def test_tuning_uses_validation_not_test(ds, monkeypatch):
    sp = protocol_a(ds)
    seen = []
    import fedrec.shared.baselines.runner as runner

    real = runner.evaluate
    monkeypatch.setattr(
        runner, "evaluate", lambda m, es, **kw: seen.append(es.name) or real(m, es, **kw)
    )
    params, trace = tune("itemknn", sp)
    assert set(seen) == {"valid"} and len(trace) == len(runner.grid("itemknn"))
    assert params in [t["params"] for t in trace]


def test_popularity_fallback_only_for_empty_histories(ds):
    sp = protocol_c(ds)
    pop = Popularity(sp)
    model = PopularityFallback(ItemKNN(sp), pop)
    h = [np.empty(0, dtype=np.int64), np.array([0, 1])]
    s = model.score(np.array([0, 1]), h, [None, None], np.array([False, False]))
    assert np.array_equal(s[0], pop.scores) and not np.array_equal(s[1], pop.scores)


def test_zero_shot_uses_profile_when_history_is_empty(ds, tiny_backbone):
    zs = ZeroShotText(ds.item_texts(), backbone=str(tiny_backbone))
    assert zs.items.shape == (ds.n_items, 32)
    assert np.allclose(np.linalg.norm(zs.items, axis=1), 1.0, atol=1e-5)
    h = [np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.array([3])]
    s = zs.score(np.zeros(3, int), h, ["Age 30, likes space.", "Age 30, likes crime.", None], None)
    assert not np.allclose(s[0], s[1])  # different profiles, different rankings
    assert np.allclose(s[2], zs.items[3] @ zs.items.T, atol=1e-5)  # one item: its neighbours


def test_run_baselines_report(ds, tiny_backbone):
    r = run_baselines(
        ds, "C", names=["popularity", "itemknn", "zeroshot"], backbone=str(tiny_backbone)
    )
    assert r["split"]["n_cold_users"] == 6
    assert set(r["baselines"]["itemknn"]["metrics"]) == {"k=0", "k=3"}
    assert r["baselines"]["itemknn"]["tuned_on"].startswith("protocol A validation")
    with pytest.raises(ValueError, match="unknown baselines"):
        run_baselines(ds, "A", names=["svd"])


def test_seed_reaches_every_fit_of_the_seeded_baselines(ds, monkeypatch):
    from fedrec.shared.baselines import runner

    seen: list[tuple[str, int | None]] = []

    def recorder(name):
        real = runner.FACTORIES[name]

        def make(split, **kw):
            seen.append((name, kw.get("seed")))
            return real(split, **kw)

        return make

    for name in ("als", "bpr", "itemknn"):
        monkeypatch.setitem(runner.FACTORIES, name, recorder(name))
    monkeypatch.setitem(runner.GRIDS, "als", {"factors": [4, 8]})
    monkeypatch.setitem(runner.GRIDS, "bpr", {"factors": [4], "iterations": [5]})
    r = run_baselines(ds, "A", names=["random", "als", "bpr", "itemknn"], seed=3)
    # every tuning fit and the final fit of ALS and BPR, all with the seed; item-kNN draws nothing
    assert [s for n, s in seen if n == "als"] == [3, 3, 3]
    assert [s for n, s in seen if n == "bpr"] == [3, 3]
    assert {s for n, s in seen if n == "itemknn"} == {None}
    assert r["baselines"]["als"]["seed"] == 3 and r["baselines"]["bpr"]["seed"] == 3
    assert "seed" not in r["baselines"]["itemknn"]
    assert r["baselines"]["random"]["params"] == {"seed": 3}
    other = run_baselines(ds, "A", names=["random"], seed=4)["baselines"]["random"]["metrics"]
    assert other != r["baselines"]["random"]["metrics"]


def test_bpr_is_reproducible(ds):
    from fedrec.shared.baselines.matrix_factorization import BPR

    sp = protocol_a(ds)
    a = BPR(sp, factors=8, iterations=20).model.item_factors
    b = BPR(sp, factors=8, iterations=20).model.item_factors
    assert np.array_equal(a, b)


def test_profile_popularity_by_hand(tmp_path):
    """Two segments by gender: women took items 1,1,2, men item 3 (ids = indices + 1)."""
    from fedrec.shared.baselines.profile_popularity import ProfilePopularity
    from fedrec.shared.data.layout import write_dataset
    from fedrec.shared.splitting import protocol_c

    inter = [(1, 1, 1), (1, 2, 2), (2, 1, 3), (3, 3, 4), (3, 3, 5)]
    items = {i: {"title": f"t{i}"} for i in (1, 2, 3, 4)}
    users = {1: {"gender": "F", "age": "20"}, 2: {"gender": "F", "age": "60"},
             3: {"gender": "M", "age": "30"}}  # fmt: skip
    d = load_dataset(write_dataset(tmp_path / "d", interactions=inter, items=items, users=users))
    sp = protocol_c(d, ks=(0,))
    sp = type(sp)(**{**sp.__dict__, "cold_users": None})  # score every user as trained here
    m = ProfilePopularity(sp, d.user_fields, fields=["gender"], shrink=0.0)
    u = np.array([0, 2])  # user indices of users 1 (F) and 3 (M)
    s = m.score(u, [np.empty(0, np.int64)] * 2, [None, None], np.zeros(2, bool))
    train = np.bincount(sp.train_item, minlength=4).astype(float)
    f_rows = np.isin(sp.train_user, [0, 1])
    f = np.bincount(sp.train_item[f_rows], minlength=4).astype(float)
    assert np.allclose(s[0], f / f.sum())  # m = 0: the segment's own popularity
    m2 = ProfilePopularity(sp, d.user_fields, fields=["gender"], shrink=10.0)
    s2 = m2.score(u, [np.empty(0, np.int64)] * 2, [None, None], np.zeros(2, bool))
    p = train / train.sum()
    assert np.allclose(s2[0], (f + 10.0 * p) / (f.sum() + 10.0))
    # numbers are banded: 20 and 60 fall in different bands, so 'age' alone splits F users
    bands = ProfilePopularity(sp, d.user_fields, fields=["age"], shrink=0.0)
    assert bands.keys[0] != bands.keys[1]


def test_profile_popularity_is_tuned_on_held_out_users_not_test(ds, monkeypatch):
    import fedrec.shared.baselines.runner as runner

    seen = []
    real = runner.evaluate
    monkeypatch.setattr(
        runner, "evaluate", lambda m, es, **kw: seen.append(es.name) or real(m, es, **kw)
    )
    r = run_baselines(ds, "C", names=["profile-popularity"])
    entry = r["baselines"]["profile-popularity"]
    tuning = [n for n in seen if n not in ("cold_users_k0", "cold_users_k3")]
    assert set(tuning) == {"holdout_C"} and len(tuning) == len(entry["trace"])
    assert entry["tuned_on"].startswith("protocol C: 10 % of the trained users")
    assert entry["params"] in [t["params"] for t in entry["trace"]]
    assert set(entry["metrics"]) == {"k=0", "k=3"}
