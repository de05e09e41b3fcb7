"""The segment prior: each client's (segment, item) counts, released once under local DP.

What the privacy claim rests on, checked on random data: the table's cells are fixed in advance
and one interaction changes exactly one count by exactly 1 (L2 sensitivity 1); the history run it
is charged as has the release's own epsilon under replace-one (a second, independent PLD
computation) and an upper bound under group privacy; the DP-SGD noise is calibrated with it in
the budget. Then a real Flower simulation: the clients' tables carry noise of the claimed
standard deviation, the ledger shows each release, and `fedrec audit` recomputes every epsilon
with it.
"""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest

from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.federation.segments import (
    AGE_EDGES,
    SegmentPrior,
    SegmentPriorScorer,
    count_table,
    n_segments,
    parse_fields,
    release_run,
    segment_of,
)
from fedrec.shared.privacy.accounting import epsilon_spent, noise_for_budget


def gaussian_epsilon(z: float, delta: float) -> float:
    """The Gaussian mechanism's epsilon (sensitivity 1, noise multiplier z), computed with
    dp-accounting's PLD directly: not through fedrec's history format."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


def test_fields_and_cells_are_fixed_in_advance():
    assert parse_fields("") == () and parse_fields(" age , gender ") == ("age", "gender")
    for bad in ("zip", "age,age", "occupation"):
        with pytest.raises(ValueError, match="segment-prior"):
            parse_fields(bad)
    assert n_segments(("age",)) == len(AGE_EDGES) + 2 and n_segments(("gender",)) == 3
    assert n_segments(("age", "gender")) == (len(AGE_EDGES) + 2) * 3
    ages = {"17": 0, "18": 1, "24": 1, "25": 2, "49": 4, "55": 5, "56": 6, "90": 6}
    for age, cell in ages.items():
        assert segment_of({"age": age}, ("age",)) == cell, age
    unknown = len(AGE_EDGES) + 1
    for junk in ("", "n/a", "nan", None):
        assert segment_of({"age": junk} if junk is not None else {}, ("age",)) == unknown
    assert segment_of({"gender": "f"}, ("gender",)) == 0
    assert segment_of({"gender": "M"}, ("gender",)) == 1
    assert segment_of({"gender": "x"}, ("gender",)) == 2
    assert segment_of(None, ("age", "gender")) == n_segments(("age", "gender")) - 1
    with pytest.raises(ValueError, match="segment-prior"):
        parse_run_config({"segment-prior": "zip"})
    with pytest.raises(ValueError, match="user-dp"):
        parse_run_config({"segment-prior": "age", "user-dp": True, "dp": False})
    with pytest.raises(ValueError, match="segment-noise"):
        parse_run_config({"segment-prior": "age", "segment-noise": 0, "protocol": "C"})
    for protocol in ("A", "B"):  # the prior ranks only protocol C's never-trained users
        with pytest.raises(ValueError, match="unless protocol = C"):
            parse_run_config({"segment-prior": "age", "protocol": protocol})


def _random_profile(rng: np.random.Generator) -> dict[str, str]:
    profile = {}
    if rng.random() < 0.9:
        profile["age"] = rng.choice([str(int(rng.integers(5, 95))), "", "unknown"])
    if rng.random() < 0.9:
        profile["gender"] = rng.choice(["M", "F", "m", "", "other"])
    return profile


@pytest.mark.parametrize("fields", [("age",), ("gender",), ("age", "gender")])
def test_one_interaction_changes_one_count_by_one(fields):
    """Random data sets and a random interaction added or removed (also one of a user the data
    did not hold): the tables have the same fixed shape and differ in exactly one cell, by
    exactly 1."""
    rng = np.random.default_rng(7)
    n_seg = n_segments(fields)
    for _trial in range(200):
        n_users, n_items = int(rng.integers(1, 8)), int(rng.integers(1, 30))
        profiles = [_random_profile(rng) for _ in range(n_users + 1)]
        segs = [segment_of(p, fields) for p in profiles]
        # a user rates an item at most once
        items = [rng.permutation(n_items)[: rng.integers(0, n_items + 1)] for _ in range(n_users)]
        base = count_table(items, segs[:n_users], n_items, n_seg)
        assert base.shape == (n_seg, n_items) and base.sum() == sum(len(i) for i in items)
        u = int(rng.integers(0, n_users + 1))  # n_users: a user the data set did not hold
        if u < n_users and len(items[u]) and rng.random() < 0.5:  # remove one of u's items
            other = [it if k != u else it[1:] for k, it in enumerate(items)]
            users = segs[:n_users]
        else:  # add one item u did not take
            held = items[u] if u < n_users else np.zeros(0, dtype=np.int64)
            free = np.setdiff1d(np.arange(n_items), held)
            if not free.size:
                continue
            new = np.append(held, rng.choice(free)).astype(np.int64)
            other = [*items, new] if u == n_users else [new if k == u else it for k, it in
                                                        enumerate(items)]  # fmt: skip
            users = segs[: n_users + 1] if u == n_users else segs[:n_users]
        diff = count_table(other, users, n_items, n_seg) - base
        assert np.count_nonzero(diff) == 1 and abs(diff.sum()) == 1
        assert np.linalg.norm(diff) == 1.0


@pytest.mark.parametrize("z", [0.7, 2.0, 5.0])
def test_the_charged_run_is_the_release_under_replace_one(z):
    """Written as one step at sample rate 1 and noise multiplier 2z, fedrec's replace-one
    epsilon is the sensitivity-1 Gaussian mechanism's own (dp-accounting PLD on the mechanism
    directly); under group privacy over k steps, k z is an upper bound on it."""
    delta = 1e-5
    run = release_run(z, "replace-one", 1)
    assert run == (2 * z, 1.0, 1)
    got = epsilon_spent(history=[run], delta=delta, accountant="pld", adjacency="replace-one")
    assert got == pytest.approx(gaussian_epsilon(z, delta), rel=0.01)
    for k in (3, 5, 41):
        run = release_run(z, "add-remove", k)
        assert run == (k * z, 1.0, 1)
        bound = epsilon_spent(history=[run], delta=delta, accountant="rdp", group=k)
        assert bound >= gaussian_epsilon(z, delta)
    with pytest.raises(ValueError, match="segment-noise"):
        release_run(0.0, "replace-one", 1)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "z"), [(0.6, 0.025, 100, 2.0), (1.5, 0.1, 30, 1.0)]
)
def test_composition_with_dp_sgd_is_bounded_by_the_ledger_history(sigma, q, steps, z):
    """An interaction added to an empty slot is an add/remove step for DP-SGD and a count of 1
    for the release; added to an occupied slot, a replace-one step and a count of 1. Each,
    composed directly in dp-accounting (the DP-SGD pair with the Gaussian mechanism at
    sensitivity 1), is within what fedrec's replace-one history (DP-SGD, then the release at
    2z) gives."""
    delta = 1e-5
    ledger = epsilon_spent(
        history=[(sigma, q, steps), release_run(z, "replace-one", 1)],
        delta=delta,
        accountant="pld",
        adjacency="replace-one",
    )
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc.compose(dp_accounting.GaussianDpEvent(z))
    assert float(acc.get_epsilon(delta)) <= ledger * (1 + 1e-3)
    # an interaction added to (or removed from) an occupied slot: its example is REPLACED (the
    # replace-one DP-SGD pair) while the table still gains (or loses) one count (sensitivity 1,
    # the unit being one interaction added or removed, never one swapped for another)
    pld = dp_accounting.pld.privacy_loss_distribution
    rel = dp_accounting.privacy_accountant.NeighboringRelation
    sgd = pld.from_gaussian_mechanism(
        sigma, sampling_prob=q, neighboring_relation=rel.REPLACE_ONE,
        value_discretization_interval=1e-3,
    ).self_compose(steps)  # fmt: skip
    count = pld.from_gaussian_mechanism(z, sensitivity=1.0, value_discretization_interval=1e-3)
    replaced = sgd.compose(count)
    assert float(replaced.get_epsilon_for_delta(delta)) <= ledger * (1 + 1e-3)


def test_the_noise_is_calibrated_with_the_release_in_the_budget():
    base = {"partition": "silo", "silos": 10, "sample-rate": 0.025, "local-steps": 10,
            "num-rounds": 10, "fraction-train": 1.0, "protocol": "C"}  # fmt: skip
    from fedrec.shared.privacy.calibration import calibrated_noise, planned_release

    plain = parse_run_config(base)
    cfg = parse_run_config(base | {"segment-prior": "age", "segment-noise": 2.0})
    assert planned_release(plain) is None and planned_release(cfg) == (4.0, 1.0, 1)
    assert planned_release(parse_run_config(base | {"segment-prior": "age", "dp": False})) is None
    sigma = calibrated_noise(cfg)
    assert sigma > calibrated_noise(plain)
    history = [(sigma, 0.025, 100), (4.0, 1.0, 1)]
    kw = {"delta": cfg.delta, "adjacency": "replace-one"}
    assert epsilon_spent(history=history, accountant="pld", **kw) <= cfg.epsilon
    # a second accountant (Opacus' PRV numerics) agrees within 2 %
    assert epsilon_spent(history=history, accountant="prv", **kw) == pytest.approx(
        cfg.epsilon, rel=0.02
    )
    # 0.1 % less noise would pass the budget: the calibration is tight
    tighter = [(sigma * 0.995, 0.025, 100), (4.0, 1.0, 1)]
    assert epsilon_spent(history=tighter, accountant="pld", **kw) > cfg.epsilon
    with pytest.raises(ValueError, match="alone spend epsilon"):
        noise_for_budget(
            epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="pld",
            adjacency="replace-one", extra=((0.5, 1.0, 1),),
        )  # fmt: skip


def test_the_prior_shrinks_with_the_noise_and_scores_only_new_users():
    counts = np.array([[30.0, 0.0, 10.0, 0.0], [0.0, 20.0, 10.0, 10.0]])
    exact = SegmentPrior(counts, noise_var=0.0, kappa=3.0)
    assert np.allclose(exact.rows, counts / counts.sum(axis=1, keepdims=True))
    noisy = SegmentPrior(counts, noise_var=1e9, kappa=3.0)  # all noise: global popularity
    assert np.allclose(noisy.rows, counts.sum(0) / counts.sum(), atol=1e-6)

    class Flat:
        def score(self, users, history, profiles, warm):  # noqa: ANN001, ANN202
            return np.zeros((len(users), 4), dtype=np.float32)

    scorer = SegmentPriorScorer(Flat(), exact, np.array([0, 1, 1]), weight=2.0)
    out = scorer.score(np.array([0, 1, 2]), [np.zeros(0)] * 3, [None] * 3,
                       np.array([True, False, False]))  # fmt: skip
    assert not out[0].any()  # a user the federation trained on: the model alone
    assert np.allclose(out[1], 2.0 * exact.log_prior(np.array([1]))[0])
    assert np.argmax(out[1]) == 1 and np.argmax(out[2]) == 1


def _sim(synth_dir, tiny_backbone, out, **over):
    from fedrec.simulations.launch import simulate

    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        protocol="C", num_rounds=2, fraction_train=1.0, partition="silo", silos=3, min_replies=2,
        evaluate_every=0, local_steps=2, sample_rate=0.5, negatives=10, slots=6, epsilon=8.0,
        lr=0.5, segment_prior="age", segment_noise=3.0, **over,
    )  # fmt: skip
    return cfg, simulate(cfg, out, baselines="popularity", num_cpus=2)


def _true_counts(synth_dir, cfg: FedConfig) -> np.ndarray:
    from fedrec.shared.data import load_dataset
    from fedrec.shared.splitting import make_split

    ds = load_dataset(synth_dir)
    split = make_split(ds, "C")
    fields = parse_fields(cfg.segment_prior)
    users = np.unique(split.train_user)
    items = [split.train_item[split.train_user == u] for u in users]
    segs = [segment_of(ds.user_fields.get(int(split.user_ids[u])), fields) for u in users]
    return count_table(items, segs, split.n_items, n_segments(fields))


def test_a_real_federation_releases_noised_counts_and_accounts_for_them(
    synth_dir, tiny_backbone, tmp_path
):
    from fedrec.shared.privacy.report import audit_run

    out = tmp_path / "dp"
    cfg, result = _sim(synth_dir, tiny_backbone, out)
    info = result["model"]["segment_prior"]
    assert info["tables"] == 3 and info["fields"] == ["age"] and "error" not in info
    assert set(info["model_alone"]) == set(result["model"]["metrics"]) == {"k=0", "k=3"}
    with np.load(out / "segment_counts.npz") as f:
        released, tables = f["counts"], int(f["tables"])
    truth = _true_counts(synth_dir, cfg)
    assert tables == 3 and released.shape == truth.shape
    assert np.array_equal(released, np.rint(released))  # each table was released rounded
    # the sum of three tables, each noised with std segment-noise per cell
    residual = (released - truth).ravel()
    want = cfg.segment_noise * np.sqrt(tables)
    assert residual.size >= 500 and 0.85 * want < residual.std() < 1.15 * want
    assert abs(residual.mean()) < 4 * want / np.sqrt(residual.size)
    lines = [json.loads(x) for x in (out / "privacy" / "ledger.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "client" in x]
    release = [2 * cfg.segment_noise, 1.0, 1]
    assert sorted(x["client"] for x in lines if x.get("release") == release) == ["p0", "p1", "p2"]
    assert all(x["round"] == 1 for x in lines if "release" in x)
    for x in lines:  # every reported epsilon counts the release
        runs = [(y["noise_multiplier"], y["sample_rate"], y["steps"]) for y in lines
                if y["client"] == x["client"] and y["round"] <= x["round"]]  # fmt: skip
        want_eps = epsilon_spent(
            history=[*runs, tuple(release)], delta=cfg.delta, accountant="pld",
            adjacency="replace-one",
        )  # fmt: skip
        assert x["epsilon_after"] == pytest.approx(want_eps, rel=1e-6)
        assert x["total_steps"] == sum(r[2] for r in runs) + 1
    report, text = audit_run(out)
    assert report["ok"], [f for f in report["findings"] if f["severity"] == "error"]
    assert "Segment counts" in (out / "privacy" / "statement.md").read_text()
    # served as evaluated: the noise variance of three tables enters the shrinkage
    from fedrec.shared.data import load_dataset
    from fedrec.shared.inference import Recommender
    from fedrec.shared.splitting import make_split
    from fedrec.simulations.recommend_segment import api_metrics

    rec = Recommender.load(out)
    assert rec.segment is not None and rec.segment.tables == 3
    want = SegmentPrior(released, noise_var=3 * cfg.segment_noise**2, kappa=cfg.segment_shrink)
    assert np.allclose(rec.segment.prior.rows, want.rows)
    assert not np.allclose(want.rows, SegmentPrior(released, noise_var=0.0, kappa=1.0).rows)
    ds = load_dataset(synth_dir)
    api = api_metrics(out, ds, make_split(ds, "C"))
    for k in ("k=0", "k=3"):
        for metric in ("NDCG@10", "Recall@10"):
            assert api[k][metric] == pytest.approx(result["model"]["metrics"][k][metric], abs=1e-9)
    # the audit catches a ledger that under-states the release's cost
    path = out / "privacy" / "ledger.jsonl"
    raw = path.read_text()
    path.write_text(raw.replace(json.dumps(release), json.dumps([cfg.segment_noise * 4, 1.0, 1])))
    report, _ = audit_run(out)
    assert not report["ok"]
    assert any("release" in f["message"] for f in report["findings"])
    path.write_text(raw)


def test_without_dp_the_server_sums_the_exact_counts(synth_dir, tiny_backbone, tmp_path):
    out = tmp_path / "nodp"
    cfg, result = _sim(synth_dir, tiny_backbone, out, dp=False)
    with np.load(out / "segment_counts.npz") as f:
        released = f["counts"]
    assert np.array_equal(released, _true_counts(synth_dir, cfg))
    assert "in the clear" in (out / "privacy" / "statement.md").read_text()
    assert result["model"]["segment_prior"]["noise_per_table"] == 0.0
    _check_serving(out, synth_dir, result, cfg)


def _check_serving(out, synth_dir, result, cfg: FedConfig) -> None:
    """The public API and ``fedrec recommend`` rank new users with the run's segment prior as
    the run's evaluation did; without the prior they say why."""
    import shutil

    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.shared.data import load_dataset
    from fedrec.shared.inference import Recommender
    from fedrec.shared.splitting import make_split
    from fedrec.simulations.recommend_segment import api_metrics

    ds = load_dataset(synth_dir)
    split = make_split(ds, "C")
    api = api_metrics(out, ds, split)
    alone = result["model"]["segment_prior"]["model_alone"]
    # the prior changes the ranking here, so the agreement below says the API applies it
    assert any(
        alone[name]["NDCG@10"] != pytest.approx(result["model"]["metrics"][name]["NDCG@10"])
        for name in ("k=0", "k=3")
    )
    for name in ("k=0", "k=3"):
        for metric in ("NDCG@10", "Recall@10"):
            want = result["model"]["metrics"][name][metric]
            assert api[name][metric] == pytest.approx(want, abs=1e-9), (name, metric)
    rec = Recommender.load(out)
    assert rec.segment is not None and rec.segment.fields == ("age",)
    assert rec.segment.weight == cfg.segment_weight
    n = len(rec.item_ids)
    plain = {r.item_id: r.score for r in rec.cold_start(history=[int(ds.item_ids[0])], k=n)}
    ranked = rec.cold_start(history=[int(ds.item_ids[0])], k=n, segment={"age": 30})
    cell = segment_of({"age": 30}, ("age",))
    log_prior = cfg.segment_weight * rec.segment.prior.log_prior(np.array([cell]))[0]
    for r in ranked:  # the model's score plus the prior's, and ranked by it
        want = plain[r.item_id] + log_prior[rec.position[r.item_id]]
        assert r.score == pytest.approx(want, rel=1e-5, abs=1e-3)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert {"segment": "age 25-34"} in [
        {k: v for k, v in b.items() if k == "segment"}
        for b in rec.cold_start(segment={"age": 30}, explain=True)[0].because
    ]
    with pytest.raises(ValueError, match="not a segment field"):
        rec.cold_start(segment={"zip": "12345"})
    runner = CliRunner()
    r = runner.invoke(app, ["recommend", str(out), "--age", "30", "--json", "-k", "3"])
    assert r.exit_code == 0, r.output
    assert [x["item_id"] for x in json.loads(r.stdout)] == [
        x.item_id for x in rec.cold_start(segment={"age": 30}, k=3)
    ]
    r = runner.invoke(app, ["recommend", str(out), "--age", "30", "--gender", "F", "-k", "3"])
    assert r.exit_code == 0 and "--gender is ignored" in r.output
    for bad, message in ((["--age", "0"], "--age 0"), (["--gender", "x"], "give F or M")):
        r = runner.invoke(app, ["recommend", str(out), *bad])
        assert r.exit_code == 2 and message in r.output, r.output
    # an item added after loading has no column in the prior: it ranks below every item the
    # segment took, and the catalog items keep their order
    before = [r.item_id for r in rec.cold_start(segment={"age": 30}, k=5)]
    rec.add_items({99999: "A film nobody has seen. Genres: Drama"})
    after = rec.cold_start(segment={"age": 30}, k=n + 1)
    assert [r.item_id for r in after[:5]] == before
    took = {int(rec.item_ids[rec.position[i]]) for i in rec.position if i != 99999
            and rec.segment.prior.rows[cell][rec._segment_cols[rec.position[i]]] > 0}  # fmt: skip
    ranks = {r.item_id: k for k, r in enumerate(after)}
    assert took and max(ranks[i] for i in took) < ranks[99999]
    for bad in ({"age": -5}, {"age": "old"}, {"age": True}, {"gender": "x"}):
        with pytest.raises(ValueError, match="segment"):
            rec.cold_start(segment=bad)
    r = runner.invoke(app, ["recommend", str(out), "--gender", "F"])
    assert r.exit_code == 2 and "give --age" in r.output, r.output
    # damaged files: plain ranking still works; --age says which file and why, no traceback
    damaged = out.parent / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "segment_counts.npz").write_bytes(b"PK\x03\x04 not a zip")
    r = runner.invoke(app, ["recommend", str(damaged), "--history", str(int(ds.item_ids[0]))])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["recommend", str(damaged), "--age", "30"])
    assert r.exit_code == 2 and "not a segment-count file" in r.output, r.output
    shutil.copy(out / "segment_counts.npz", damaged / "segment_counts.npz")
    config = json.loads((damaged / "config.json").read_text())
    config["federation"]["segment_noise"] = None
    (damaged / "config.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["recommend", str(damaged), "--age", "30"])
    assert r.exit_code == 2 and "segment_noise=None" in r.output, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)
    # counts removed: the model still serves; asking for the prior says why it cannot
    gone = out.parent / "gone"
    shutil.copytree(out, gone)
    (gone / "segment_counts.npz").unlink()
    assert Recommender.load(gone).cold_start(history=[int(ds.item_ids[0])], k=2)
    r = runner.invoke(app, ["recommend", str(gone), "--age", "30"])
    assert r.exit_code == 2 and "segment_counts.npz not found" in r.output, r.output
    # a run without the setting
    config = json.loads((gone / "config.json").read_text())
    config["federation"]["segment_prior"] = ""
    (gone / "config.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["recommend", str(gone), "--age", "30"])
    assert r.exit_code == 2 and "has no segment prior" in r.output, r.output


def test_the_server_rejects_a_bad_table_with_a_reason_and_keeps_a_good_one():
    from flwr.app import Array, ArrayRecord

    from fedrec.server.strategy import segment_table

    cfg = FedConfig(protocol="C", segment_prior="age", partition="silo", silos=2)
    rows = n_segments(("age",))
    good = np.rint(np.random.default_rng(0).normal(5, 3, (rows, 7)))
    assert np.array_equal(segment_table(ArrayRecord({"counts": Array(good)}), cfg, 7), good)
    bad = {
        "strings": np.full((rows, 7), "x"),
        "complex": good.astype(np.complex128),
        "float32": good.astype(np.float32),
        "shape": good[:, :6],
        "rows": good[:-1],
        "nan": np.where(good > 5, np.nan, good),
        "huge": np.where(good > 5, 1e308, good),
        "fractions": good + 0.25,
    }
    for name, table in bad.items():
        problem = segment_table(ArrayRecord({"counts": Array(table)}), cfg, 7)
        assert isinstance(problem, str) and problem, name
    assert isinstance(segment_table(ArrayRecord({"other": Array(good)}), cfg, 7), str)
    assert isinstance(segment_table(None, cfg, 7), str)
    negative = np.where(good > 5, -1.0, good)
    assert isinstance(segment_table(ArrayRecord({"counts": Array(negative)}), cfg, 7), np.ndarray)
    nodp = FedConfig(protocol="C", segment_prior="age", dp=False, epsilon=FedConfig.epsilon)
    assert "must be >= 0" in segment_table(ArrayRecord({"counts": Array(negative)}), nodp, 7)


def test_a_reply_whose_update_is_rejected_adds_no_segment_counts(tmp_path, monkeypatch):
    """The table and the update of one reply stand or fall together: a reply whose update is
    rejected (here: NaN) is on the ledger with its release, but its counts are not summed."""
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.server.strategy import FedRecStrategy
    from fedrec.shared.federation import contract
    from fedrec.shared.federation.params import to_record

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    template = {"lora.B": torch.zeros(3, 2), "head.item_bias": torch.zeros(4)}
    cfg = FedConfig(protocol="C", segment_prior="age", partition="silo", silos=3, min_replies=1,
                    server_opt="sgd", server_lr=1.0)  # fmt: skip
    s = FedRecStrategy(cfg, template=dict(template), ledger=tmp_path / "privacy" / "ledger.jsonl")
    s.n_items = 4
    rows = n_segments(("age",))
    tables = [np.full((rows, 4), float(10 * (n + 1))) for n in range(3)]
    updates = [
        {"lora.B": torch.ones(3, 2), "head.item_bias": torch.ones(4)},
        {"lora.B": torch.ones(3, 2), "head.item_bias": torch.tensor([1.0, float("nan"), 0, 0])},
        {"lora.B": torch.ones(3, 2), "head.item_bias": torch.ones(4)},
    ]
    metrics = {"num-examples": 5, "trained": 1, "loss": 1.0, "epsilon": 0.5, "steps": 4,
               "total-steps": 4, "noise-multiplier": 1.1, "sample-rate": 0.5,
               "seconds": 0.1}  # fmt: skip
    replies = []
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
        replies.append(Message(content=content, reply_to=to_node))
    _arrays, out = s.aggregate_train(contract.SEGMENT_ROUND, replies)
    assert out["accepted"] == 2 and out["rejected"] == 1
    assert s.segment_tables == 2
    assert np.array_equal(s.segment_sum, tables[0] + tables[2])
    lines = [
        json.loads(x) for x in (tmp_path / "privacy" / "ledger.jsonl").read_text().splitlines()
    ]
    assert [x.get("accepted", True) for x in lines if "client" in x] == [True, False, True]
    assert all("release" in x for x in lines if "client" in x)  # each spent it


def test_the_release_is_whole_numbers_with_the_noise_of_the_config():
    """Rounded: a float sum count + noise keeps low-order bits that tell a zero cell from a
    nonzero one; whole numbers do not. The rounding is post-processing of the Gaussian."""
    from fedrec.client.app import segment_record
    from fedrec.shared.federation.params import decode_array

    cfg = FedConfig(protocol="C", segment_prior="age", segment_noise=3.0)
    counts = np.zeros((n_segments(("age",)), 5000))
    counts[:, ::2] = 1.0
    out = decode_array("counts", segment_record(counts, cfg)["counts"])
    assert out.dtype == np.float64 and np.array_equal(out, np.rint(out))
    residual = out - counts
    assert 0.95 * 3.0 < residual.std() < 1.05 * 3.0  # rounding adds variance 1/12
    # the zero and the one cells' values are alike (no fine bits apart from the count)
    assert abs(residual[:, ::2].std() - residual[:, 1::2].std()) < 0.1
    exact = FedConfig(protocol="C", segment_prior="age", dp=False, epsilon=FedConfig.epsilon)
    assert np.array_equal(decode_array("counts", segment_record(counts, exact)["counts"]), counts)


def test_noised_counts_depend_on_the_counts_only_through_the_count():
    """Property, random whole-number tables: with the same noise draw, a table's release minus
    its counts is exactly the release of a zero table (no bit of the count is left in it);
    without the rounding it would not be. Bad noise is refused."""
    from fedrec.shared.federation.segments import noised_counts

    rng = np.random.default_rng(7)
    for trial in range(50):
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 300)))
        counts = rng.integers(0, 40, size=shape).astype(np.float64)
        z = float(rng.uniform(0.3, 5.0))
        out = noised_counts(counts, z, np.random.default_rng(trial))
        zero = noised_counts(np.zeros(shape), z, np.random.default_rng(trial))
        assert out.dtype == np.float64 and np.array_equal(out, np.rint(out))
        assert np.array_equal(out - counts, zero)
    # the noise is there, at the std asked (rounding adds variance 1/12)
    zero = noised_counts(np.zeros((4, 20_000)), 2.5, np.random.default_rng(1))
    assert 0.97 * 2.5 < zero.std() < 1.03 * 2.5 and abs(zero.mean()) < 0.05
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="segment-noise"):
            noised_counts(np.zeros((2, 3)), bad, np.random.default_rng(0))


