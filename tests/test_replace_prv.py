"""Replace-one PRV accountant: cdf against brute force, epsilon against dp-accounting's PLD."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant
from scipy import integrate, optimize
from scipy.special import logsumexp
from scipy.stats import norm

from fedrec.shared.privacy.replace_prv import (
    ReplaceOnePRV,
    replace_one_epsilon,
    replace_one_prv_cdf,
)


def _log_upper(x, q, s):
    if q == 1:
        return norm.logpdf(x, -1, s)
    return np.logaddexp(math.log(q) + norm.logpdf(x, -1, s), math.log1p(-q) + norm.logpdf(x, 0, s))


def _loss(x, q, s):
    # lower(x) = upper(-x)
    return _log_upper(x, q, s) - _log_upper(-x, q, s)


def _brute_cdf(t, q, s):
    """P(L(X) <= t), X ~ upper: find {x : L(x) <= t} = [x_t, inf) by root-finding on L, then
    integrate the density (no closed form for x_t, no normal cdf)."""
    lo, hi = -60.0 * s * s - 60.0, 60.0 * s * s + 60.0
    x_t = optimize.brentq(lambda x: _loss(x, q, s) - t, lo, hi, xtol=1e-13, rtol=1e-14)
    density = lambda x: math.exp(_log_upper(x, q, s))  # noqa: E731
    mass = 0.0
    # split at the component modes so quad sees the peaks
    edges = sorted({x_t, *[m for m in (-1.0, 0.0) if m > x_t]}) + [math.inf]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        mass += integrate.quad(density, a, b, epsabs=1e-13, epsrel=1e-11, limit=200)[0]
    return mass


@pytest.mark.parametrize(
    ("q", "sigma"), [(0.025, 0.6), (0.5, 0.9), (0.1, 1.2), (0.9, 0.7), (1.0, 1.0), (0.3, 0.3)]
)
@pytest.mark.parametrize("t", [-4.0, -0.7, -1e-3, 0.0, 2e-3, 0.15, 1.3, 5.0])
def test_cdf_matches_brute_force(q, sigma, t):
    want = _brute_cdf(t, q, sigma)
    got = float(replace_one_prv_cdf(t, sample_rate=q, noise_multiplier=sigma))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 0.5), (0.5, 0.9), (1.0, 2.0), (0.2, 0.05)])
def test_cdf_is_a_distribution(q, sigma):
    ts = np.concatenate([[-np.inf, -1e8, -1e3], np.linspace(-60, 60, 24001), [1e3, 1e8, np.inf]])
    cdf = replace_one_prv_cdf(ts, sample_rate=q, noise_multiplier=sigma)
    assert np.all(np.isfinite(cdf))
    assert np.all((cdf >= 0) & (cdf <= 1))
    assert np.all(np.diff(cdf) >= -1e-15)
    assert cdf[0] == 0.0 and cdf[-1] == 1.0
    assert cdf[2] < 1e-12 and cdf[-3] > 1 - 1e-12
    # vectorised == scalar
    assert cdf[5000] == float(replace_one_prv_cdf(ts[5000], sample_rate=q, noise_multiplier=sigma))


def test_q_one_is_the_gaussian_with_sensitivity_two():
    sigma = 1.3
    # Y = L(X) = -2X / s2 with X ~ N(-1, s2): Y ~ N(2 / s2, 4 / s2)
    ts = np.linspace(-8, 8, 101)
    cdf = replace_one_prv_cdf(ts, sample_rate=1.0, noise_multiplier=sigma)
    want = norm.cdf(ts, loc=2 / sigma**2, scale=2 / sigma)
    np.testing.assert_allclose(cdf, want, rtol=1e-9, atol=1e-14)

    # T compositions = one Gaussian with mu = 2 sqrt(T) / sigma; delta(eps) in closed form
    steps, delta = 25, 1e-5
    mu = 2 * math.sqrt(steps) / sigma

    def gauss_delta(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    exact = optimize.brentq(lambda e: gauss_delta(e) - delta, 0, 200)
    eps = replace_one_epsilon(history=[(sigma, 1.0, steps)], delta=delta)
    assert exact <= eps <= exact * 1.02


def _exact_rdp(q, sigma, alpha):
    """D_alpha(upper || lower) by trapezoid over a wide fine grid (spectrally accurate here)."""
    x = np.linspace(-2 * alpha - 2 - 40 * sigma, 2 + 40 * sigma, 40_001)
    log_h = logsumexp(alpha * _log_upper(x, q, sigma) + (1 - alpha) * _log_upper(-x, q, sigma))
    return (log_h + math.log(x[1] - x[0])) / (alpha - 1)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 0.5), (0.05, 0.8), (0.5, 0.9), (0.9, 0.7), (1, 1)])
@pytest.mark.parametrize("alpha", [1.1, 1.5, 2.0, 4.0, 9.5, 32.0])
def test_rdp_is_an_upper_bound(q, sigma, alpha):
    # the domain-sizing RDP must bound the pair's true RDP, or truncation is unsafe
    assert ReplaceOnePRV(q=q, sigma=sigma).rdp(alpha) >= _exact_rdp(q, sigma, alpha) * (1 - 1e-9)


HISTORIES = [
    ([(0.6, 0.025, 100)], 1e-5),
    ([(0.6, 0.025, 100), (1.2, 0.1, 30)], 1e-5),  # heterogeneous: extends the first (see below)
    ([(0.9, 0.5, 48)], 1e-5),
    ([(1.2, 0.1, 30)], 1e-4),
]


@functools.cache
def _replace_eps(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    return replace_one_epsilon(history=history, delta=delta)


@pytest.fixture(scope="module")
def pld_epsilons() -> list[float]:
    """dp-accounting's PLD REPLACE_ONE epsilons for HISTORIES (grid 1e-4). An accountant composes
    in place, so the heterogeneous history reuses the first one's (saves ~1 s)."""
    import dp_accounting  # a dependency: a missing install must fail, not skip
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    def accountant():
        return PLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
            value_discretization_interval=1e-4,
        )

    def compose(acc, history):
        for s, q, n in history:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s))
            acc.compose(event, n)
        return acc

    (first, d0), (hetero, d1) = HISTORIES[:2]
    assert hetero[: len(first)] == first
    acc = compose(accountant(), first)
    out = [acc.get_epsilon(d0), compose(acc, hetero[len(first) :]).get_epsilon(d1)]
    return out + [compose(accountant(), h).get_epsilon(d) for h, d in HISTORIES[2:]]


