"""A device's record of its per-interaction secure rounds (``dp-noise=secure``;
client/interaction_budget.py): one entry per (run, round) charged before training, composed at
the RDP level (for one run at delta-max: the plan's a-priori epsilon, at least the run's
claim), capped together with the local DP-SGD history at the owner's epsilon-max, and the
ClientApp's masked-input stage on a device that keeps it."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from fedrec.client import interaction_budget as ib
from fedrec.client.budget import Budget, FileStore, MemoryStore, local_epsilon
from fedrec.client.local_train import DEVICE_BUDGET_REFUSAL
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy.secure_interaction import (
    InteractionPlan,
    interaction_summary,
    plan_interaction,
)

from .test_model import ds, make_model  # noqa: F401 - fixture re-export
from .test_secure_interaction_run import _silos3


def _cfg(**kw: object) -> FedConfig:
    base = dict(
        backbone="x", history_len=2, max_length=16, local_steps=1, sample_rate=1.0, negatives=10,
        lr=0.5, epsilon=8.0, num_rounds=4, fraction_train=1.0, examples="sequence",
        accountant="rdp", dp_noise="secure", secure_agg=True, batch_divisor=7.0,
        max_grad_norm=0.05, update_norm_max=1.0, partition="silo", silos=10,
    )  # fmt: skip
    return FedConfig(**(base | kw))  # type: ignore[arg-type]


def _plan(cfg: FedConfig, dim: int = 2000) -> InteractionPlan:
    return plan_interaction(cfg, cfg.silos, dim, cfg.silos)


def _node(**kw: object) -> dict:
    return {"data-dir": "/nowhere", "delta-max": 1e-5, "epsilon-max": 100.0, **kw}


def _snapshot(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.glob("*.json"))}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_runs_rounds_compose_to_the_plans_epsilon_at_least_the_runs_claim(tmp_path, seed):
    """On random settings (budget, rounds, silos, dimension): charging every round of a run
    gives a record whose epsilon rises with every round, equals the plan's epsilon for
    num-rounds releases (what the run's statement claims with only the minimum survivors) and
    is at least the statement's claim for any survivors at or above that minimum; the round
    after the last is refused and leaves every file as it was."""
    rng = np.random.default_rng(seed)
    cfg = _cfg(
        epsilon=float(rng.choice([1.0, 3.0, 8.0])),
        num_rounds=int(rng.integers(1, 12)),
        silos=int(rng.integers(3, 13)),
    )
    p = _plan(cfg, dim=int(rng.integers(100, 40_000)))
    node = _node(**{"epsilon-max": 1000.0})
    run = int(rng.integers(1, 2**31))
    seen = [0.0]
    for rnd in range(1, cfg.num_rounds + 1):
        ib.charge_round(node, tmp_path, cfg, p, run, rnd)
        entries = ib.load(tmp_path / ib.FILE)
        assert len(entries) == rnd and entries[-1]["round"] == rnd
        seen.append(ib.record_epsilon(entries, 1e-5))
        assert seen[-1] > seen[-2]
    claim = p.epsilon(releases=cfg.num_rounds)
    assert seen[-1] == pytest.approx(claim, rel=1e-9)
    assert seen[-1] <= cfg.epsilon * (1 + 1e-9)
    rounds = [
        {"released": True, "mu_honest": p.mu_total * (1 + rng.random())}
        for _ in range(cfg.num_rounds)
    ]
    assert interaction_summary(cfg, p, rounds)["epsilon_max"] <= seen[-1] * (1 + 1e-9)
    before = _snapshot(tmp_path)
    for rnd in (cfg.num_rounds + 1, 1):  # past num-rounds; a round already sent
        with pytest.raises(ValueError) as err:
            ib.charge_round(node, tmp_path, cfg, p, run, rnd)
        assert str(err.value) == ib.INTERACTION_RECORD_FAILURE
        assert str(tmp_path) not in str(err.value)
        assert _snapshot(tmp_path) == before
    # nothing went into the local-DP history; the cap is kept there (the node's, here)
    local = FileStore(tmp_path / "privacy-budget.json").load()
    assert local.history == [] and local.epsilon_max == 1000.0


def test_another_runs_rounds_add_up_under_the_owners_cap(tmp_path, caplog):
    """The owner's epsilon-max is the cap whatever a run asks (kept in privacy-budget.json):
    a second run is refused before its first round once the record would pass it, and composes
    with the first once the owner raises it; a run at a smaller delta composes too; a node
    config without epsilon-max or delta-max is refused (the server could set either)."""
    cfg = _cfg(epsilon=2.0, num_rounds=3)
    p = _plan(cfg)
    for rnd in (1, 2, 3):
        ib.charge_round(_node(**{"epsilon-max": 2.5}), tmp_path, cfg, p, 7, rnd)
    assert FileStore(tmp_path / "privacy-budget.json").load().epsilon_max == 2.5
    first = ib.spent(tmp_path, _node())
    assert first == pytest.approx(p.epsilon(releases=3), rel=1e-9)
    bigger = _cfg(epsilon=8.0, num_rounds=3)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as err:
        ib.charge_round(_node(**{"epsilon-max": 2.5}), tmp_path, bigger, _plan(bigger), 8, 1)
    assert str(err.value) == ib.INTERACTION_CAP_REFUSAL
    assert _snapshot(tmp_path) == before
    assert "above the cap 2.5" in caplog.text  # the figures stay in the device's log
    # the owner raises the cap: the second run's rounds compose with the first's
    ib.charge_round(_node(**{"epsilon-max": 20.0}), tmp_path, bigger, _plan(bigger), 8, 1)
    entries = ib.load(tmp_path / ib.FILE)
    assert [(e["run"], e["round"]) for e in entries] == [(7, 1), (7, 2), (7, 3), (8, 1)]
    assert ib.spent(tmp_path, _node()) > first
    # a run at a smaller delta composes too: the record is read at the device's delta-max
    other = _cfg(epsilon=8.0, num_rounds=3, delta=1e-6)
    ib.charge_round(_node(**{"epsilon-max": 20.0}), tmp_path, other, _plan(other), 9, 1)
    assert len(ib.load(tmp_path / ib.FILE)) == 5
    # without delta-max the device cannot read its cap: refused, the server told a constant
    no_delta = {"data-dir": "/nowhere", "epsilon-max": 20.0}
    with pytest.raises(ValueError) as err:
        ib.charge_round(no_delta, tmp_path, other, _plan(other), 9, 2)
    assert str(err.value) == ib.INTERACTION_RECORD_FAILURE
    assert "no delta-max" in caplog.text
    with pytest.raises(ValueError) as err:
        ib.charge_round({"data-dir": "/nowhere", "delta-max": 1e-5}, tmp_path, other,
                        _plan(other), 9, 2)  # fmt: skip
    assert str(err.value) == ib.INTERACTION_RECORD_FAILURE
    assert "no epsilon-max" in caplog.text
    assert len(ib.load(tmp_path / ib.FILE)) == 5


def test_local_and_secure_spending_share_one_cap(tmp_path, ds, tiny_backbone):  # noqa: F811
    """Basic composition of the two records: a secure round is refused when its record's
    epsilon plus the local DP-SGD history's would pass the cap, and a local DP-SGD round is
    refused when its history's epsilon plus the secure record's would."""
    from fedrec.client.local_train import build_examples, train_round
    from fedrec.shared.model.candidates import CandidateScorer

    local_cfg = FedConfig(
        backbone="x", history_len=2, max_length=16, local_steps=1, sample_rate=0.5, negatives=10,
        lr=0.5, epsilon=100.0, examples="sequence", accountant="rdp", slots=6,
    )  # fmt: skip
    history = [(1.2, 0.5, 3)]
    local = Budget(history, local_cfg.dp_mechanism(), None)
    FileStore(tmp_path / "privacy-budget.json").save(local)
    eps_local = local_epsilon(local)
    assert eps_local > 0
    cfg = _cfg(epsilon=2.0, num_rounds=2)
    p = _plan(cfg)
    one, two = p.epsilon(releases=1), p.epsilon(releases=2)
    cap = eps_local + (one + two) / 2
    node = _node(**{"epsilon-max": cap})
    ib.charge_round(node, tmp_path, cfg, p, 1, 1)
    with pytest.raises(ValueError) as err:
        ib.charge_round(node, tmp_path, cfg, p, 1, 2)
    assert str(err.value) == ib.INTERACTION_CAP_REFUSAL
    # without the local history the same round would have passed
    assert two <= cap

    # a local DP-SGD round on another device with a secure record: its own epsilon alone is
    # within the cap, but not with the secure record's on top
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer = CandidateScorer(model)
    rng = np.random.default_rng(0)
    users = [(rng.integers(0, scorer.n_items, 6), np.sort(rng.choice(10**6, 6, replace=False)))]
    ex = build_examples(users, slots=6, history_len=2, key=0, sequence=True)
    alone = train_round(scorer, ex, local_cfg, MemoryStore(Budget(list(history),
                        local_cfg.dp_mechanism(), None)), seed=0)  # fmt: skip
    assert alone.trained
    other = tmp_path / "other"
    FileStore(other / "privacy-budget.json").save(local)
    ib.charge_round(_node(**{"epsilon-max": 1000.0}), other, cfg, p, 1, 1)
    assert ib.spent(other, _node()) == pytest.approx(one)
    cap = alone.epsilon + one / 2
    store = FileStore(other / "privacy-budget.json")
    elsewhere = functools.partial(ib.spent, other, _node())
    res = train_round(scorer, ex, local_cfg, store, seed=0, device_cap=cap,
                      spent_elsewhere=elsewhere)  # fmt: skip
    # the reason reaches the server: a constant, not the figures (the history it also carries
    # would give the secure record's epsilon back)
    assert not res.trained and res.reason == DEVICE_BUDGET_REFUSAL, res.reason
    assert store.load().history == history  # nothing charged
    res = train_round(scorer, ex, local_cfg, store, seed=0, device_cap=cap)
    assert res.trained  # the same round without the secure record: within the cap


def test_the_collusion_risk_is_spread_over_the_runs_rounds_and_comes_out_of_delta(tmp_path):
    """A plan with a collusion risk (none of the presets has one; a stand-in plan here): each
    entry carries risk / num-rounds, and the record is read at delta-max minus the entries'
    risks, exactly the composition of the same releases at that smaller delta."""
    from types import SimpleNamespace

    from fedrec.shared.privacy import skellam

    cfg = _cfg(epsilon=4.0, num_rounds=4)
    p = _plan(cfg)
    risky = SimpleNamespace(mu_total=p.mu_total, l1=p.l1, l2=p.l2, collusion_risk=4e-6)
    for rnd in (1, 2, 3):
        ib.charge_round(_node(**{"epsilon-max": 100.0}), tmp_path, cfg, risky, 1, rnd)
    entries = ib.load(tmp_path / ib.FILE)
    assert [e["risk"] for e in entries] == pytest.approx([1e-6] * 3)
    rest = 1e-5 - 3e-6
    want = max(
        skellam.skellam_epsilon(p.mu_total, p.l1, p.l2, 3, rest),
        skellam.skellam_epsilon_independent(p.mu_total, p.l2, 3, rest),
    )
    assert ib.spent(tmp_path, _node()) == pytest.approx(want, rel=1e-9)
    assert ib.spent(tmp_path, _node()) > ib.record_epsilon([dict(e, risk=0.0) for e in entries],
                                                           1e-5)  # fmt: skip
    # risks that use up delta-max leave no finite bound: the cap refuses
    ib.charge_round(_node(**{"epsilon-max": 100.0}), tmp_path, cfg, risky, 1, 4)
    assert ib.spent(tmp_path, _node(**{"delta-max": 4e-6})) == float("inf")
    with pytest.raises(ValueError) as err:
        ib.charge_round(_node(**{"epsilon-max": 100.0, "delta-max": 4e-6}), tmp_path, cfg, risky,
                        2, 1)  # fmt: skip
    assert str(err.value) == ib.INTERACTION_CAP_REFUSAL


@pytest.mark.parametrize("seed", [0, 1])
def test_runs_of_different_plans_compose_within_their_separate_figures(tmp_path, seed):
    """Two runs with other budgets, rounds and sizes on one device: the record is at least
    each run's own figure and at most their sum (basic composition), and it does not depend on
    the order the rounds were recorded in."""
    rng = np.random.default_rng(seed)
    a = _cfg(epsilon=float(rng.uniform(1, 8)), num_rounds=int(rng.integers(1, 6)),
             silos=int(rng.integers(3, 12)))  # fmt: skip
    b = _cfg(epsilon=float(rng.uniform(1, 8)), num_rounds=int(rng.integers(1, 6)),
             silos=int(rng.integers(3, 12)), history_len=3)  # fmt: skip
    pa, pb = _plan(a, int(rng.integers(100, 30_000))), _plan(b, int(rng.integers(100, 30_000)))
    node = _node(**{"epsilon-max": 100.0})
    for rnd in range(1, a.num_rounds + 1):
        ib.charge_round(node, tmp_path / "ab", a, pa, 1, rnd)
    for rnd in range(1, b.num_rounds + 1):
        ib.charge_round(node, tmp_path / "ab", b, pb, 2, rnd)
        ib.charge_round(node, tmp_path / "ba", b, pb, 2, rnd)
    for rnd in range(1, a.num_rounds + 1):
        ib.charge_round(node, tmp_path / "ba", a, pa, 1, rnd)
    ea, eb = pa.epsilon(releases=a.num_rounds), pb.epsilon(releases=b.num_rounds)
    both = ib.spent(tmp_path / "ab", node)
    assert max(ea, eb) < both <= (ea + eb) * (1 + 1e-9)
    assert ib.spent(tmp_path / "ba", node) == pytest.approx(both, rel=1e-12)


def test_a_damaged_record_stops_the_device_and_two_runs_cannot_pass_the_cap_together(tmp_path):
    cfg = _cfg(epsilon=2.0, num_rounds=2)
    p = _plan(cfg)
    one, two = p.epsilon(releases=1), p.epsilon(releases=2)
    node = _node(**{"epsilon-max": (one + two) / 2})  # room for one round, not two
    outcomes: list[str] = []

    def charge(run: int) -> None:
        try:
            ib.charge_round(node, tmp_path, cfg, p, run, 1)
            outcomes.append("ok")
        except ValueError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=charge, args=(r,)) for r in (1, 2, 3)]  # three runs
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", ib.INTERACTION_CAP_REFUSAL, ib.INTERACTION_CAP_REFUSAL]
    assert len(ib.load(tmp_path / ib.FILE)) == 1
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".interaction-")]
    path = tmp_path / ib.FILE
    good = json.loads(path.read_text())
    for bad in (
        "{",
        json.dumps({"releases": "none"}),
        json.dumps(good | {"releases": [good["releases"][0] | {"mu_total": float("nan")}]}),
        json.dumps(good | {"releases": [good["releases"][0] | {"mu_total": 0}]}),
        json.dumps(good | {"releases": [good["releases"][0] | {"l2": -1.0}]}),
        json.dumps(good | {"releases": [good["releases"][0] | {"risk": 1.0}]}),
        json.dumps(good | {"releases": [good["releases"][0] | {"round": 1.5}]}),
        json.dumps(good | {"releases": good["releases"] * 2}),
    ):
        path.write_text(bad)
        with pytest.raises(ValueError, match="unreadable"):
            ib.load(path)
        with pytest.raises(ValueError) as err:
            ib.charge_round(node, tmp_path, cfg, p, 9, 1)
        assert str(err.value) == ib.INTERACTION_RECORD_FAILURE
        assert path.read_text() == bad
        with pytest.raises(ValueError) as err:
            ib.spent(tmp_path, node)  # a local-DP round's cap check refuses too
        assert str(err.value) == ib.INTERACTION_RECORD_FAILURE


def test_a_device_runs_dp_noise_secure_only_in_a_secure_round(tmp_path):
    from fedrec.client.app import device_guard

    node = {"data-dir": str(tmp_path), "delta-max": 1e-5, "epsilon-max": 8.0}
    device_guard(_cfg(), node, secure=True)  # the masked input: accepted
    with pytest.raises(ValueError, match="no delta-max"):  # its cap needs its own delta
        device_guard(_cfg(), {"data-dir": str(tmp_path), "epsilon-max": 8.0}, secure=True)
    with pytest.raises(ValueError, match="no epsilon-max"):  # and its own epsilon
        device_guard(_cfg(), {"data-dir": str(tmp_path), "delta-max": 1e-5}, secure=True)
    with pytest.raises(ValueError, match="trains only under local DP"):
        device_guard(_cfg(), node, secure=False)  # a plain reply would carry no noise
    with pytest.raises(ValueError, match="delta-max"):
        device_guard(_cfg(delta=1e-4), node | {"delta-max": 1e-5}, secure=True)


def test_a_device_refuses_a_secure_round_that_assumes_fewer_colluders_than_its_floor(tmp_path):
    """``secagg-colluders-min`` (node config): the owner's floor under the collusion the noise
    is calibrated for, in both secure modes; a bad floor is a node-config error."""
    from fedrec.client.app import device_guard

    node = {"data-dir": str(tmp_path), "delta-max": 1e-5, "epsilon-max": 8.0}
    user_level = FedConfig(dp=False, user_dp=True, secure_agg=True, user_clip=1.0)
    for cfg in (_cfg(), user_level):
        device_guard(cfg, node | {"secagg-colluders-min": "0.05"}, secure=True)  # equal: fine
        for low in (0.0, 0.049):
            with pytest.raises(ValueError, match="below this device's secagg-colluders-min"):
                device_guard(
                    dataclasses.replace(cfg, secagg_colluders=low),
                    node | {"secagg-colluders-min": 0.05},
                    secure=True,
                )
        device_guard(  # more colluders assumed: more noise per client, accepted
            dataclasses.replace(cfg, secagg_colluders=0.2),
            node | {"secagg-colluders-min": 0.05},
            secure=True,
        )
    for bad in ("0.5", "x", "nan", "0", -0.1):
        with pytest.raises(ValueError, match="node config secagg-colluders-min="):
            device_guard(_cfg(), node | {"secagg-colluders-min": bad}, secure=True)
    # in simulation (no data-dir) there is no device owner: the node config is not read
    device_guard(_cfg(secagg_colluders=0.0), {"secagg-colluders-min": 0.3}, secure=True)


def test_a_device_records_its_secure_rounds_across_runs_and_refuses_at_its_cap(
    synth_dir, tiny_backbone, tmp_path
):
    """Three devices in the ClientApp's masked-input stage: each states the federation's size
    and records every round before training, nothing in its local-DP history; a second run on
    the same devices composes with the first and is refused at the cap; a device that does not
    state the federation's size, or states another, is refused."""
    from .test_secure_federation import _masked_round

    cfg = _silos3(synth_dir, tiny_backbone, num_rounds=2)
    from fedrec.shared.federation.data_and_model import dataset_and_split, model_for
    from fedrec.shared.federation.params import travelling_state

    d, split = dataset_and_split(cfg.data, cfg.protocol, cfg.seed)
    dim = sum(t.numel() for t in travelling_state(model_for(cfg, d, split)).values())
    p = plan_interaction(cfg, 3, dim, 3)
    cap = (p.epsilon(releases=2) + p.epsilon(releases=3)) / 2

    def devices(**kw: object) -> dict[int, dict]:
        return {
            part: {"data-dir": str(synth_dir), "state-dir": str(tmp_path / f"dev{part}"),
                   "federation-clients": 3, "epsilon-max": cap, "delta-max": cfg.delta, **kw}
            for part in (0, 1, 2)
        }  # fmt: skip

    for rnd in (1, 2):
        replies = _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=devices(), rnd=rnd)
        assert all(not r.has_error() for r in replies.values())  # type: ignore[attr-defined]
    for part in (0, 1, 2):
        state = tmp_path / f"dev{part}"
        entries = ib.load(state / ib.FILE)
        assert [(e["run"], e["round"]) for e in entries] == [(1, 1), (1, 2)]
        assert ib.record_epsilon(entries, cfg.delta) == pytest.approx(p.epsilon(releases=2))
        local = FileStore(state / "privacy-budget.json").load()
        assert local.history == [] and local.epsilon_max == cap
    with pytest.raises(ValueError) as err:  # run 2 would take the record past the cap
        _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=devices(), run_id=2)
    assert str(err.value) == ib.INTERACTION_CAP_REFUSAL
    with pytest.raises(ValueError) as err:  # run 1's round 1 again: never sent twice
        _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=devices(**{"epsilon-max": 99}))
    assert str(err.value) == ib.INTERACTION_RECORD_FAILURE
    replies = _masked_round(
        cfg, cohort=3, parts=[0, 1, 2], devices=devices(**{"epsilon-max": 99}), run_id=2
    )
    assert len(ib.load(tmp_path / "dev0" / ib.FILE)) == 3
    bare = devices()
    for n in bare.values():
        del n["federation-clients"]
    with pytest.raises(ValueError, match="federation-clients=N"):
        _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=bare, run_id=3)
    with pytest.raises(ValueError, match="federation-clients is 4; refused"):
        _masked_round(cfg, cohort=3, parts=[0, 1, 2],
                      devices=devices(**{"federation-clients": 4}), run_id=3)  # fmt: skip
    for bad in (True, 3.7, "three"):
        with pytest.raises(ValueError, match="refused"):
            _masked_round(cfg, cohort=3, parts=[0, 1, 2],
                          devices=devices(**{"federation-clients": bad}), run_id=3)  # fmt: skip
    without = devices()
    for n in without.values():
        del n["delta-max"]
    with pytest.raises(ValueError, match="no delta-max"):  # the node config's fault: said so
        _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=without, run_id=3)
    floor = devices(**{"secagg-colluders-min": 0.4})  # more collusion than the run assumes
    with pytest.raises(ValueError, match="below this device's secagg-colluders-min"):
        _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=floor, run_id=3)
    assert len(ib.load(tmp_path / "dev0" / ib.FILE)) == 3  # nothing recorded for those


