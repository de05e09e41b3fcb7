"""Physical batches (``physical-batch``) and per-client sampling (``expected-batch``).

A logical Poisson batch split into physical batches must be the same DP step: the same
examples, the same clipped per-example gradients summed, the noise added once, the same
accountant history. These tests pin the OS randomness of a round so two runs can be compared.
"""

from __future__ import annotations

import pytest
import torch

import fedrec.client.local_train as lt
from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import train_round
from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.privacy.calibration import calibrated_noise, run_checker

from .test_dp_training import _cfg, _data
from .test_model import ds, make_model  # noqa: F401 - fixture re-export


@pytest.fixture
def fixed_secrets(monkeypatch):
    """The round's OS randomness (sampling, noise, negatives' key) made repeatable."""
    monkeypatch.setattr(lt.secrets, "randbits", lambda k: 12345)
    monkeypatch.setattr(lt.secrets, "token_bytes", lambda n: bytes(range(n)))


def _round(ds, tiny_backbone, state, **kw):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    model.load_state_dict(state)
    scorer = CandidateScorer(model)
    sizes: list[int] = []
    scorer.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    store = MemoryStore()
    cfg = _cfg(backbone=str(tiny_backbone), local_steps=4, **kw)
    res = train_round(scorer, _data(ds), cfg, store, seed=0)
    return model, res, store, sizes


@pytest.mark.parametrize("sampling", ["keyed", "shared"])
@pytest.mark.parametrize("dp", [True, False])
def test_physical_batches_are_the_same_step_and_the_same_ledger(
    ds,  # noqa: F811
    tiny_backbone,
    fixed_secrets,
    dp,
    sampling,
):
    state = make_model(ds, tiny_backbone, id_residual=False, ffa=True).state_dict()
    extra = {"negative_sampling": sampling}
    extra |= {} if dp else {"dp": False, "epsilon": 8.0}
    whole, r0, s0, sizes0 = _round(ds, tiny_backbone, state, physical_batch=0, **extra)
    split, r2, s2, sizes2 = _round(ds, tiny_backbone, state, physical_batch=2, **extra)
    # the bound binds: logical batches of more than 2 went through in parts of at most 2
    assert max(sizes0) > 2 and max(sizes2) <= 2
    assert sum(sizes0) == sum(sizes2)  # the same examples were sampled
    # identical accounting (the accountant counts logical steps only)
    assert r0.history == r2.history and s0.budget.history == s2.budget.history
    assert r0.epsilon == r2.epsilon and r0.steps == r2.steps == 4
    if dp:
        assert r0.history == [(calibrated_noise(_cfg(local_steps=4)), 0.5, 4)]
    # the same update, up to float summation order
    a, b = whole.state_dict(), split.state_dict()
    changed = [k for k in a if not torch.equal(a[k], state[k])]
    assert changed, "the round changed nothing"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert r0.loss == pytest.approx(r2.loss, rel=1e-4)


