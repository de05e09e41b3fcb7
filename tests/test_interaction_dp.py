"""Per-interaction DP-SGD with the noise at a trusted server (``dp-noise=server``).

What the claim rests on, checked on random data: the clients' un-noised changes sum to the one
central DP-SGD step over the union of their examples, one window moves that sum by at most
``lr * C / batch-divisor``, the server adds noise of ``lr * sigma * C / batch-divisor`` to the sum
(not the mean), and a real Flower federation records, states and audits it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import ClientExamples, build_examples, train_round
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.privacy.accounting import epsilon_spent
from fedrec.shared.privacy.calibration import calibrated_noise, server_noise_std

from .test_model import ds, make_model  # noqa: F401 - fixture re-export


@pytest.fixture
def task_identity(monkeypatch):
    """A Flower task identity for building messages (as tests/test_strategy.py gives its own)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _cfg(**kw):
    base = dict(
        backbone="x", history_len=2, max_length=16, local_steps=1, sample_rate=1.0, negatives=10,
        lr=0.5, epsilon=8.0, num_rounds=4, fraction_train=1.0, examples="sequence",
        accountant="rdp", dp_noise="server", batch_divisor=7.0, max_grad_norm=0.05,
    )  # fmt: skip
    base.update(kw)
    return FedConfig(**base)


def _rows(ex: ClientExamples, keep: np.ndarray) -> ClientExamples:
    return ClientExamples(ex.targets[keep], ex.context[keep], None, ex.users)


def _change(model, ex: ClientExamples, cfg: FedConfig) -> torch.Tensor:
    """One client's reply minus the global model, flattened (a fresh copy of the model)."""
    m = copy.deepcopy(model)
    scorer = CandidateScorer(m)
    before = {k: p.detach().clone() for k, p in scorer.named_parameters() if p.requires_grad}
    r = train_round(scorer, ex, cfg, MemoryStore(), seed=0)
    assert r.trained and r.steps == 1
    after = dict(scorer.named_parameters())
    return torch.cat([(after[k].detach() - v).reshape(-1).double() for k, v in before.items()])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clients_sum_to_one_central_step_and_a_window_moves_it_by_at_most_lr_c_over_d(
    ds,  # noqa: F811
    tiny_backbone,
    monkeypatch,
    seed,
):
    """Random histories split into two clients, q = 1 (every window in the step) and one fixed
    negatives key: the two clients' changes sum to the change of one client holding all their
    windows (the central step), no noise is in them, and removing any one window moves the sum
    by at most lr * C / D in L2, the sensitivity the server's noise is calibrated for."""
    import fedrec.client.local_train as lt

    rng = np.random.default_rng(seed)
    monkeypatch.setattr(lt.secrets, "token_bytes", lambda n: bytes(range(n)))
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    n_items = CandidateScorer(model).n_items
    users = []
    for _ in range(int(rng.integers(3, 6))):
        n = int(rng.integers(4, 9))
        users.append((rng.integers(0, n_items, n), np.sort(rng.choice(10**6, n, replace=False))))
    cut = int(rng.integers(1, len(users)))
    cfg = _cfg(backbone=str(tiny_backbone))
    a = build_examples(users[:cut], slots=6, history_len=2, key=0, sequence=True)
    b = build_examples(users[cut:], slots=6, history_len=2, key=0, sequence=True)
    union = build_examples(users, slots=6, history_len=2, key=0, sequence=True)
    ca, cb, cu = _change(model, a, cfg), _change(model, b, cfg), _change(model, union, cfg)
    assert cu.abs().sum() > 0
    torch.testing.assert_close(ca + cb, cu, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_change(model, a, cfg), ca)  # no noise: the same step again
    bound = cfg.lr * cfg.max_grad_norm / cfg.batch_divisor
    moved = []
    for drop in rng.permutation(len(a))[: min(4, len(a))]:
        keep = np.arange(len(a)) != drop
        diff = float((_change(model, _rows(a, keep), cfg) + cb - cu).norm())
        assert diff <= bound * (1 + 1e-4) + 1e-7, (drop, diff, bound)
        moved.append(diff)
    assert max(moved) > 0.5 * bound  # the clip binds: the bound is not vacuous here


