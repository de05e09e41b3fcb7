"""Per-interaction DP through secure aggregation (the accounting core,
fedrec.shared.privacy.secure_interaction): plain randomized rounding with shared uniforms keeps
two neighbouring changes within the stated integer sensitivity (a property test on random
data, and a pair that attains it), the rounding is unbiased and never redrawn, the encoded sum
decodes, and the plan's noise meets the budget: by Theorem 3.5 and Opacus' Gaussian at the same
variance for a real model's size, by the theorem and the pmf for a small one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy import skellam as sk
from fedrec.shared.privacy.secure_interaction import (
    ROUNDING_SHARE,
    float_sensitivity,
    plan_interaction,
)


def integers(x: np.ndarray, cfg: sk.SkellamConfig, seed: int, mu: float = 0.0) -> np.ndarray:
    """The client's integer vector, read back through the centered decoding."""
    y = sk.encode_unconditional(x, cfg, mu, np.random.default_rng(seed))
    return np.rint(sk.decode(y, cfg) * cfg.scale).astype(np.int64)


# --- rounding with shared uniforms: the sensitivity the accounting uses ------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbouring_changes_stay_within_the_rounded_bound(seed: int) -> None:
    """Random changes x and neighbours x' at most t apart (dense and sparse differences, with
    and without the projection binding), rounded with the same uniforms: the integer vectors
    differ by at most rounded_shift_bounds(t) in L2 and L1. The rounding's own term is needed:
    some differences exceed scale * t."""
    rng = np.random.default_rng(seed)
    above_float_bound = 0
    for trial in range(60):
        dim = int(rng.integers(1, 400))
        scale = float(10 ** rng.uniform(-1, 3))
        radius = float(rng.uniform(0.5, 5))
        t = float(10 ** rng.uniform(-3, 0.5))
        x = rng.normal(size=dim) * float(rng.uniform(0.01, 2 * radius / math.sqrt(dim)))
        direction = rng.normal(size=dim)
        if trial % 2:  # one window touches few coordinates
            direction[rng.random(dim) < 0.8] = 0.0
            if not direction.any():
                direction[0] = 1.0
        step = direction / np.linalg.norm(direction) * t * float(rng.uniform(0, 1))
        cfg = sk.SkellamConfig(clip=radius, scale=scale, dim=dim, bits=62)
        e = integers(x, cfg, 1000 + trial) - integers(x + step, cfg, 1000 + trial)
        l1, l2 = sk.rounded_shift_bounds(t, scale, dim)
        assert np.linalg.norm(e) <= l2 * (1 + 1e-12), (trial, np.linalg.norm(e), l2)
        assert np.abs(e).sum() <= l1 * (1 + 1e-12) + 1e-9
        above_float_bound += np.linalg.norm(e) > scale * t
    assert above_float_bound > 0


def test_different_uniforms_break_the_bound() -> None:
    """The bound needs the shared uniforms: two roundings of the SAME change with different
    uniforms differ by far more than rounded_shift_bounds(0) = 0 (the proof's coupling is not a
    property of the generator)."""
    cfg = sk.SkellamConfig(clip=10.0, scale=3.0, dim=500, bits=62)
    x = np.random.default_rng(3).normal(size=500)
    assert (integers(x, cfg, 1) != integers(x, cfg, 2)).sum() > 50
    assert sk.rounded_shift_bounds(0.0, 3.0, 500) == (0.0, 0.0)


def test_the_rounding_term_is_attained() -> None:
    """The sqrt(dim) term is not slack: inputs whose scaled values sit just either side of the
    uniforms the generator will draw round apart on every coordinate, so a neighbour pair only
    2e-9 apart per coordinate lands sqrt(dim) apart."""
    dim, seed, eta = 400, 7, 1e-9
    u = np.random.default_rng(seed).random(dim)  # the encoder's first draw (no noise)
    cfg = sk.SkellamConfig(clip=1e6, scale=1.0, dim=dim, bits=40)
    e = integers(u - eta, cfg, seed) - integers(u + eta, cfg, seed)
    t = float(np.linalg.norm(2 * eta * np.ones(dim)))
    _l1, l2 = sk.rounded_shift_bounds(t, 1.0, dim)
    assert np.all(e == -1)
    assert np.linalg.norm(e) == pytest.approx(l2, rel=1e-6)
    assert np.linalg.norm(e) <= l2


def test_rounding_is_not_conditioned_on_the_norm() -> None:
    """Conditional rounding (encode) redraws any vector above its norm bound; the per-example
    argument needs plain rounding, which keeps the upper tail: over 1000 draws of 400
    coordinates at 0.5, some land above conditional rounding's bound."""
    cfg = sk.SkellamConfig(clip=10.0, scale=1.0, dim=400, bits=40)
    x = np.full(400, 0.5)
    norms = [float(np.sum(integers(x, cfg, s) ** 2)) for s in range(1000)]
    assert max(norms) > sk.l2_bound(cfg) ** 2