def test_an_unbinding_bound_changes_nothing(ds, tiny_backbone, fixed_secrets):  # noqa: F811
    """Where every logical batch fits, the default bound is bit-for-bit the unbounded run."""
    state = make_model(ds, tiny_backbone, id_residual=False, ffa=True).state_dict()
    whole, r0, _, sizes = _round(ds, tiny_backbone, state, physical_batch=0)
    bounded, r1, _, _ = _round(ds, tiny_backbone, state, physical_batch=max(sizes))
    assert r0.loss == r1.loss and r0.history == r1.history
    a, b = whole.state_dict(), bounded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_expected_batch_sets_each_clients_rate_from_its_roster(ds, tiny_backbone):  # noqa: F811
    cfg = _cfg(backbone=str(tiny_backbone), sample_rate=0.0, expected_batch=4, slots=6)
    assert cfg.client_sample_rate(1) == pytest.approx(4 / 6)
    assert cfg.client_sample_rate(3) == pytest.approx(4 / 18)
    assert _cfg(sample_rate=0.0, expected_batch=100, slots=6).client_sample_rate(3) == 1.0
    assert _cfg(slots=6).client_sample_rate(3) == 0.5  # sample-rate set: the same for all
    # the default: a one-user client samples at 16 / 32 = 0.5, the rate it always had
    assert FedConfig().client_sample_rate(1) == 0.5
    assert FedConfig().client_sample_rate(236) == pytest.approx(16 / (32 * 236))
    data = _data(ds)  # 3 users, 6 slots each
    assert data.users == 3
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    store = MemoryStore()
    r = train_round(CandidateScorer(model), data, cfg, store, seed=0)
    q = 4 / 18
    sigma = calibrated_noise(cfg, q)
    assert r.trained and r.sample_rate == pytest.approx(q) and r.noise_multiplier == sigma
    assert store.budget.history == [(sigma, q, cfg.local_steps)]
    # a smaller q buys less noise for the same budget
    assert sigma < calibrated_noise(_cfg(slots=6, sample_rate=4 / 6))
    assert calibrated_noise(_cfg(slots=6, sample_rate=0.0, expected_batch=4)) == calibrated_noise(
        _cfg(slots=6, sample_rate=4 / 6)
    )  # the default rate is a one-user client's
    assert lt.batch_divisor(cfg, 3) == pytest.approx(4.0)
    # the audit's rule accepts it, and refuses a rate above the one-user client's or a sigma
    # calibrated for another rate
    check = run_checker(cfg)
    assert check((sigma, q, cfg.local_steps)) is None
    assert "whole number" in check((sigma, 0.9, cfg.local_steps))  # above a one-user client's
    assert "whole number" in check((sigma, 0.25, cfg.local_steps))  # 4 / (6 x 2.67 users)
    q2 = 4 / 12  # a client of 2 users
    assert check((calibrated_noise(cfg, q2), q2, cfg.local_steps)) is None
    assert "calibrates" in check((calibrated_noise(cfg, 4 / 6), q, cfg.local_steps))
    assert "calibrates" in check((sigma, q, cfg.local_steps + 1))


@pytest.mark.parametrize(
    "raw",
    [
        {"physical-batch": -1},
        {"expected-batch": -3},
        {"expected-batch": 0},  # and sample-rate 0: nothing sets the rate
        {"sample-rate": 1.5},
        {"max-batch": -1},
        {"max-batch": 4},  # with local DP-SGD (dp = true, the default): not a Poisson sample
    ],
)
def test_bad_batch_settings_are_refused_by_name(raw):
    with pytest.raises(ValueError, match=next(iter(raw))):
        parse_run_config(raw)


def test_the_secure_preset_with_local_dp_names_the_first_thing_to_change():
    """The secure preset sets secure-agg and max-batch; adding dp=true must be refused for the
    conflict with secure aggregation first (the fix the user needs first), not for max-batch."""
    import tomllib
    from pathlib import Path

    preset = Path(__file__).parents[1] / "simulations" / "presets" / "secure.toml"
    raw = tomllib.loads(preset.read_text()) | {"dp": True}
    with pytest.raises(ValueError, match="secure-agg=true") as err:
        parse_run_config(raw)
    assert "'max-batch'" not in str(err.value)
    raw["secure-agg"] = False  # the next refusal is max-batch's
    with pytest.raises(ValueError, match="max-batch"):
        parse_run_config(raw)