def test_the_budget_is_charged_for_the_noise_the_server_adds(ds, tiny_backbone):  # noqa: F811
    """The client takes no noise itself but is charged (and reports) the sigma the server adds:
    the same history and epsilon as its own DP-SGD step at that sigma."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    n = CandidateScorer(model).n_items
    ex = build_examples(
        [(np.arange(8) % n, np.arange(8))], slots=6, history_len=2, key=0, sequence=True
    )
    cfg = _cfg(backbone=str(tiny_backbone), sample_rate=0.5)
    store = MemoryStore()
    r = train_round(CandidateScorer(model), ex, cfg, store, seed=0)
    sigma = calibrated_noise(cfg, 0.5)
    assert r.trained and r.noise_multiplier == sigma > 0
    assert store.load().history == [(sigma, 0.5, 1)]
    assert r.epsilon == pytest.approx(
        epsilon_spent(history=[(sigma, 0.5, 1)], delta=cfg.delta, group=cfg.dp_group())
    )


def test_server_adds_the_calibrated_noise_to_the_sum_not_the_mean(tmp_path):
    from fedrec.server.interaction_dp import ServerNoise
    from fedrec.server.strategy import FedRecStrategy

    cfg = _cfg(lr=2.0, max_grad_norm=1.5, batch_divisor=3.0, server_lr=1.0)
    template = {"w": torch.zeros(400_000)}
    strategy = FedRecStrategy(cfg, template=template, ledger=tmp_path / "ledger.jsonl")
    noise = ServerNoise(strategy, sigma=0.8)
    assert noise.std == pytest.approx(2.0 * 0.8 * 1.5 / 3.0) == server_noise_std(cfg, 0.8)
    changes = {"w": torch.stack([torch.full((400_000,), 1.0), torch.full((400_000,), 2.0)])}
    new = strategy._mean_step(changes, 1)["w"].double()
    assert float(new.mean()) == pytest.approx(3.0, abs=0.01)  # the sum (3), not the mean (1.5)
    assert float((new - 3.0).std()) == pytest.approx(noise.std, rel=0.01)
    assert strategy.round_noise_std == noise.std
    with pytest.raises(ValueError, match="dp-noise = server"):
        ServerNoise(FedRecStrategy(_cfg(dp_noise="client"), template=template, ledger=tmp_path), 1)


def test_an_over_norm_update_is_scaled_down_never_rejected_and_its_norm_not_logged(
    tmp_path, caplog, task_identity
):
    """The default update-norm-action is reject; a rejection could turn on one window, so under
    dp-noise=server the server projects the change onto the ball instead, and does not log
    the un-noised change's norm."""
    import logging

    from fedrec.server.interaction_dp import ServerNoise
    from fedrec.server.strategy import FedRecStrategy

    from .test_strategy import TEMPLATE, _metrics, _reply

    cfg = _cfg(update_norm_max=2.0, update_norm_action="reject", min_replies=1, lr=1.0)
    s = FedRecStrategy(cfg, template=dict(TEMPLATE), ledger=tmp_path / "ledger.jsonl")
    ServerNoise(s, sigma=1e-9)  # noise too small to matter here
    big = {k: torch.full_like(v, 10.0) for k, v in TEMPLATE.items()}
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        arrays, metrics = s.aggregate_train(
            1, [_reply(1, big, _metrics(steps=1, **{"total-steps": 1}))]
        )
    assert arrays is not None and metrics["accepted"] == 1 and metrics["rejected"] == 0
    change = torch.cat([s.current[k].reshape(-1) - TEMPLATE[k].reshape(-1) for k in TEMPLATE])
    assert float(change.norm()) == pytest.approx(2.0, rel=1e-4)
    assert "scaled down to update-norm-max=2" in caplog.text and "L2 norm" not in caplog.text


def test_a_round_without_the_servers_noise_is_not_released(tmp_path, task_identity):
    from fedrec.server.strategy import FedRecStrategy

    from .test_strategy import TEMPLATE, _metrics, _reply

    s = FedRecStrategy(_cfg(min_replies=1), template=dict(TEMPLATE), ledger=tmp_path / "l.jsonl")
    one = {k: torch.ones_like(v) for k, v in TEMPLATE.items()}
    with pytest.raises(RuntimeError, match="added no noise"):
        s.aggregate_train(
            1, [_reply(1, one, _metrics(steps=1, **{"total-steps": 1}))]
        )  # no ServerNoise attached: a bug, caught
    assert all(torch.equal(s.current[k], TEMPLATE[k]) for k in TEMPLATE)