@pytest.mark.parametrize("i", range(len(HISTORIES)))
def test_matches_dp_accounting_pld_replace_one(i, pld_epsilons):
    history, delta = HISTORIES[i]
    pld = pld_epsilons[i]
    prv = _replace_eps(tuple(history), delta)
    assert prv == pytest.approx(pld, rel=0.02)
    assert prv >= pld * 0.995  # an upper bound, like PRVAccountant.get_epsilon


@pytest.mark.parametrize(("history", "delta"), HISTORIES)
def test_replacement_costs_more_than_add_remove(history, delta):
    acc = PRVAccountant()
    acc.history = list(history)
    assert _replace_eps(tuple(history), delta) > acc.get_epsilon(delta) * 1.05


def test_history_bookkeeping():
    assert replace_one_epsilon(history=[], delta=1e-5) == 0.0
    assert replace_one_epsilon(history=[(0.7, 0.2, 0)], delta=1e-5) == 0.0
    one = replace_one_epsilon(history=[(2.0, 0.2, 20)], delta=1e-5)
    assert replace_one_epsilon(history=[(2.0, 0.2, 20), (0.3, 0.9, 0)], delta=1e-5) == one
    split = replace_one_epsilon(history=[(2.0, 0.2, 8), (2.0, 0.2, 12)], delta=1e-5)
    assert split == pytest.approx(one, abs=0.02)  # same mechanism, two runs: eps_error apart
    assert replace_one_epsilon(history=[(2.0, 0.2, 20), (3.0, 0.1, 5)], delta=1e-5) > one
    assert replace_one_epsilon(history=[(2.0, 0.2, 20)], delta=1e-3) < one


@pytest.mark.parametrize(
    ("history", "delta", "bad"),
    [
        ([(0.0, 0.1, 10)], 1e-5, "noise_multiplier=0.0"),
        ([(-1.0, 0.1, 10)], 1e-5, "noise_multiplier=-1.0"),
        ([(math.nan, 0.1, 10)], 1e-5, "noise_multiplier=nan"),
        ([(1.0, 0.0, 10)], 1e-5, "sample_rate=0.0"),
        ([(1.0, 1.5, 10)], 1e-5, "sample_rate=1.5"),
        ([(1.0, math.nan, 10)], 1e-5, "sample_rate=nan"),
        ([(1.0, 0.1, -1)], 1e-5, "steps=-1"),
        ([(1.0, 0.1, 2.5)], 1e-5, "steps=2.5"),
        ([(1.0, 0.1, 10)], 0.0, "delta=0.0"),
        ([(1.0, 0.1, 10)], 1.0, "delta=1.0"),
        ([(1.0, 0.1, 10), (1.0, 2.0, 3)], 1e-5, "sample_rate=2.0"),
        ([], -1e-5, "delta=-1e-05"),
    ],
)
def test_bad_inputs_raise(history, delta, bad):
    with pytest.raises(ValueError, match=bad):
        replace_one_epsilon(history=history, delta=delta)