def test_max_batch_caps_every_step_without_local_dp(
    ds,  # noqa: F811
    tiny_backbone,
    fixed_secrets,
    monkeypatch,
):
    """``max-batch``: a Poisson batch larger than the cap trains on a random subset of exactly
    the cap, drawn from the round's secret generator; a cap that never binds changes nothing."""
    state = make_model(ds, tiny_backbone, id_residual=False, ffa=True).state_dict()
    plain = {"dp": False, "sample_rate": 1.0, "physical_batch": 0}
    _, r0, _, sizes0 = _round(ds, tiny_backbone, state, **plain)
    assert min(sizes0) > 3  # q = 1: every step takes all of the client's examples
    seeds: list[int] = []
    real = lt.capped

    def spy(batch, cap, gen):  # noqa: ANN001, ANN202
        seeds.append(gen.initial_seed())
        return real(batch, cap, gen)

    monkeypatch.setattr(lt, "capped", spy)
    capped_model, r1, _, sizes1 = _round(ds, tiny_backbone, state, max_batch=3, **plain)
    assert sizes1 == [3] * 4 and r1.steps == 4 and r1.trained
    assert seeds == [12345] * 4  # the round's OS-seeded generator (pinned by fixed_secrets)
    # a cap that never binds is the uncapped round, bit for bit
    same, r2, _, sizes2 = _round(ds, tiny_backbone, state, max_batch=max(sizes0), **plain)
    whole, _, _, _ = _round(ds, tiny_backbone, state, **plain)
    assert sizes2 == sizes0 and r2.loss == r0.loss
    assert all(torch.equal(same.state_dict()[k], whole.state_dict()[k]) for k in state)
    assert any(not torch.equal(capped_model.state_dict()[k], whole.state_dict()[k]) for k in state)


def test_capped_keeps_examples_whole_and_draws_uniformly():
    """Every tensor of the batch keeps the same rows (a context stays with its target), each row
    at most once and in order, and each row is kept with probability cap / n."""
    n, cap, draws = 18, 3, 6000
    gen = torch.Generator().manual_seed(7)
    base = torch.arange(n)
    counts = torch.zeros(n)
    picks = set()
    for _ in range(draws):
        ctx, tgt, prof = lt.capped([base * 10, base, base + 100], cap, gen)
        assert torch.equal(ctx, tgt * 10) and torch.equal(prof, tgt + 100)
        assert tgt.shape[0] == cap and tgt.unique().shape[0] == cap
        assert torch.equal(tgt, tgt.sort().values)
        counts[tgt] += 1
        picks.add(tuple(tgt.tolist()))
    expect = draws * cap / n  # 1000 per row; binomial std about 29
    assert (counts - expect).abs().max() < 150, counts
    assert len(picks) > 100  # not a handful of fixed subsets
    small = [base[:2], base[:2]]
    assert lt.capped(small, cap, gen) is small  # n <= cap: as is
    assert lt.capped([base, base], 0, gen)[1].shape[0] == n  # 0: no cap


def test_train_round_refuses_a_cap_with_local_dp(ds, tiny_backbone):  # noqa: F811
    """Defence in depth: even a config that skipped validation cannot cap a local-DP batch."""
    import dataclasses

    cfg = _cfg(backbone=str(tiny_backbone))
    object.__setattr__(cfg, "max_batch", 4)  # bypass FedConfig's own refusal
    assert cfg.dp and dataclasses.is_dataclass(cfg)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    with pytest.raises(ValueError, match="max-batch"):
        train_round(CandidateScorer(model), _data(ds), cfg, MemoryStore(), seed=0)