def test_unconditional_rounding_is_unbiased_and_never_redrawn() -> None:
    cfg = sk.SkellamConfig(clip=100.0, scale=1.0, dim=4, bits=62)
    x = np.array([0.25, -1.5, 2.9, 0.0])
    draws = np.stack([integers(x, cfg, s) for s in range(4000)])
    assert set(np.unique(draws[:, 0])) <= {0, 1} and set(np.unique(draws[:, 1])) <= {-2, -1}
    assert np.all(draws[:, 3] == 0)
    assert np.allclose(draws.mean(axis=0), x, atol=0.03)


def test_projection_and_refusals() -> None:
    cfg = sk.SkellamConfig(clip=1.0, scale=100.0, dim=3, bits=40)
    v = integers(np.array([30.0, 40.0, 0.0]), cfg, 0)
    assert np.linalg.norm(v) <= 100.0 + math.sqrt(3)
    with pytest.raises(ValueError, match="non-finite"):
        sk.encode_unconditional(np.array([1.0, np.nan, 0.0]), cfg, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="dim=3"):
        sk.encode_unconditional(np.zeros(4), cfg, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="float_l2"):
        sk.rounded_shift_bounds(-1.0, 1.0, 3)


def test_the_noisy_modular_sum_decodes_to_the_sum() -> None:
    """Ten clients' projected changes, rounded, each with its Skellam share, summed modulo
    2**bits: the decoded sum is the sum of the changes within the noise (variance 2 mu per
    share, 10 shares) plus the rounding."""
    rng = np.random.default_rng(5)
    cfg = sk.SkellamConfig(clip=2.0, scale=1000.0, dim=2000, bits=32)
    changes = [rng.normal(size=2000) * 0.01 for _ in range(10)]
    mu = 50.0**2 / 2
    enc = [
        sk.encode_unconditional(c, cfg, mu, np.random.default_rng(i)) for i, c in enumerate(changes)
    ]
    got = sk.decode(sk.modular_sum(enc, cfg.bits), cfg)
    err = (got - np.sum(changes, axis=0)) * cfg.scale
    expected_std = math.sqrt(10 * (2 * mu + 0.25))
    assert abs(err.std() / expected_std - 1) < 0.1
    assert abs(err.mean()) < 5 * expected_std / math.sqrt(2000)


# --- the plan ----------------------------------------------------------------------------------


def silos(**over: object) -> FedConfig:
    base: dict[str, object] = dict(
        partition="silo", silos=10, fraction_train=1.0, sample_rate=1.0, local_steps=1,
        lr=48.0, num_rounds=30, epsilon=8.0, examples="sequence", history_len=2,
        item_factors=16, batch_divisor=30176.0, update_norm_max=10.0, accountant="rdp",
    )  # fmt: skip
    return FedConfig(**(base | over))  # type: ignore[arg-type]


def test_float_sensitivity_counts_the_windows_one_interaction_moves() -> None:
    assert float_sensitivity(silos()) == pytest.approx(5 * 48.0 * 1.0 / 30176.0)
    assert float_sensitivity(silos(lr=24.0, max_grad_norm=0.5)) == pytest.approx(
        5 * 24.0 * 0.5 / 30176.0
    )
    assert float_sensitivity(silos(history_len=3)) == pytest.approx(7 * 48.0 / 30176.0)
    assert float_sensitivity(silos(examples="disjoint")) == pytest.approx(2 * 48.0 / 30176.0)
    with pytest.raises(ValueError, match="batch-divisor"):
        float_sensitivity(silos(batch_divisor=0.0))


def test_plan_meets_the_budget_by_both_accountants_and_matches_a_gaussian() -> None:
    cfg = silos()
    p = plan_interaction(cfg, 10, 31686, 10)
    s = float_sensitivity(cfg)
    # the sensitivity is the rounded bound of this config's float sensitivity, and the grid
    # is fine enough that rounding adds at most ROUNDING_SHARE to it
    assert (p.l1, p.l2) == sk.rounded_shift_bounds(s, p.encoding.scale, 31686)
    assert p.float_sensitivity == s
    assert p.l2 <= (1 + ROUNDING_SHARE) * p.encoding.scale * s * (1 + 1e-12)
    # the claim counts the honest shares of the worst accepted round, not every share
    assert p.mu_client * p.honest_min == pytest.approx(p.mu_total)
    assert p.honest_min == p.min_survivors - p.colluders - 1
    eps = p.epsilon(releases=cfg.num_rounds)
    assert 0.99 * cfg.epsilon <= eps <= cfg.epsilon * (1 + 1e-6)
    analytic = sk.skellam_epsilon(p.mu_total, p.l1, p.l2, cfg.num_rounds, p.delta)
    numeric = sk.skellam_epsilon_independent(p.mu_total, p.l2, cfg.num_rounds, p.delta)
    assert max(analytic, numeric) == pytest.approx(eps)
    # at this noise (mu above MU_EXACT) the second accountant is the Gaussian limit, so the
    # claim is the theorem's; Opacus' Gaussian at the same variance agrees (the Skellam's
    # discrete term is negligible here), integer orders
    assert p.mu_total > sk.MU_EXACT
    assert analytic >= numeric
    sigma = math.sqrt(2 * p.mu_total) / p.l2
    orders = list(range(2, 257))
    rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=cfg.num_rounds, orders=orders)
    gauss = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=p.delta)[0]
    assert gauss == pytest.approx(eps, rel=1e-3)
    # fewer rounds spend less, more noise would be needed for a smaller budget
    assert p.epsilon(releases=10) < eps
    assert plan_interaction(silos(epsilon=3.0), 10, 31686, 10).mu_total > p.mu_total
    # the plan is what a client recomputes: deterministic
    assert plan_interaction(cfg, 10, 31686, 10) == p


