"""Protocols A, B, C on tiny hand-built data and on the synthetic set; client partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.shared.data import load_dataset, write_dataset
from fedrec.shared.partition import partition_users
from fedrec.shared.splitting import (
    cold_ids,
    holdout_split,
    make_split,
    protocol_a,
    protocol_b,
    protocol_c,
)


@pytest.fixture
def ties(tmp_path):
    # user 1: item 11 first (t=3); then items 10, 12, 13 tie at t=5 and keep their row order.
    rows = [(1, 10, 5), (2, 10, 1), (1, 11, 3), (1, 12, 5), (2, 11, 2), (1, 13, 5), (3, 12, 9)]
    items = {i: {"title": f"t{i}"} for i in (10, 11, 12, 13, 14)}
    return load_dataset(write_dataset(tmp_path / "ties", interactions=rows, items=items))


def raw(split, idx):
    return split.item_ids[np.asarray(idx)].tolist()


def test_protocol_a_time_order_with_ties_in_row_order(ties):
    sp = protocol_a(ties)
    hist = sp.train_histories()
    assert raw(sp, hist[0]) == [11, 10]  # user 1
    test = sp.tests["test"]
    assert test.users.tolist() == [0, 1]  # user 3 has a single interaction: train only
    assert raw(sp, test.relevant[0]) == [13] and raw(sp, test.history[0]) == [11, 10, 12]
    assert raw(sp, sp.valid.relevant[0]) == [12] and raw(sp, sp.valid.history[0]) == [11, 10]
    # user 2 has two interactions: test but no validation item
    assert sp.valid.users.tolist() == [0]
    assert raw(sp, test.relevant[1]) == [11] and raw(sp, hist[1]) == [10]
    assert raw(sp, hist[2]) == [12]


def test_cold_ids_are_the_seeded_permutation_prefix():
    ids = np.array([5, 3, 9, 1, 7])
    expected = np.random.default_rng(0).permutation(np.array([1, 3, 5, 7, 9]))[:2]
    assert cold_ids(ids, 0.4).tolist() == expected.tolist()


def test_protocol_b_removes_cold_items_from_training(synth_dir):
    ds = load_dataset(synth_dir)
    sp = protocol_b(ds)
    assert sp.cold_items.shape[0] == int(0.2 * ds.n_items)
    assert not np.isin(sp.train_item, sp.cold_items).any()
    es = sp.tests["cold_items"]
    for h, r in zip(es.history, es.relevant, strict=True):
        assert np.isin(r, sp.cold_items).all() and not np.isin(h, sp.cold_items).any()
    assert es.candidates.tolist() == sorted(sp.cold_items.tolist())


def test_protocol_c_cold_users_never_train(synth_dir):
    ds = load_dataset(synth_dir)
    sp = protocol_c(ds)
    assert sp.cold_users.shape[0] == int(0.1 * ds.n_users)
    assert not np.isin(sp.train_user, sp.cold_users).any()
    k3 = sp.tests["k=3"]
    full = protocol_a(ds).train_histories()  # not used for C, but gives per-user sequences
    assert all(h.shape[0] == 3 for h in k3.history)
    assert all(h.shape[0] == 0 for h in sp.tests["k=0"].history)
    for u, h, r in zip(k3.users, k3.history, k3.relevant, strict=True):
        assert not np.isin(r, h).any()
        assert h.tolist() == full[u][:3].tolist()
    assert all(p is not None for p in k3.profiles)


def test_holdout_b_repeats_the_protocol_inside_training(synth_dir):
    ds = load_dataset(synth_dir)
    sp = protocol_b(ds)
    profiles = [ds.user_text(int(u)) for u in sp.user_ids]
    fit = holdout_split(sp, 0.2, profiles)
    pseudo = fit.valid.candidates
    trained = np.unique(sp.train_item)
    assert pseudo.size == int(0.2 * trained.size) and np.all(np.isin(pseudo, trained))
    assert not np.isin(fit.train_item, pseudo).any()  # held-out items never train
    assert np.array_equal(fit.train_item, sp.train_item[~np.isin(sp.train_item, pseudo)])
    assert set(fit.cold_items) == set(sp.cold_items) | set(pseudo)
    hist = sp.train_histories()
    for q, u in enumerate(fit.valid.users):
        assert set(fit.valid.relevant[q]) == set(hist[u]) & set(pseudo)
        assert not np.isin(fit.valid.history[q], pseudo).any()
    assert fit.tests is sp.tests  # the real test queries are untouched


def test_holdout_c_holds_out_whole_users_with_k0_and_k3_queries(synth_dir):
    ds = load_dataset(synth_dir)
    sp = protocol_c(ds)
    profiles = [ds.user_text(int(u)) for u in sp.user_ids]
    fit = holdout_split(sp, 0.1, profiles)
    held = np.unique(fit.valid.users)
    assert held.size == int(0.1 * np.unique(sp.train_user).size)
    assert not np.isin(fit.train_user, held).any() and np.isin(sp.train_user, held).any()
    assert not np.isin(held, sp.cold_users).any()
    hist = sp.train_histories()
    sizes = sorted({len(h) for h in fit.valid.history})
    assert sizes == [0, 3]
    for q, u in enumerate(fit.valid.users):
        given = fit.valid.history[q]
        assert np.array_equal(given, hist[u][: len(given)])
        assert set(fit.valid.relevant[q]) == set(hist[u][len(given) :]) - set(given)
        assert fit.valid.profiles[q] == profiles[u]


def test_holdout_refuses_protocol_a_and_bad_fractions(synth_dir):
    ds = load_dataset(synth_dir)
    with pytest.raises(ValueError, match="protocol A has its own validation"):
        holdout_split(protocol_a(ds), 0.1, [])
    with pytest.raises(ValueError, match="must be in"):
        holdout_split(protocol_c(ds), 1.0, [])


def test_unknown_protocol():
    with pytest.raises(ValueError, match="protocol 'D'"):
        make_split(None, "D")


def test_partitions(synth_dir):
    sp = protocol_c(load_dataset(synth_dir))
    per_user = partition_users(sp)
    assert len(per_user) == sp.n_users - sp.cold_users.shape[0]
    silos = partition_users(sp, scheme="silo", n_silos=5)
    together = np.sort(np.concatenate(silos))
    assert together.tolist() == np.unique(sp.train_user).tolist()  # every user once, whole
    assert max(map(len, silos)) - min(map(len, silos)) <= 1
    with pytest.raises(ValueError, match="n_silos"):
        partition_users(sp, scheme="silo", n_silos=0)
    with pytest.raises(ValueError, match="scheme"):
        partition_users(sp, scheme="random")


@pytest.mark.parametrize("protocol", ["A", "C"])
def test_a_clients_rows_and_partitions_from_the_per_split_index_are_the_direct_ones(
    synth_dir, protocol
):
    """client.runtime reads a user's rows as one range of the user-sorted training rows and
    partitions a split once, instead of scanning all training rows per client: the same rows
    in the same (time) order, the same partitions, and a user without training rows gets none."""
    from fedrec.client import runtime
    from fedrec.shared.federation.config import FedConfig

    sp = make_split(load_dataset(synth_dir), protocol)
    for u in range(sp.n_users):
        want = np.flatnonzero(sp.train_user == u)
        got = runtime._user_rows(sp, u)
        assert got.tolist() == want.tolist()
    for cfg in (FedConfig(), FedConfig(partition="silo", silos=3, seed=4)):
        want = partition_users(sp, scheme=cfg.partition, n_silos=cfg.silos, seed=cfg.seed)
        got = runtime._partitions(sp, cfg)
        assert [p.tolist() for p in got] == [p.tolist() for p in want]
        assert runtime._partitions(sp, cfg) is got  # computed once per split
