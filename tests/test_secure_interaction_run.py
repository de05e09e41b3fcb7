"""Per-interaction DP without a trusted server (``dp-noise=secure``) as it runs: the client's
step in float64 (what the sensitivity bounds), and a real Flower simulation whose secure rounds
carry the clients' Skellam shares, whose claim is recomputed by `fedrec audit`, and whose audit
fails when the round log or the claim is doctored."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import build_examples, train_round
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.privacy import skellam

from .test_model import ds, make_model  # noqa: F401 - fixture re-export


def _cfg(**kw: object) -> FedConfig:
    base = dict(
        backbone="x", history_len=2, max_length=16, local_steps=1, sample_rate=1.0, negatives=10,
        lr=0.5, epsilon=8.0, num_rounds=4, fraction_train=1.0, examples="sequence",
        accountant="rdp", dp_noise="secure", secure_agg=True, batch_divisor=7.0,
        max_grad_norm=0.05, update_norm_max=1.0, partition="silo", silos=10,
    )  # fmt: skip
    base.update(kw)
    return FedConfig(**base)  # type: ignore[arg-type]


def _step(model, ex, cfg):  # noqa: ANN001, ANN202
    """(the float64 step train_round reports, flattened; the float32 model difference)."""
    m = copy.deepcopy(model)
    scorer = CandidateScorer(m)
    named = [(k, p) for k, p in scorer.named_parameters() if p.requires_grad]
    before = {k: p.detach().clone() for k, p in named}
    r = train_round(scorer, ex, cfg, MemoryStore(), seed=0)
    assert r.trained and r.steps == 1 and r.steps64 is not None
    by_param = {id(p): s for p, s in r.steps64}
    step = torch.cat([by_param[id(p)].reshape(-1) for _k, p in named])
    diff = torch.cat([(p.detach() - before[k]).reshape(-1).double() for k, p in named])
    return step, diff


@pytest.mark.parametrize("seed", [0, 1])
def test_the_float64_step_is_the_models_change_and_one_window_moves_it_by_lr_c_over_d(
    ds,  # noqa: F811
    tiny_backbone,
    monkeypatch,
    seed,
):
    """On random histories (q = 1, one fixed negatives key): the float64 step the client
    encodes is the change of its float32 model up to float32 rounding, carries no noise, and
    removing any one window moves it by at most lr * C / D in L2 (the per-window sensitivity
    float_sensitivity multiplies by the windows one interaction touches)."""
    import fedrec.client.local_train as lt

    rng = np.random.default_rng(seed)
    monkeypatch.setattr(lt.secrets, "token_bytes", lambda n: bytes(range(n)))
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    n_items = CandidateScorer(model).n_items
    users = []
    for _ in range(int(rng.integers(3, 6))):
        n = int(rng.integers(4, 9))
        users.append((rng.integers(0, n_items, n), np.sort(rng.choice(10**6, n, replace=False))))
    cfg = _cfg(backbone=str(tiny_backbone))
    ex = build_examples(users, slots=6, history_len=2, key=0, sequence=True)
    step, diff = _step(model, ex, cfg)
    assert step.dtype == torch.float64 and step.abs().sum() > 0
    torch.testing.assert_close(step, diff, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(_step(model, ex, cfg)[0], step)  # no noise in it
    bound = cfg.lr * cfg.max_grad_norm / cfg.batch_divisor
    moved = []
    for drop in rng.permutation(len(ex))[: min(4, len(ex))]:
        keep = np.arange(len(ex)) != drop
        fewer = type(ex)(ex.targets[keep], ex.context[keep], None, ex.users)
        moved.append(float((_step(model, fewer, cfg)[0] - step).norm()))
        assert moved[-1] <= bound * (1 + 1e-5), (drop, moved[-1], bound)
    assert max(moved) > 0.5 * bound  # the clip binds: the bound is not vacuous here


def test_secure_interaction_on_a_real_federation(synth_dir, tiny_backbone, tmp_path):
    """Four silos, two full-batch rounds in a real Flower simulation: every round is a released
    secure sum of all four clients with their noise shares, the claim is the larger of the two
    accountants at the counted noise and within the budget, no per-client Gaussian ledger is
    written, the statement says the server is not trusted, and `fedrec audit` passes; doctored
    round logs and claims fail it."""
    from fedrec import cli
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    out = tmp_path / "sec"
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=2,
        num_rounds=2, partition="silo", silos=4, fraction_train=1.0, evaluate_every=0,
        local_steps=1, sample_rate=1.0, negatives=10, lr=0.5, examples="sequence",
        accountant="rdp", epsilon=8.0, dp_noise="secure", secure_agg=True, batch_divisor=50.0,
        update_norm_max=1.0,
    )  # fmt: skip
    result = simulate(cfg, out, baselines="none", num_cpus=2)
    p = result["privacy"]
    si = p["secure_interaction"]
    plan = si["plan"]
    assert plan["clients"] == plan["cohort"] == 4 and plan["rounding"] == "unconditional"
    rounds = [json.loads(x) for x in (out / "privacy" / "secagg.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["released"] and r["survivors"] == r["masked"] == 4, r
        assert r["honest_shares"] == 4 - plan["colluders"] - 1
        assert r["mu_honest"] == pytest.approx(plan["mu_client"] * r["honest_shares"])
    assert all(r["aggregated"] for r in result["model"]["rounds"])
    mu = min(r["mu_honest"] for r in rounds)
    eps = max(
        skellam.skellam_epsilon(mu, plan["l1_sensitivity"], plan["l2_sensitivity"], 2,
                                plan["delta_accountant"]),
        skellam.skellam_epsilon_independent(mu, plan["l2_sensitivity"], 2,
                                            plan["delta_accountant"]),
    )  # fmt: skip
    assert si["epsilon"] == pytest.approx(eps) and p["epsilon_max"] == si["epsilon"] <= 8.0
    assert si["releases"] == 2 and p["clients"] == 4
    # each round's line shows the epsilon spent so far (progress.jsonl, the CLI's progress)
    per_round = [r["epsilon_max"] for r in result["model"]["rounds"]]
    assert 0 < per_round[0] < per_round[1] == pytest.approx(si["epsilon"])
    ledger = out / "privacy" / "ledger.jsonl"
    assert not ledger.exists() or not ledger.read_text().strip()
    statement = (out / "privacy" / "statement.md").read_text()
    assert "the noise added by the clients in secure aggregation" in statement
    assert "No trusted server" in statement and "TRUSTED" not in statement
    assert "float32" in statement and "Poisson" not in statement
    assert "inside secure aggregation" in cli._headline(cfg, result)
    report, text = audit_run(out, plot=False)
    assert report["ok"], text
    assert report["secure_interaction"]["epsilon"] == pytest.approx(si["epsilon"])

    log = out / "privacy" / "secagg.jsonl"
    kept_log = log.read_text()
    metrics = out / "metrics.json"
    kept_metrics = metrics.read_text()

    def doctored_log(change) -> str:  # noqa: ANN001
        recs = [json.loads(x) for x in kept_log.splitlines()]
        change(recs[0])
        log.write_text("".join(json.dumps(r) + "\n" for r in recs))
        report, text = audit_run(out, plot=False)
        log.write_text(kept_log)
        assert not report["ok"], text
        return text

    assert "below the plan's minimum" in doctored_log(
        lambda r: r.update(survivors=plan["min_survivors"] - 1)
    )
    assert "counted noise" in doctored_log(lambda r: r.update(mu_honest=r["mu_honest"] * 2))
    assert "inconsistent" in doctored_log(lambda r: r.update(survivors=9, masked=9))

    def doctored_claim(change) -> str:  # noqa: ANN001
        doc = json.loads(kept_metrics)
        change(doc)
        metrics.write_text(json.dumps(doc))
        report, text = audit_run(out, plot=False)
        metrics.write_text(kept_metrics)
        assert not report["ok"], text
        return text

    def halve(doc) -> None:  # noqa: ANN001
        doc["privacy"]["secure_interaction"]["epsilon"] /= 2

    assert "below the recomputed" in doctored_claim(halve)
    # derived figures are recomputed, not copied: a claimed noise std 100 times the real one
    # fails, and the statement the audit prints shows the recomputed one
    text = doctored_claim(
        lambda d: d["privacy"]["secure_interaction"].update(noise_std_on_sum=100.0)
    )
    assert "noise_std_on_sum" in text and "standard deviation of 100 " not in text
    assert f"standard deviation of {si['noise_std_on_sum']:.4g} " in text
    assert "independent_exact" in doctored_claim(
        lambda d: d["privacy"]["secure_interaction"].update(independent_exact=not si[
            "independent_exact"])
    )  # fmt: skip
    # a third release in a run planned for two: its noise and collusion risk do not cover it
    third = json.loads(kept_log.splitlines()[0]) | {"round": 3}
    log.write_text(kept_log + json.dumps(third) + "\n")
    report, text = audit_run(out, plot=False)
    log.write_text(kept_log)
    assert not report["ok"] and "more than num-rounds = 2" in text, text
    assert "plan: mu_client" in doctored_claim(
        lambda d: d["privacy"]["secure_interaction"]["plan"].update(mu_client=1.0)
    )
    # a run that claims fewer releases than it aggregated is recomputed for all of them
    assert "aggregated rounds" in doctored_claim(lambda d: d["model"]["rounds"].append(
        {"round": 3, "aggregated": True}))  # fmt: skip
    report, text = audit_run(out, plot=False)
    assert report["ok"], text


def _silos3(synth_dir, tiny_backbone, **kw: object) -> FedConfig:  # noqa: ANN001
    base = dict(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=2,
        num_rounds=2, partition="silo", silos=3, fraction_train=1.0, evaluate_every=0,
        local_steps=1, sample_rate=1.0, negatives=10, lr=0.5, examples="sequence",
        accountant="rdp", epsilon=8.0, dp_noise="secure", secure_agg=True, batch_divisor=50.0,
        update_norm_max=1.0,
    )  # fmt: skip
    return FedConfig(**(base | kw))  # type: ignore[arg-type]


def test_a_client_refuses_a_server_that_departs_from_the_plan(synth_dir, tiny_backbone):
    """The masked-input stage is refused (an error before anything is encoded) when the server
    states more clients than the config's silos (fewer colluders counted and less noise per
    client would pass the client's own recomputation otherwise), set the masks up with another
    modulus than it asks the encoding for, asks for a round past num-rounds, or asks for less
    noise; the honest request is answered."""
    from .test_secure_federation import _masked_round

    cfg = _silos3(synth_dir, tiny_backbone)
    replies = _masked_round(cfg, cohort=3, parts=[0, 1, 2])
    assert all(not r.has_error() for r in replies.values())  # type: ignore[attr-defined]
    for over, says in (
        ({"masked": {"clients": 20, "cohort": 20}}, "connected"),
        ({"setup": {"bits": 62}}, "masks were set up with 62"),
        ({"masked": {"round": 3}, "setup": {"round": 3}, "share": {"round": 3}}, "num-rounds"),
        ({"masked": {"mu": 1.0}}, "asks mu="),
    ):
        with pytest.raises(ValueError, match=says):
            _masked_round(cfg, cohort=3, parts=[0, 1, 2], over=over)
    # the run config is the server's: one stating more silos than the engine has nodes (its
    # plan for more clients gives each less noise) is refused on the engine's count
    with pytest.raises(ValueError, match="num-partitions is 2; refused"):
        _masked_round(cfg, cohort=3, parts=[0, 1, 2], partitions=2)


def test_a_client_trains_in_at_most_num_rounds_rounds(ds, tiny_backbone):  # noqa: F811
    """The clients' count of the rounds their data went into is exact (the Skellam noise is
    planned for num-rounds releases), whatever round numbers the server sends; and the Gaussian
    settings that would move the trusted-server version's cap are refused."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer = CandidateScorer(model)
    rng = np.random.default_rng(0)
    users = [(rng.integers(0, scorer.n_items, 6), np.arange(6)) for _ in range(3)]
    ex = build_examples(users, slots=6, history_len=2, key=0, sequence=True)
    cfg = _cfg(backbone=str(tiny_backbone), num_rounds=2)
    store = MemoryStore()
    got = [train_round(scorer, ex, cfg, store, seed=0) for _ in range(3)]
    assert [r.trained for r in got] == [True, True, False]
    assert got[2].reason.startswith("rounds: this client has trained in 2 rounds")
    for key, value in (("noise_multiplier", 5.0), ("planned_rounds", 100)):
        with pytest.raises(ValueError, match=key.replace("_", "-")):
            _cfg(**{key: value})