def test_a_small_plan_is_checked_on_the_probability_mass_function() -> None:
    """Few coordinates give a coarse grid and little noise (mu below MU_EXACT): the second
    accountant computes the Skellam's Renyi divergence from its pmf, and the claim is the
    larger of the two, within the budget."""
    cfg = silos(num_rounds=5)
    p = plan_interaction(cfg, 10, 4, 10)
    assert p.mu_total < sk.MU_EXACT
    _ratio, exact = sk.independent_rdp_ratio(p.mu_total, p.l2)
    assert exact
    analytic = sk.skellam_epsilon(p.mu_total, p.l1, p.l2, 5, p.delta)
    numeric = sk.skellam_epsilon_independent(p.mu_total, p.l2, 5, p.delta)
    assert analytic != numeric
    assert p.epsilon(releases=5) == max(analytic, numeric) <= cfg.epsilon * (1 + 1e-6)


def test_where_the_pmf_accountant_binds_the_noise_is_calibrated_for_it() -> None:
    """At epsilon 0.5 (one round, four coordinates) the pmf accountant's epsilon lies above the
    theorem's: the plan's noise meets both (more than the theorem alone would ask), and the
    claimed epsilon is the pmf one."""
    cfg = silos(epsilon=0.5, num_rounds=1)
    p = plan_interaction(cfg, 10, 4, 10)
    analytic = sk.skellam_epsilon(p.mu_total, p.l1, p.l2, 1, p.delta)
    numeric = sk.skellam_epsilon_independent(p.mu_total, p.l2, 1, p.delta)
    assert numeric > analytic
    assert p.epsilon(releases=1) == numeric <= 0.5 * (1 + 1e-6)
    theorem_only = sk.calibrate_mu(0.5, p.delta, 1, p.l1, p.l2)
    assert p.mu_total > theorem_only
    assert sk.skellam_epsilon_independent(theorem_only, p.l2, 1, p.delta) > 0.5


def test_the_collusion_risk_comes_out_of_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrec.shared.privacy import distributed

    monkeypatch.setattr(distributed, "collusion_risk", lambda *a, **k: 5e-8)
    p = plan_interaction(silos(), 10, 1000, 10)
    assert p.collusion_risk == 5e-8
    assert p.delta == pytest.approx(1e-5 - 5e-8)
    monkeypatch.setattr(distributed, "collusion_risk", lambda *a, **k: 2e-7)
    with pytest.raises(ValueError, match="colluders"):
        plan_interaction(silos(), 10, 1000, 10)


def test_more_colluders_mean_more_noise_per_client() -> None:
    few = plan_interaction(silos(secagg_colluders=0.0), 10, 1000, 10)
    many = plan_interaction(silos(secagg_colluders=0.3), 10, 1000, 10)
    assert many.honest_min < few.honest_min
    assert many.mu_client > few.mu_client


@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"sample_rate": 0.1}, "sample-rate"),
        ({"local_steps": 2}, "local-steps"),
        ({"fraction_train": 0.5}, "fraction-train"),
        ({"batch_divisor": 0.0}, "batch-divisor"),
        ({"update_norm_max": 1e6}, "secagg-bits"),
        ({"dp": False}, "dp = true"),
        ({"lr_factors": 96.0}, "lr-factors"),
        ({"factor_rows": 10}, "factor-rows"),
        ({"robust": "median"}, "robust"),
        ({"user_dp": True}, "user-dp"),
    ],
)
def test_plan_refusals(over: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        plan_interaction(silos(**over), 10, 31686, 10)


def test_a_cohort_other_than_the_clients_is_refused() -> None:
    for cohort in (5, 11):
        with pytest.raises(ValueError, match="every client every round"):
            plan_interaction(silos(), cohort, 31686, 10)


def test_other_refusals() -> None:
    with pytest.raises(ValueError, match="local-opt"):
        plan_interaction(silos(local_opt="adam"), 10, 31686, 10)
    with pytest.raises(ValueError, match="dim=0"):
        plan_interaction(silos(), 10, 0, 10)
    with pytest.raises(ValueError, match="honest noise shares"):
        plan_interaction(silos(secagg_colluders=0.45, secagg_dropout=0.4), 10, 31686, 10)
