"""The segment prior against a poisoning client: a bound on every cell of a table
(``segment-cell-max``; a reply beyond it is rejected whole), and, under ``robust`` aggregation,
the tables combined cell by cell as the model's changes are.

Checked on random data: without ``robust`` the combination is the sum; with it, however large
the values up to k tables carry (k the values dropped at each end), every combined cell stays
within the other tables' range (times their number), and it equals the model side's
``robust_mean``; the noise variance the prior's shrinkage uses matches a simulation. Then the
server's strategy on replies, and a real Flower simulation where one silo promotes an item:
summed, its counts put the item first for every new user; combined by the median, they do not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.segments import (
    combine_tables,
    combine_variance,
    load_segment_meta,
    n_segments,
    save_segment_sum,
    trimmed_count,
)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "how,trim", [("median", 0.1), ("trimmed-mean", 0.1), ("trimmed-mean", 0.25)]
)
def test_a_robust_combination_keeps_every_cell_within_the_honest_range(seed, how, trim):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3 if how == "median" else int(np.ceil(1 / trim)), 21))
    shape = (int(rng.integers(1, 5)), int(rng.integers(1, 30)))
    k = trimmed_count(n, how, trim)
    assert k >= 1
    honest = [np.rint(rng.normal(rng.uniform(0, 50), 3.0, shape)) for _ in range(n - k)]
    # k attackers: arbitrary values, huge or tiny, a different attack per cell
    attack = [rng.choice([-1e9, 1e9, 1e5, -3.0, 7.0], size=shape) for _ in range(k)]
    tables = [*honest, *attack]
    rng.shuffle(tables)  # the order replies arrive in does not matter
    total, var = combine_tables(tables, how, trim)
    low, high = np.min(honest, axis=0) * n, np.max(honest, axis=0) * n
    assert total.shape == shape and np.all(total >= low - 1e-9) and np.all(total <= high + 1e-9)
    assert var == combine_variance(n, how, trim) > n
    # the same combination written out: sort each cell, drop k at each end, mean, times n
    ordered = np.sort(np.stack(tables), axis=0)
    assert np.allclose(total, ordered[k : n - k].mean(0) * n)


@pytest.mark.parametrize("seed", range(3))
def test_without_robust_the_tables_are_summed(seed):
    rng = np.random.default_rng(seed)
    tables = [rng.normal(0, 5, (3, 11)) for _ in range(int(rng.integers(1, 9)))]
    total, var = combine_tables(tables, "none", 0.1)
    assert np.allclose(total, np.sum(tables, axis=0)) and var == len(tables)
    # too few tables to trim: the trimmed mean is the sum too
    assert trimmed_count(4, "trimmed-mean", 0.1) == 0
    assert np.allclose(combine_tables(tables[:1] * 4, "trimmed-mean", 0.1)[0], 4 * tables[0])
    with pytest.raises(ValueError, match="how"):
        combine_tables(tables, "mean", 0.1)
    with pytest.raises(ValueError, match="no tables"):
        combine_tables([], "none", 0.1)


@pytest.mark.parametrize(
    "n,how,trim", [(10, "median", 0.1), (9, "median", 0.1), (10, "trimmed-mean", 0.1),
                   (20, "trimmed-mean", 0.2), (3, "median", 0.1), (5, "none", 0.1),
                   (201, "median", 0.1), (300, "trimmed-mean", 0.1)]
)  # fmt: skip
def test_the_noise_variance_of_a_combination_matches_an_independent_simulation(n, how, trim):
    """What the prior's shrinkage assumes a combined cell's noise to be (one table's variance
    as the unit) against the variance of the combination of noise simulated here with another
    seed and more draws (within 4 %; above 200 tables the asymptotic formula)."""
    rng = np.random.default_rng(12345)
    draws = 100_000 if n <= 20 else 30_000
    x = np.sort(rng.normal(size=(draws, n)), axis=1)
    k = trimmed_count(n, how, trim)
    simulated = float((x[:, k : n - k].mean(1) * n).var())
    assert combine_variance(n, how, trim) == pytest.approx(simulated, rel=0.04)


def test_the_server_rejects_a_table_beyond_segment_cell_max():
    from flwr.app import Array, ArrayRecord

    from fedrec.server.strategy import SEGMENT_NOISE_MARGIN, segment_table

    cfg = FedConfig(protocol="C", segment_prior="age", segment_noise=2.0)
    rows = n_segments(("age",))
    honest = np.rint(np.random.default_rng(1).normal(0, 2.0, (rows, 50)))
    honest[0, 0] = 30.0 + 19  # 30 users, and noise of 9.5 std
    ok = segment_table(ArrayRecord({"counts": Array(honest)}), cfg, 50, cell_max=30.0)
    assert isinstance(ok, np.ndarray)
    margin = SEGMENT_NOISE_MARGIN * cfg.segment_noise
    for value in (30 + margin + 1, -margin - 1):
        bad = honest.copy()
        bad[2, 7] = value
        problem = segment_table(ArrayRecord({"counts": Array(bad)}), cfg, 50, cell_max=30.0)
        assert isinstance(problem, str) and f"{value:g}" in problem and "30 interactions" in problem
    # without a bound (the server holds no split) only SEGMENT_CELL_MAX applies
    big = honest.copy()
    big[2, 7] = 1e6
    assert isinstance(segment_table(ArrayRecord({"counts": Array(big)}), cfg, 50), np.ndarray)
    # without DP no margin: a count above the population is refused
    nodp = FedConfig(protocol="C", segment_prior="age", dp=False, epsilon=FedConfig.epsilon)
    exact = np.zeros((rows, 50))
    exact[1, 1] = 31.0
    problem = segment_table(ArrayRecord({"counts": Array(exact)}), nodp, 50, cell_max=30.0)
    assert isinstance(problem, str) and "31" in problem


def test_the_config_refuses_what_the_combination_cannot_do():
    base = {"protocol": "C", "segment_prior": "age"}
    # one-user tables: the median of 0/1 rows is 0 almost everywhere, no estimate of the sum
    for robust in ("median", "trimmed-mean"):
        with pytest.raises(ValueError, match="partition = silo"):
            FedConfig(**base, robust=robust, partition="user")
        FedConfig(**base, robust=robust, partition="silo", silos=10)
    FedConfig(**base, partition="user")  # summed: fine
    with pytest.raises(ValueError, match="segment-cell-max"):
        FedConfig(**base, segment_cell_max=-1.0)
    # the promote attack needs a table to promote in, and a whole count to add
    with pytest.raises(ValueError, match="promote"):
        FedConfig(protocol="C", poison="0.1:promote:40")
    with pytest.raises(ValueError, match="promote"):
        FedConfig(**base, poison="0.1:promote:0.4")
    assert FedConfig(**base, poison="0.5:promote:40").poison_spec() == (2, "promote", 40.0)
    with pytest.raises(ValueError, match="promote"):
        FedConfig(poison="0.5:boost:40")


@pytest.mark.parametrize("seed", range(4))
def test_the_combination_is_the_model_updates_robust_mean(seed):
    """Cell for cell, the tables are combined as ``robust_mean`` combines the clients' changes
    (the same values dropped, the median of an even count the mean of the middle two), times n."""
    import torch

    from fedrec.server.strategy import robust_mean

    rng = np.random.default_rng(seed)
    for n in range(1, 25):
        stacked = rng.normal(0, 10, (n, 2, 9))
        for how in ("median", "trimmed-mean"):
            for trim in (0.0, 0.1, 0.2, 0.34, 0.49):
                total, _ = combine_tables(list(stacked), how, trim)
                want = robust_mean(torch.as_tensor(stacked), how, trim).numpy() * n
                assert np.allclose(total, want), (n, how, trim)


def _replies(tables, updates):
    import torch  # noqa: F401 - to_record's tensors
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedrec.shared.federation import contract
    from fedrec.shared.federation.params import to_record

    metrics = {"num-examples": 5, "trained": 1, "loss": 1.0, "epsilon": 0.5, "steps": 4,
               "total-steps": 4, "noise-multiplier": 1.1, "sample-rate": 0.5,
               "seconds": 0.1}  # fmt: skip
    out = []
    for n, (table, update) in enumerate(zip(tables, updates, strict=True), 1):
        content = RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "client": ConfigRecord({"name": f"p{n}", "reason": ""}),
                "arrays": to_record(update),
                contract.SEGMENTS: ArrayRecord({"counts": Array(table)}),
            }
        )
        to_node = Message(content=RecordDict(), dst_node_id=n, message_type="train")
        out.append(Message(content=content, reply_to=to_node))
    return out


@pytest.mark.parametrize("robust", ["none", "median", "trimmed-mean"])
def test_the_strategy_combines_the_tables_as_it_combines_the_updates(robust, tmp_path, monkeypatch):
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.server.strategy import FedRecStrategy
    from fedrec.shared.federation import contract

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    template = {"lora.B": torch.zeros(3, 2), "head.item_bias": torch.zeros(4)}
    cfg = FedConfig(protocol="C", segment_prior="age", partition="silo", silos=5, min_replies=1,
                    robust=robust, trim_fraction=0.2)  # fmt: skip
    s = FedRecStrategy(cfg, template=dict(template), ledger=tmp_path / "privacy" / "ledger.jsonl")
    s.n_items, s.segment_cell_max = 4, 1e6
    rows = n_segments(("age",))
    rng = np.random.default_rng(0)
    honest = [np.rint(rng.normal(10, 2, (rows, 4))) for _ in range(4)]
    promoted = honest[0].copy()
    promoted[:, -1] += 1000.0  # one client pushes the last item
    tables = [*honest, promoted]
    updates = [{"lora.B": torch.ones(3, 2), "head.item_bias": torch.ones(4)}] * 5
    s.aggregate_train(contract.SEGMENT_ROUND, _replies(tables, updates))
    assert s.segment_tables == 5
    want, var = combine_tables(tables, robust, 0.2)
    assert np.array_equal(s.segment_sum, want) and s.segment_noise_tables == var
    column = s.segment_sum[:, -1]
    if robust == "none":
        assert np.all(column > 1000)  # summed: the attack is in every segment's cell
    else:
        assert np.all(column <= 5 * np.max(honest, axis=0)[:, -1])
    path = tmp_path / "segment_counts.npz"
    with np.load(path) as f:
        assert str(f["combined"]) == robust and float(f["noise_tables"]) == var
    resumed = FedRecStrategy(cfg, template=dict(template), ledger=s.ledger, round_offset=2)
    assert resumed.segment_noise_tables == var and np.array_equal(resumed.segment_sum, want)


def test_a_reply_whose_table_is_out_of_bounds_is_rejected_whole(tmp_path, monkeypatch):
    """A table beyond segment-cell-max is no honest release: its reply's update is not
    aggregated either, the reply counts as rejected, and its release stays on the ledger."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.server.strategy import FedRecStrategy
    from fedrec.shared.federation import contract
    from fedrec.shared.federation.params import from_record

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    template = {"lora.B": torch.zeros(3, 2), "head.item_bias": torch.zeros(4)}
    cfg = FedConfig(protocol="C", segment_prior="age", partition="silo", silos=3, min_replies=1,
                    segment_cell_max=50.0, segment_noise=2.0)  # fmt: skip
    s = FedRecStrategy(cfg, template=dict(template), ledger=tmp_path / "privacy" / "ledger.jsonl")
    s.n_items = 4
    rows = n_segments(("age",))
    tables = [np.full((rows, 4), 10.0) for _ in range(3)]
    tables[1][0, 3] = 50.0 + 10 * 2.0 + 1  # one count above the bound and its noise margin
    updates = [{"lora.B": torch.full((3, 2), v), "head.item_bias": torch.full((4,), v)}
               for v in (1.0, 100.0, 3.0)]  # fmt: skip
    arrays, out = s.aggregate_train(contract.SEGMENT_ROUND, _replies(tables, updates))
    assert out["accepted"] == 2 and out["rejected"] == 1
    assert s.segment_tables == 2 and np.array_equal(s.segment_sum, tables[0] + tables[2])
    assert torch.allclose(from_record(arrays)["lora.B"], torch.full((3, 2), 2.0))  # (1 + 3) / 2
    lines = [
        json.loads(x) for x in (tmp_path / "privacy" / "ledger.jsonl").read_text().splitlines()
    ]
    assert [x.get("accepted", True) for x in lines if "client" in x] == [True, False, True]
    assert all("release" in x for x in lines if "client" in x)  # each spent it
    # at the bound plus its margin the table is accepted
    tables[1][0, 3] = 50.0 + 10 * 2.0
    s2 = FedRecStrategy(cfg, template=dict(template), ledger=tmp_path / "p2" / "ledger.jsonl")
    s2.n_items = 4
    _, out = s2.aggregate_train(contract.SEGMENT_ROUND, _replies(tables, updates))
    assert out["accepted"] == 3 and s2.segment_tables == 3