def test_a_released_round_is_logged_before_its_sum_is_used(tmp_path):
    """The server writes a released round to secagg.jsonl before it decodes the sum and steps:
    a failure in the step leaves the release counted."""
    from types import SimpleNamespace

    from fedrec.server.secure_agg import SecureUserDP
    from fedrec.shared.privacy.secure_interaction import plan_interaction

    p = plan_interaction(_cfg(), 10, 4, 10)

    def step(*_a: object) -> None:
        raise RuntimeError("the optimizer failed")

    inner = SimpleNamespace(
        template={"w": torch.zeros(4)}, optimizer=SimpleNamespace(step=step), current={},
        rounds=[], on_round=None, round_offset=0,
    )  # fmt: skip
    log = tmp_path / "secagg.jsonl"
    runner = SecureUserDP(inner, p, log_path=log, divisor=1)  # type: ignore[arg-type]
    total = np.zeros(4, dtype=np.uint64)
    with pytest.raises(RuntimeError, match="optimizer failed"):
        runner._finish(1, {"round": 1, "cohort": 10}, (total, list(range(10))), [])
    line = json.loads(log.read_text())
    assert line["released"] and line["mu_honest"] == pytest.approx(
        p.mu_client * (10 - p.colluders - 1)
    )


def test_the_plan_takes_the_clients_from_the_config_not_the_server():
    from fedrec.shared.privacy.secure_interaction import plan_interaction

    cfg = _cfg(partition="silo", silos=10)
    plan_interaction(cfg, 10, 1000, 10)
    for n in (11, 20):
        with pytest.raises(ValueError, match="partition = silo and every one"):
            plan_interaction(cfg, n, 1000, n)
    with pytest.raises(ValueError, match="'user' is invalid: silo with dp-noise = secure"):
        _cfg(partition="user")
    # a config of another mode (the plan applies dp-noise=server's rules itself) with user
    # partitions: refused by the plan
    with pytest.raises(ValueError, match="partition = silo"):
        plan_interaction(_cfg(partition="user", dp_noise="client", secure_agg=False), 10, 1000, 10)