@pytest.mark.parametrize(
    "key,bad,why",
    [
        ("local_steps", 2, "local-steps"),
        ("lr_offsets", 3.0, "lr-offsets"),
        ("lr_id", 3.0, "lr-id"),
        ("lr_map", 3.0, "lr-map"),
        ("secure_agg", True, "secure-agg"),
        ("poison", "0.5:scale:2", "poison"),
        ("audit_canaries", "c.json", "audit-canaries"),
        ("fraction_train", 0.5, "fraction-train"),
        ("batch_divisor", 0.0, "batch-divisor"),
        ("sample_rate", 0.0, "sample-rate"),
        ("lr_factors", 3.0, "lr-factors"),
        ("local_opt", "adam", "local-opt"),
        ("robust", "median", "robust"),
        ("user_dp", True, "user-dp"),
        ("dp", False, "'dp'"),
        ("dp_noise", "both", "dp-noise"),
    ],
)
def test_server_noise_refuses_settings_that_break_one_release_a_round(key, bad, why):
    _cfg()  # the base is valid
    with pytest.raises(ValueError, match=why):
        _cfg(**{key: bad})


def test_server_noise_refuses_factor_rows_and_the_segment_release():
    _cfg(dp_noise="client", factor_rows=50, item_factors=4)
    with pytest.raises(ValueError, match="factor-rows"):
        _cfg(factor_rows=50, item_factors=4)
    _cfg(dp_noise="client", protocol="C", segment_prior="gender")
    with pytest.raises(ValueError, match="segment-prior"):
        _cfg(protocol="C", segment_prior="gender")


def test_a_device_refuses_to_send_its_change_without_noise():
    from fedrec.client.app import device_guard

    dev = {"data-dir": "/data/me"}
    device_guard(_cfg(dp_noise="client"), dev)
    with pytest.raises(ValueError, match="dp-noise=server"):
        device_guard(_cfg(), dev)
    device_guard(_cfg(), dev | {"allow-no-dp": "true"})  # its owner's explicit choice
    device_guard(_cfg(), {"partition-id": 0})  # simulation


def test_server_noise_on_a_real_federation(synth_dir, tiny_backbone, tmp_path):
    """Two silos in a real Flower simulation: every ledger line says the server added the
    noise, every round records the calibrated std, the statement says the server is trusted and
    `fedrec audit` passes; with a round's recorded noise halved, the audit fails."""
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    out = tmp_path / "srv"
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=2,
        num_rounds=2, partition="silo", silos=2, fraction_train=1.0, evaluate_every=0,
        local_steps=1, sample_rate=0.5, negatives=10, lr=0.5, examples="sequence",
        accountant="rdp", epsilon=8.0, dp_noise="server", batch_divisor=20.0,
    )  # fmt: skip
    result = simulate(cfg, out, baselines="none", num_cpus=2)
    lines = [json.loads(x) for x in (out / "privacy" / "ledger.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "client" in x]
    assert len(lines) == 4 and all(x["noise_at"] == "server" for x in lines)
    sigma = lines[0]["noise_multiplier"]
    assert sigma == calibrated_noise(cfg, 0.5) > 0
    rounds = result["model"]["rounds"]
    assert [r["server_noise_std"] for r in rounds] == [server_noise_std(cfg, sigma)] * 2
    statement = (out / "privacy" / "statement.md").read_text()
    assert "the server is TRUSTED" in statement and "`dp-noise` = server" in statement
    assert "NOT the clients' replies" in statement and "(local DP-SGD)" not in statement
    report, text = audit_run(out, plot=False)
    assert report["ok"], text
    from fedrec import cli

    line = cli._headline(cfg, result)
    assert "DP-SGD with the noise added by the server" in line and "it is trusted" in line
    doc = json.loads((out / "metrics.json").read_text())
    doc["model"]["rounds"][1]["server_noise_std"] /= 2
    (out / "metrics.json").write_text(json.dumps(doc))
    report, text = audit_run(out, plot=False)
    assert not report["ok"] and "server noise std" in text
    # a round the run has no record of (metrics.json and progress.jsonl both without it)
    del doc["model"]["rounds"][1]
    doc["model"]["rounds"][0]["server_noise_std"] *= 2
    (out / "metrics.json").write_text(json.dumps(doc))
    kept = [x for x in (out / "progress.jsonl").read_text().splitlines() if '"round": 2' not in x]
    (out / "progress.jsonl").write_text("\n".join(kept) + "\n")
    report, text = audit_run(out, plot=False)
    assert not report["ok"] and "records whether" in text and "server noise std" not in text