def test_an_old_counts_file_is_read_as_a_sum(tmp_path):
    from fedrec.server.strategy import FedRecStrategy

    path = tmp_path / "segment_counts.npz"
    np.savez(path, counts=np.ones((2, 3)), tables=np.array(4))  # as fedrec wrote it before
    meta = load_segment_meta(path)
    assert meta.noise_tables is None and meta.combined == "none" and meta.trimmed == 0
    # a run resumed under robust=median from such a file reports what the file holds: a sum
    cfg = FedConfig(protocol="C", segment_prior="age", partition="silo", silos=4, robust="median")
    resumed = FedRecStrategy(
        cfg, template={}, ledger=tmp_path / "privacy" / "l.jsonl", round_offset=2
    )
    assert resumed.segment_combined == "none" and resumed.segment_noise_tables is None
    save_segment_sum(path, np.ones((2, 3)), 4, noise_tables=6.5, combined="median", trimmed=1)
    meta = load_segment_meta(path)
    assert (meta.noise_tables, meta.combined, meta.trimmed) == (6.5, "median", 1)
    np.savez(path, counts=np.ones((2, 3)), tables=np.array(4), noise_tables=np.array(-1.0))
    with pytest.raises(ValueError, match="noise_tables"):
        load_segment_meta(path)


