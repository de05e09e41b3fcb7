"""Epsilon of Poisson-subsampled DP-SGD under REPLACE-ONE adjacency, on Opacus' PRV numerics.

Opacus' ``PRVAccountant`` only knows the add/remove pair. This module gives the replace-one
privacy loss random variable (PRV) and composes it with Opacus 1.6's PRV machinery (Gopi et al.,
https://arxiv.org/abs/2106.02848): truncate, discretize, FFT-compose, read off epsilon. It uses no
``dp_accounting`` code, so it is an independent second accountant for dp-accounting's PLD
``REPLACE_ONE`` result.

Units: everything is in units of the clip norm C, so ``sigma = noise_multiplier`` is the noise
std over C. Replacing example z by z' changes the clipped-gradient sum by g(z') - g(z) (norm at
most 2C), but only in a step that samples that example (probability q). Relative to the sum
without it, the worst case puts g(z) = -C e and g(z') = +C e, giving the per-step dominating pair
(phi = N(0, sigma^2) density; the pair dp-accounting uses for REPLACE_ONE)

    upper(x) = q phi(x + 1) + (1 - q) phi(x),    lower(x) = q phi(x - 1) + (1 - q) phi(x)

(symmetric: lower(x) = upper(-x), so one PRV covers both directions). With s2 = sigma^2 and
a = exp(-1 / (2 s2)) the privacy loss is

    L(x) = ln(upper / lower) = ln(q a e^{-x/s2} + 1 - q) - ln(q a e^{x/s2} + 1 - q),

strictly decreasing in x. The PRV is Y = L(X), X ~ upper, so F(t) = P(X >= x_t) with
x_t = s2 ln u_t, u_t the positive root of  e^t q a u^2 + (e^t - 1)(1 - q) u - q a = 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from opacus.accountants.analysis.prv import (
    Domain,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.rdp import _compute_rdp
from scipy.special import ndtr

_LN2 = math.log(2.0)
_T_CLIP = 1e300  # t = +-inf -> +-1e300: F is then 0 or 1 exactly, without inf - inf = nan


def _log_b_plus_hypot(lb: npt.NDArray[np.float64], lc: npt.NDArray[np.float64]) -> npt.NDArray:
    """ln(b + sqrt(b^2 + c^2)) from lb = ln b (may be -inf) and lc = ln c (finite)."""
    m = np.maximum(lb, lc)
    eb, ec = np.exp(lb - m), np.exp(lc - m)
    return np.asarray(m + np.log(eb + np.hypot(eb, ec)))


def replace_one_prv_cdf(
    t: npt.ArrayLike, *, sample_rate: float, noise_multiplier: float
) -> npt.NDArray[np.float64]:
    """P(Y <= t) for the one-step replace-one PRV Y (vectorised over t)."""
    q, s2 = float(sample_rate), float(noise_multiplier) ** 2
    t = np.clip(np.asarray(t, dtype=np.float64), -_T_CLIP, _T_CLIP)
    lqa = math.log(q) - 1.0 / (2.0 * s2)  # ln(q a), finite even when a underflows
    l1q = math.log1p(-q) if q < 1.0 else -math.inf
    pos = t >= 0
    with np.errstate(divide="ignore"):
        # t >= 0: divide the quadratic by e^t; u = 2 q a e^-t / (b + sqrt(b^2 + 4 q^2 a^2 e^-t))
        #   with b = (1 - e^-t)(1 - q) >= 0 (the cancellation-free root).
        # t < 0: u = (b + sqrt(b^2 + 4 e^t q^2 a^2)) / (2 e^t q a), b = (1 - e^t)(1 - q) > 0.
        lb = l1q + np.log(-np.expm1(np.where(pos, -t, t)))
    lc = _LN2 + np.where(pos, -t, t) / 2.0 + lqa
    lh = _log_b_plus_hypot(lb, lc)
    log_u = np.where(pos, _LN2 + lqa - t - lh, lh - _LN2 - t - lqa)
    with np.errstate(over="ignore"):  # x -> -+inf is fine: ndtr(+-inf) = 1, 0
        x = s2 * log_u
    sigma = math.sqrt(s2)
    # X >= x_t under upper = q N(-1, s2) + (1 - q) N(0, s2)
    return np.asarray(q * ndtr(-(x + 1.0) / sigma) + (1.0 - q) * ndtr(-x / sigma))


@dataclass(frozen=True)
class ReplaceOnePRV:
    """The one-step replace-one PRV, in the interface Opacus' PRV code calls (``cdf``; its
    ``discretize``/``mean`` path never calls ``pdf``). Fields are deliberately NOT named
    ``noise_multiplier``/``sample_rate``: Opacus' ``compute_safe_domain_size`` reads those and
    sizes the domain from its ADD/REMOVE RDP curve, which does not bound replace-one."""

    q: float
    sigma: float

    def cdf(self, t: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return replace_one_prv_cdf(t, sample_rate=self.q, noise_multiplier=self.sigma)

    def rdp(self, alpha: float) -> float:
        """A valid upper bound on D_alpha(upper || lower) (= the reverse, by symmetry), alpha > 1.

        Only sizes the truncation domain (a looser bound widens it, costing time, not accuracy).
        H_alpha(P, Q) = int p^alpha q^(1 - alpha) is jointly convex, so splitting both sides into
        equally weighted component pairs bounds it. With r = min(q, 1 - q): r (N(-1), N(0)) +
        r (N(0), N(1)) + (q - r) (N(-1), N(1)) + (1 - q - r) (N(0), N(0)), i.e. sensitivity-1,
        sensitivity-2 and identical Gaussian pairs. q = 1 gives the exact 2 alpha / sigma^2; for
        q <= 1/2 it is at most alpha / (2 sigma^2), 4x below the sensitivity-2 bound.
        """
        r, s2, am1 = min(self.q, 1.0 - self.q), self.sigma**2, alpha - 1.0
        terms = [(2.0 * r, am1 * alpha / (2.0 * s2)), (self.q - r, am1 * 2.0 * alpha / s2)]
        terms.append((1.0 - self.q - r, 0.0))
        logs = [math.log(w) + e for w, e in terms if w > 0]
        convex = float(np.logaddexp.reduce(logs)) / am1
        # O(q^2) for small q: the weak triangle inequality (Hoelder with p = 2; Mironov 2017,
        # Prop. 11) through N(0), the example removed:
        #   D_a(P||R) <= (a - 1/2)/(a - 1) D_2a(P||N0) + D_(2a-1)(N0||R).
        # Both legs are the add/remove subsampled Gaussian, whose RDP (Opacus' _compute_rdp) also
        # bounds the reverse direction (Mironov, Talwar, Zhang 2019).
        triangle = (alpha - 0.5) / am1 * _compute_rdp(self.q, self.sigma, 2 * alpha)
        return min(convex, float(triangle + _compute_rdp(self.q, self.sigma, 2 * alpha - 1)))


_ALPHAS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


@functools.lru_cache(maxsize=256)
def _rdp_curve(q: float, sigma: float) -> tuple[float, ...]:
    """ReplaceOnePRV.rdp at Opacus' default orders (memoized: _compute_rdp is ~0.1 s a curve)."""
    prv = ReplaceOnePRV(q=q, sigma=sigma)
    return tuple(prv.rdp(float(a)) for a in _ALPHAS)