def test_a_device_refuses_segment_prior_unless_its_owner_allows_it(tmp_path):
    from fedrec.client.app import device_guard

    cfg = FedConfig(protocol="C", segment_prior="age")
    with pytest.raises(ValueError, match="segment-prior"):
        device_guard(cfg, {"data-dir": str(tmp_path)})
    device_guard(cfg, {"data-dir": str(tmp_path), "allow-no-dp": "true"})
    device_guard(FedConfig(protocol="C"), {"data-dir": str(tmp_path)})


def test_a_fresh_run_never_reads_an_old_sum_and_a_resumed_one_does(tmp_path):
    from fedrec.server.strategy import FedRecStrategy
    from fedrec.shared.federation.segments import save_segment_sum

    cfg = FedConfig(protocol="C", segment_prior="age", partition="silo", silos=2)
    ledger = tmp_path / "privacy" / "ledger.jsonl"
    old = np.ones((n_segments(("age",)), 4))
    save_segment_sum(tmp_path / "segment_counts.npz", old, 2)
    resumed = FedRecStrategy(cfg, template={}, ledger=ledger, round_offset=3)
    assert resumed.segment_tables == 2 and np.array_equal(resumed.segment_sum, old)
    fresh = FedRecStrategy(cfg, template={}, ledger=ledger, round_offset=0)
    assert fresh.segment_sum is None and not (tmp_path / "segment_counts.npz").exists()