def test_a_device_never_runs_the_promote_attack(tmp_path):
    from fedrec.client.app import device_guard

    cfg = FedConfig(protocol="C", segment_prior="age", poison="0.5:promote:40")
    with pytest.raises(ValueError, match="poison"):
        device_guard(cfg, {"data-dir": str(tmp_path), "allow-no-dp": "true"})


def _promote_run(synth_dir, tiny_backbone, out, robust):
    from fedrec.simulations.launch import simulate

    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        protocol="C", num_rounds=1, fraction_train=1.0, partition="silo", silos=5, min_replies=2,
        evaluate_every=0, local_steps=1, sample_rate=0.5, negatives=10, slots=6,
        lr=0.5, segment_prior="age", dp=False, epsilon=FedConfig.epsilon, robust=robust,
        poison="0.2:promote:25",  # p0 of five silos adds 25 to the last item's cells
    )  # fmt: skip
    return simulate(cfg, out, baselines="none", num_cpus=2)


def test_a_real_federation_median_keeps_one_silos_promoted_item_off_new_users_lists(
    synth_dir, tiny_backbone, tmp_path
):
    """Five silos, one promoting the catalog's last item (3 training interactions, 86 items
    have more) in its counts: summed, the item is first for every new user (the attack works);
    combined by the median, its counts are what the honest silos say, and it is in no new
    user's top 10. Without DP, so that the honest counts are exact (the combination under DP's
    noise: the strategy test above)."""
    from fedrec.shared.data import load_dataset
    from fedrec.shared.inference import Recommender
    from fedrec.shared.splitting import make_split

    target = int(make_split(load_dataset(synth_dir), "C").item_ids[-1])  # the attacked column
    ranks = {}
    for robust in ("none", "median"):
        out = tmp_path / robust
        result = _promote_run(synth_dir, tiny_backbone, out, robust)
        info = result["model"]["segment_prior"]
        assert info["tables"] == 5 and info["combined"] == robust
        assert info["trimmed"] == (2 if robust == "median" else 0)
        assert info["noise_tables"] == pytest.approx(combine_variance(5, robust, 0.1))
        rec = Recommender.load(out)
        assert rec.segment is not None
        found = []
        for age in (16, 30, 40, 60):
            top = [r.item_id for r in rec.cold_start(segment={"age": age}, k=len(rec.item_ids))]
            found.append(top.index(target) + 1)
        ranks[robust] = found
        with np.load(out / "segment_counts.npz") as f:
            assert str(f["combined"]) == robust and int(f["tables"]) == 5
    assert ranks["none"] == [1, 1, 1, 1], ranks
    assert all(r > 10 for r in ranks["median"]), ranks