def test_deploy_budget_prints_the_secure_record_and_the_sum(tmp_path):
    from .test_cli import fedrec

    cfg = _cfg(epsilon=3.0, num_rounds=2)
    p = _plan(cfg)
    state = tmp_path / "data" / "fedrec-state"
    mech = {"accountant": "rdp", "adjacency": "add-remove", "group_size": 1, "delta": 1e-5}
    FileStore(state / "privacy-budget.json").save(Budget([(1.1, 0.02, 40)], mech, 8.0))
    for rnd in (1, 2):
        ib.charge_round(_node(**{"epsilon-max": 8.0, "delta-max": 2e-5}), state, cfg, p, 5, rnd)
    r = fedrec("deploy", "budget", tmp_path / "data", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    sec, tot = b["secure_interaction"], b["per_interaction_total"]
    # read at the delta-max the device charged the rounds at (2e-5), not the run's 1e-5
    assert sec["rounds"] == 2 and sec["runs"] == 1 and sec["delta"] == 2e-5
    assert sec["epsilon"] == pytest.approx(ib.spent(state, _node(**{"delta-max": 2e-5})))
    assert sec["epsilon"] < p.epsilon(releases=2)  # the larger delta, the smaller epsilon
    assert tot["epsilon"] == pytest.approx(b["local_dp"]["epsilon"] + sec["epsilon"])
    assert tot["delta"] == pytest.approx(1e-5 + 2e-5) and tot["epsilon_max"] == 8.0
    r = fedrec("deploy", "budget", state, "--json", "--delta", "1e-5")
    at_run_delta = json.loads(r.stdout)["secure_interaction"]
    assert at_run_delta["epsilon"] == pytest.approx(p.epsilon(releases=2), rel=1e-9)
    r = fedrec("deploy", "budget", state, "--delta", "2")
    assert r.returncode == 2 and "--delta 2" in r.stderr and "Traceback" not in r.stderr
    r = fedrec("deploy", "budget", state)
    assert r.returncode == 0 and "2 round(s) of 1 run(s)" in r.stdout
    assert f"{tot['epsilon']:.4f}" in r.stdout
    # a device with only this record is a device with a budget
    lone = tmp_path / "lone"
    ib.charge_round(_node(), lone, cfg, p, 5, 1)
    (lone / "privacy-budget.json").unlink()
    r = fedrec("deploy", "budget", lone, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["secure_interaction"]["rounds"] == 1


def test_a_round_whose_training_fails_after_the_charge_stays_charged(
    synth_dir, tiny_backbone, tmp_path, monkeypatch
):
    """When training fails on a device, it still sends a zero change with its noise share (a
    release happens: no error reply) and the round stays in its record."""
    from fedrec.client import app as client_app

    from .test_secure_federation import _masked_round

    cfg = _silos3(synth_dir, tiny_backbone, num_rounds=2)

    def broken(*a: object, **k: object) -> object:
        raise FloatingPointError("a non-finite update")

    monkeypatch.setattr(client_app, "train_reply", broken)
    devices = {
        part: {"data-dir": str(synth_dir), "state-dir": str(tmp_path / f"dev{part}"),
               "federation-clients": 3, "delta-max": cfg.delta, "epsilon-max": 8.0}
        for part in (0, 1, 2)
    }  # fmt: skip
    replies = _masked_round(cfg, cohort=3, parts=[0, 1, 2], devices=devices)
    assert all(not r.has_error() for r in replies.values())  # type: ignore[attr-defined]
    for part in (0, 1, 2):
        entries = ib.load(tmp_path / f"dev{part}" / ib.FILE)
        assert [(e["run"], e["round"]) for e in entries] == [(1, 1)]


def test_the_cap_is_kept_before_the_entry_is_written(tmp_path, monkeypatch):
    """A write of the record that fails leaves no entry and no temp file, and the owner's cap
    is already in privacy-budget.json (a crash between the two can only leave the cap)."""
    real = ib._write_durably

    def failing(path, doc, prefix):  # noqa: ANN001, ANN202
        if path.name == ib.FILE:
            raise OSError("disk full")
        return real(path, doc, prefix)

    monkeypatch.setattr(ib, "_write_durably", failing)
    cfg = _cfg()
    with pytest.raises(ValueError) as err:
        ib.charge_round(_node(**{"epsilon-max": 7.0}), tmp_path, cfg, _plan(cfg), 1, 1)
    assert str(err.value) == ib.INTERACTION_RECORD_FAILURE
    assert not (tmp_path / ib.FILE).exists()
    assert FileStore(tmp_path / "privacy-budget.json").load().epsilon_max == 7.0


def test_a_local_dp_round_through_the_client_app_counts_the_devices_secure_record(
    synth_dir, tiny_backbone, tmp_path, monkeypatch
):
    """The ClientApp's plain train handler on a device (local DP-SGD, ``dp-noise=client``):
    with a secure record that leaves less room under ``epsilon-max`` than the round needs, it
    refuses with the constant reason and changes no file; a device without the record, under
    the same cap, trains."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedrec.client.app as client_app
    from fedrec.shared.federation import contract
    from fedrec.shared.federation.data_and_model import dataset_and_split, model_for
    from fedrec.shared.federation.params import to_record, travelling_state

    local = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=4,
        local_steps=2, sample_rate=0.5, negatives=10, slots=6, lr=0.5, epsilon=8.0,
        num_rounds=2,
    )  # fmt: skip
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # messages are built inside a task
    data, split = dataset_and_split(local.data, local.protocol, local.seed)
    sent = to_record(travelling_state(model_for(local, data, split)))

    def train(state: Path, cap: float) -> Message:
        node = {"data-dir": str(synth_dir), "state-dir": str(state), "delta-max": 1e-5,
                "epsilon-max": cap}  # fmt: skip
        config = ConfigRecord({**local.to_flat(), "server-round": 1})
        content = RecordDict({contract.ARRAYS: sent, contract.CONFIG: config})
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        return client_app.train(Message(content, dst_node_id=1, message_type="train"), ctx)

    probe = train(tmp_path / "probe", 1000.0)  # what one local round spends on this data
    assert contract.ARRAYS in probe.content, probe.content[contract.CLIENT]["reason"]
    one_local = float(probe.content[contract.METRICS]["epsilon"])
    assert 0 < one_local < 8
    secure_cfg = _cfg()
    p = _plan(secure_cfg)
    with_record = tmp_path / "with-record"
    for rnd in (1, 2):  # two secure rounds of another run, charged under a loose cap
        ib.charge_round(_node(**{"epsilon-max": 1000.0}), with_record, secure_cfg, p, 7, rnd)
    secure = ib.spent(with_record, _node())
    assert secure > 0
    cap = secure + one_local / 2  # room for half a local round on top of the record
    before = _snapshot(with_record)
    reply = train(with_record, cap)
    assert contract.ARRAYS not in reply.content
    assert reply.content[contract.CLIENT]["reason"] == DEVICE_BUDGET_REFUSAL
    assert _snapshot(with_record) == before  # nothing charged, the record unchanged
    fresh = train(tmp_path / "fresh", cap)  # the same cap without the record: within it
    assert contract.ARRAYS in fresh.content, fresh.content[contract.CLIENT]["reason"]