def test_central_training_ranks_new_users_with_the_exact_segment_prior(
    synth_dir, tiny_backbone, tmp_path
):
    """``train.segment_prior``: central C ranks new users as the federation's prior does, from
    exact counts; the run keeps them, so the public API and ``fedrec recommend`` serve them."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.shared.data import load_dataset
    from fedrec.shared.model.run_central import with_profile_template
    from fedrec.shared.splitting import make_split
    from fedrec.simulations.recommend_segment import api_metrics, compare

    run = tmp_path / "central"
    args = ["train-central", "--protocol", "C", "--data", str(synth_dir), "--no-baselines",
            "--set", f"model.backbone={tiny_backbone}", "--set", "model.max_length=16",
            "--set", "train.epochs=1", "--set", "train.batch_size=64",
            "--set", "train.segment_prior=age"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--out", str(run)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())["model"]
    info = metrics["segment_prior"]
    assert info["fields"] == ["age"] and info["weight"] == 100.0
    assert any(
        info["model_alone"][k]["NDCG@10"] != pytest.approx(metrics["metrics"][k]["NDCG@10"])
        for k in ("k=0", "k=3")
    )
    # the saved counts are the training users' exact (age band, item) counts
    with np.load(run / "segment_counts.npz") as f:
        counts, tables = f["counts"], int(f["tables"])
    cfg = FedConfig(protocol="C", segment_prior="age")
    assert tables == 1 and np.array_equal(counts, _true_counts(synth_dir, cfg))
    # the public path reproduces the run's evaluation (the profile texts as the run rendered
    # them: compare() reads the template from the run's config)
    report = compare(run)
    assert set(report) >= {"k=0", "k=3"}
    template = json.loads((run / "config.json").read_text())["model"]["profile_template"]
    ds = with_profile_template(load_dataset(synth_dir), template)
    split = make_split(ds, "C")
    api = api_metrics(run, ds, split)
    for k in ("k=0", "k=3"):
        for metric in ("NDCG@10", "Recall@10"):
            assert api[k][metric] == pytest.approx(metrics["metrics"][k][metric], abs=1e-9)
    r = CliRunner().invoke(app, ["recommend", str(run), "--age", "40", "--json", "-k", "2"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 2, r.output
    # protocol A has no new users; a field outside the fixed ones is refused
    for bad, needle in (
        (["--protocol", "A", "--set", "train.segment_prior=age"], "protocol C only"),
        (["--set", "train.segment_prior=zip"], "segment_prior"),
    ):
        r = CliRunner().invoke(app, [*args[:1], "--data", str(synth_dir), "--no-baselines",
                                     *bad, "--out", str(tmp_path / "bad")])  # fmt: skip
        assert r.exit_code == 2 and needle in r.output, (bad, r.output)
        assert not (tmp_path / "bad").exists()