@pytest.mark.parametrize("dp", [True, False])
def test_the_user_map_steps_at_its_own_learning_rate(ds, tiny_backbone, fixed_secrets, dp):  # noqa: F811
    """One local step from the same state, the same batch and noise: ``lr-map`` scales the
    user map's change alone (post-processing of the same gradient); the adapter's is unchanged."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, user_map=3)
    state = model.state_dict()
    extra = {} if dp else {"dp": False, "epsilon": 8.0}
    changes = []
    for lr_map in (0.5, 0.05):
        m = make_model(ds, tiny_backbone, id_residual=False, ffa=True, user_map=3)
        m.load_state_dict(state)
        cfg = _cfg(backbone=str(tiny_backbone), local_steps=1, user_map=3, lr_map=lr_map, **extra)
        train_round(CandidateScorer(m), _data(ds), cfg, MemoryStore(), seed=0)
        b = m.lora_layer().lora_B["default"].weight
        changes.append((m.user_map.detach().clone(), b.detach().clone()))
    (map_a, b_a), (map_b, b_b) = changes
    assert float(map_a.abs().sum()) > 0  # the map trained (zero at init)
    assert torch.allclose(map_b, map_a * 0.1, atol=1e-7)
    assert torch.equal(b_a, b_b)


@pytest.mark.parametrize("dp", [True, False])
def test_the_item_offsets_step_at_their_own_learning_rate(ds, tiny_backbone, fixed_secrets, dp):  # noqa: F811
    """As the user map: ``lr-offsets`` scales the offsets' change alone (zero at init, so the
    change is the table itself), the same batch and noise; the adapter's is unchanged."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, item_offsets=3)
    state = model.state_dict()
    extra = {} if dp else {"dp": False, "epsilon": 8.0}
    changes = []
    for lr_off in (0.5, 0.05):
        m = make_model(ds, tiny_backbone, id_residual=False, ffa=True, item_offsets=3)
        m.load_state_dict(state)
        cfg = _cfg(
            backbone=str(tiny_backbone), local_steps=1, item_offsets=3, lr_offsets=lr_off, **extra
        )
        train_round(CandidateScorer(m), _data(ds), cfg, MemoryStore(), seed=0)
        b = m.lora_layer().lora_B["default"].weight
        changes.append((m.item_off.detach().clone(), b.detach().clone()))
    (off_a, b_a), (off_b, b_b) = changes
    assert float(off_a.abs().sum()) > 0
    assert torch.allclose(off_b, off_a * 0.1, atol=1e-7)
    assert torch.equal(b_a, b_b)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("dp", [True, False])
def test_the_item_factors_step_at_their_own_learning_rate(
    ds,  # noqa: F811
    tiny_backbone,
    fixed_secrets,
    dp,
    opt,
):
    """``lr-factors`` scales the item factors' change alone (the same batch, negatives and
    noise: a separate step size is post-processing of the same gradient); the adapter's change
    is the same whatever it is. One step, so Adam's (bias-corrected) step is linear in its rate
    too."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, item_factors=3)
    state = model.state_dict()
    init = model.item_fac.detach().clone()
    extra = {} if dp else {"dp": False, "epsilon": 8.0}
    changes = []
    for lr_fac in (0.2, 0.02):  # both differ from the adapter's lr (0.5)
        m = make_model(ds, tiny_backbone, id_residual=False, ffa=True, item_factors=3)
        m.load_state_dict(state)
        cfg = _cfg(
            backbone=str(tiny_backbone),
            local_steps=1,
            item_factors=3,
            lr_factors=lr_fac,
            local_opt=opt,
            **extra,
        )
        train_round(CandidateScorer(m), _data(ds), cfg, MemoryStore(), seed=0)
        b = m.lora_layer().lora_B["default"].weight
        changes.append((m.item_fac.detach() - init, b.detach().clone()))
    (fac_a, b_a), (fac_b, b_b) = changes
    assert float(fac_a.abs().sum()) > 0
    assert torch.allclose(fac_b, fac_a * 0.1, atol=1e-6, rtol=1e-4)
    assert torch.equal(b_a, b_b)


def test_lr_factors_is_checked():
    assert FedConfig(item_factors=4, lr=3.0).factors_lr() == 3.0
    assert FedConfig(item_factors=4, lr=3.0, lr_factors=0.01).factors_lr() == 0.01
    with pytest.warns(UserWarning, match="lr-factors"):
        FedConfig(lr_factors=0.5)
    with pytest.raises(ValueError, match="lr-factors"):
        FedConfig(item_factors=4, lr_factors=-1.0)