def _rdp_to_eps(rdp: npt.NDArray[np.float64], delta: float) -> float:
    """RDP -> (eps, delta) (Balle et al. 2020, Thm 21), over Opacus' default orders."""
    a = _ALPHAS
    return float(np.min(rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)))


def _safe_domain_half_width(
    prvs: Sequence[ReplaceOnePRV], counts: Sequence[int], eps_error: float, delta_error: float
) -> float:
    """Opacus' ``compute_safe_domain_size`` (Gopi et al. remark 5.6, as Opacus codes it), fed
    with ``ReplaceOnePRV.rdp`` instead of its built-in add/remove curve."""
    curves = [np.array(_rdp_curve(p.q, p.sigma)) for p in prvs]
    total = sum(counts)
    half = _rdp_to_eps(np.asarray(counts, dtype=float) @ np.vstack(curves), delta_error / 4)
    for c in curves:
        half = max(half, _rdp_to_eps(c, delta_error / (8 * total)))
    return max(half, eps_error) + 3


def _check(sigma: float, q: float, steps: int) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_multiplier={sigma} must be finite and > 0")
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate={q} must be in (0, 1]")
    if isinstance(steps, bool) or not (math.isfinite(steps) and int(steps) == steps >= 0):
        raise ValueError(f"steps={steps} must be a non-negative integer")


def replace_one_epsilon(
    *, history: Sequence[tuple[float, float, int]], delta: float, eps_error: float = 0.01
) -> float:
    """Upper bound on epsilon(delta) of the composed history under replace-one adjacency.

    ``history`` is ``[(noise_multiplier, sample_rate, steps), ...]``; runs compose, 0-step runs
    are skipped, an empty history costs 0. Mirrors ``PRVAccountant.get_epsilon``: delta_error =
    delta / 1000, mesh from ``eps_error``, and returns ``eps_upper``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    if not (math.isfinite(eps_error) and eps_error > 0):
        raise ValueError(f"eps_error={eps_error} must be > 0")
    for sigma, q, steps in history:
        _check(sigma, q, steps)
    runs = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not runs:
        return 0.0
    delta_error = delta / 1000
    prvs = [ReplaceOnePRV(q=q, sigma=s) for s, q, _ in runs]
    counts = [n for _, _, n in runs]
    half_width = _safe_domain_half_width(prvs, counts, eps_error, delta_error)
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    truncated = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]
    dprvs = [discretize(tprv, domain) for tprv in truncated]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    # exp(-t) overflows in compute_epsilon once the domain reaches t < -709 (tiny sigma): only
    # the far-left cells turn nan/inf; a nan answer means the search landed there
    with np.errstate(over="ignore", invalid="ignore"):
        _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    if not math.isfinite(eps_upper):
        raise RuntimeError(f"PRV composition failed numerically (domain +-{half_width:.0f})")
    return float(eps_upper)
