"""The distributed Skellam mechanism: user-level DP for a sum computed by secure aggregation.

Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning"
(NeurIPS 2021, arXiv:2110.04995). Every client, on its own device:

1. clips its whole float update to L2 norm ``clip`` (a zero update stays zero);
2. scales it by ``scale`` (gamma): the integer grid step is ``1 / scale`` in float units;
3. rounds it to integers by *conditional randomized rounding* (Kairouz, Liu, Steinke, "The
   Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
   ICML 2021, arXiv:2102.06387, Section 4.1 and Theorem 1 there): each coordinate is rounded up
   with probability equal to its fractional part (unbiased), and the whole draw is repeated
   until the integer vector's L2 norm is at most :func:`l2_bound`. The norm bound is therefore
   a hard guarantee, not a high-probability one: it is what makes the integer sensitivity of a
   client exactly ``l2_bound`` (L2) and :func:`l1_bound` (L1). A single draw meets the bound
   with probability at least ``1 - beta``, so the number of draws is geometric and small;
4. adds its noise share ``Sk(mu_i, mu_i) = Poisson(mu_i) - Poisson(mu_i)`` to every
   coordinate (variance ``2 mu_i``);
5. reduces modulo ``2**bits`` and hands the vector to secure aggregation.

The secure sum of the clients' vectors is the modular sum of the integer vectors plus the sum
of the noise shares. A sum of independent Skellams is Skellam: ``sum_i Sk(mu_i, mu_i) =
Sk(mu, mu)`` with ``mu = sum_i mu_i`` exactly, so the released integer sum is the Skellam
mechanism with ``mu_total`` (and, while only ``honest`` of the clients are trusted to add their
share, :func:`noise_shares` splits ``mu_total`` over those). The reduction modulo ``2**bits``
is a function of that integer sum alone: post-processing, which cannot weaken DP. It only
costs utility: when a coordinate of the true sum leaves ``[-2**(bits-1), 2**(bits-1))`` it
wraps around and :func:`decode` returns a wrong value (:func:`choose_scale` sizes ``scale``
so that this does not happen). The server decodes the modular sum to centered signed integers
and divides by ``scale``.

Adjacency: one client's update replaced by zeros (its integer vector removed from the sum):
the integer sensitivities are the per-client bounds ``Delta_2 = l2_bound`` and ``Delta_1 =
l1_bound`` (the zero-out adjacency of :mod:`fedrec.shared.privacy.user_level`). Replacing one
client's update by another's moves the sum by a difference of two such vectors: pass
``l2 = 2 l2_bound`` and ``l1 = 2 l1_bound`` for that relation (the triangle inequality, what
:mod:`fedrec.shared.privacy.distributed` does).

Accounting (:func:`skellam_rdp`): Theorem 3.5 of the paper (the multi-dimensional Skellam
mechanism; the RDP bound the authors' code implements), for integer orders ``alpha > 1``,
noise ``Sk(mu, mu)`` per coordinate (variance ``2 mu``) and integer shifts of L1 norm at most
``Delta_1`` and L2 norm at most ``Delta_2``::

    eps(alpha) = alpha Delta_2^2 / (4 mu)
                 + min( ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (16 mu^2),  3 Delta_1 / (4 mu) )

The first term is the Gaussian mechanism's RDP at the same variance (``sigma^2 = 2 mu``);
the second is the price of the discrete, non-Gaussian noise and vanishes like ``1 / mu``
relative to the first. Releases compose by adding RDP; the conversion to ``(eps, delta)`` is the
one the rest of fedrec uses (Opacus' ``get_privacy_spent``: Balle et al. 2020, "Hypothesis
testing interpretations and Renyi differential privacy", Theorem 21).

Independent check (:func:`skellam_epsilon_independent`): the exact Renyi divergence of a
shifted one-dimensional Skellam computed from its probability mass function (tabulated here
from the Bessel-function recurrence, see :func:`skellam_log_pmf`), extended to the
multi-dimensional worst case through additivity over coordinates. It shares no formula with
the theorem.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

# conditional randomized rounding: draws before giving up (each succeeds w.p. >= 1 - beta, so
# with the default beta = e^-0.5 the chance of 1000 failures is below 1e-215)
MAX_ROUNDING_TRIES = 1000
# a client's noise share mu_i: numpy's Poisson sampler takes lam below ~9.2e18; 2^52 keeps the
# integer sum and the float grid exact
MAX_MU = 2.0**52
# integer RDP orders of the analytic bound (the theorem is for integer alpha)
ANALYTIC_ORDERS = np.array(
    [*range(2, 257), 320, 384, 448, 512, 640, 768, 1024, 1536, 2048, 4096, 8192], dtype=float
)


@dataclass(frozen=True)
class SkellamConfig:
    """How one client's float update becomes integers (see the module doc).

    ``clip``: L2 bound of one client's whole float update. ``scale``: gamma, integers per float
    unit. ``dim``: number of coordinates. ``bits``: the secure sum is modulo ``2**bits``
    (``2 <= bits <= 62``: values live in int64/uint64 and a sum of two never overflows).
    ``beta``: conditional rounding parameter in ``(0, 1)`` (Kairouz et al. 2021; their default
    ``e^-0.5``)."""

    clip: float
    scale: float
    dim: int
    bits: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip={self.clip} must be a finite number > 0")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale={self.scale} must be a finite number > 0")
        if int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"dim={self.dim} must be an integer >= 1")
        _check_bits(self.bits)
        if not 0 < self.beta < 1:
            raise ValueError(f"beta={self.beta} must be in (0, 1)")
        if l2_bound(self) > 2.0**61:
            raise ValueError(
                f"scale * clip = {self.scale * self.clip:.3g} is too large for int64 arithmetic "
                "(the integer norm bound must stay below 2**61): lower scale"
            )


def _check_bits(bits: int) -> None:
    if int(bits) != bits or not 2 <= bits <= 62:
        raise ValueError(
            f"bits={bits} must be an integer in [2, 62] (values are held in int64/uint64)"
        )


def l2_bound(cfg: SkellamConfig) -> float:
    """The L2 norm bound of a client's integer vector, enforced by conditional rounding.

    With ``x`` the scaled float vector (``||x||_2 <= g c``, ``g`` = scale, ``c`` = clip) and
    ``d`` = dim, Kairouz, Liu, Steinke 2021 (Theorem 1 / Proposition 22 of arXiv:2102.06387)
    show that unbiased randomized rounding ``x~`` satisfies, with probability >= 1 - beta::

        ||x~||_2^2 <= g^2 c^2 + d/4 + sqrt(2 ln(1/beta)) (g c + sqrt(d)/2)

    so conditioning on that event ends after a geometric number of draws of mean at most
    ``1 / (1 - beta)``. Any rounding moves each coordinate by less than 1, so ``||x~||_2 <= g c
    + sqrt(d)`` always: the bound is the smaller of the two square roots (the second one makes
    the condition vacuous; it is smaller when ``g c`` is below ``~ sqrt(d)``)."""
    gc = cfg.scale * cfg.clip
    d = float(cfg.dim)
    squared = gc * gc + d / 4 + math.sqrt(2 * math.log(1 / cfg.beta)) * (gc + math.sqrt(d) / 2)
    return min(math.sqrt(squared), gc + math.sqrt(d))


def l1_bound(cfg: SkellamConfig) -> float:
    """The L1 norm bound of a client's integer vector: :func:`integer_l1` of
    :func:`l2_bound`."""
    return integer_l1(l2_bound(cfg), cfg.dim)


def integer_l1(l2: float, dim: int) -> float:
    """The L1 bound of an integer vector of ``dim`` coordinates and L2 norm at most ``l2``:
    ``min(l2^2, sqrt(dim) l2)`` (``|e_i| <= e_i^2`` for integers; Cauchy-Schwarz). ValueError
    for an ``l2`` that is not a finite number >= 0 or a ``dim`` that is not a whole number >= 1
    (a NaN would pass ``min`` silently and become the bound)."""
    l2 = float(l2)
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2={l2} must be a finite number >= 0")
    if isinstance(dim, bool) or not math.isfinite(dim) or int(dim) != dim or dim < 1:
        raise ValueError(f"dim={dim} must be a whole number >= 1")
    return min(l2 * l2, math.sqrt(dim) * l2)


def _check_mu(mu: float, name: str = "mu") -> float:
    mu = float(mu)
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"{name}={mu} must be a finite number >= 0")
    return mu


def _checked(update: np.ndarray, cfg: SkellamConfig, mu: float) -> tuple[np.ndarray, float]:
    """``update`` as a flat float64 vector and ``mu`` as a float, refused (ValueError) unless
    the vector has ``cfg.dim`` finite values and ``0 <= mu <= MAX_MU``."""
    x = np.asarray(update, dtype=np.float64).ravel()
    if x.size != cfg.dim:
        raise ValueError(f"update has {x.size} values, the config says dim={cfg.dim}")
    if not np.all(np.isfinite(x)):
        raise ValueError("update has non-finite values (nan or inf): refusing to encode it")
    mu = _check_mu(mu)
    if mu > MAX_MU:
        raise ValueError(f"mu={mu:.3g} exceeds {MAX_MU:.3g}: lower scale (fewer integer units)")
    return x, mu


def _noised(
    rounded: np.ndarray, cfg: SkellamConfig, mu: float, rng: np.random.Generator
) -> np.ndarray:
    """``rounded`` plus ``Sk(mu, mu)`` noise per coordinate (none if ``mu`` is 0), reduced
    modulo ``2**cfg.bits``: the uint64 message."""
    if mu > 0:
        noise = rng.poisson(mu, cfg.dim).astype(np.int64) - rng.poisson(mu, cfg.dim).astype(
            np.int64
        )
        rounded = rounded + noise
    return np.mod(rounded, np.int64(2**cfg.bits)).astype(np.uint64)


def encode(
    update: np.ndarray, cfg: SkellamConfig, mu: float, rng: np.random.Generator
) -> np.ndarray:
    """One client's message: its float ``update`` (any shape, flattened; ``cfg.dim`` values)
    clipped to L2 norm ``cfg.clip``, scaled by ``cfg.scale``, rounded to integers by conditional
    randomized rounding, plus ``Sk(mu, mu)`` noise per coordinate (``mu`` = this client's share,
    :func:`noise_shares`; 0 adds none), reduced modulo ``2**cfg.bits``: a uint64 vector with
    values in ``[0, 2**bits)``. RuntimeError if the rounding misses the norm bound
    :data:`MAX_ROUNDING_TRIES` times in a row (probability below ``beta**1000``)."""
    x, mu = _checked(update, cfg, mu)
    bound = l2_bound(cfg)
    rounded = _conditional_rounding(_clipped(x, cfg.clip) * cfg.scale, bound, rng, cfg.beta)
    return _noised(rounded, cfg, mu, rng)


def encode_unconditional(
    update: np.ndarray, cfg: SkellamConfig, mu: float, rng: np.random.Generator
) -> np.ndarray:
    """:func:`encode` with plain (unconditional) randomized rounding: ``update`` projected onto
    the L2 ball of radius ``cfg.clip``, scaled by ``cfg.scale``, each coordinate rounded up
    with probability equal to its fractional part, independently, and never redrawn; then
    ``Sk(mu, mu)`` noise and the reduction modulo ``2**cfg.bits`` (``cfg.beta`` is unused).

    For a guarantee on ONE EXAMPLE inside a client's update rather than on the client's whole
    update (:mod:`fedrec.shared.privacy.secure_interaction`): the privacy argument couples the
    roundings of two neighbouring updates through shared uniforms
    (:func:`rounded_shift_bounds`), which conditional rounding's redraws (they depend on the
    whole vector) would break. The guarantee depends only on the output's distribution (each
    coordinate an independent Bernoulli of its fractional part); that the uniforms are drawn
    in a fixed order whatever the update only lets a test reproduce the coupling."""
    x, mu = _checked(update, cfg, mu)
    scaled = _clipped(x, cfg.clip) * cfg.scale
    floor = np.floor(scaled)
    rounded = floor.astype(np.int64) + (rng.random(x.size) < scaled - floor)
    return _noised(rounded, cfg, mu, rng)


def rounded_shift_bounds(float_l2: float, scale: float, dim: int) -> tuple[float, float]:
    """``(l1, l2)``: how far apart two plainly rounded vectors (:func:`encode_unconditional`)
    can be when their scaled-down float inputs are at most ``float_l2`` apart in L2 and both are
    rounded with the SAME uniforms.

    Coordinate ``i`` rounds ``a`` to ``floor(a) + [u_i < frac(a)]``: a nondecreasing step
    function of ``a`` with unit steps one apart, so inputs ``a``, ``b`` land at most
    ``ceil(|a - b|) < |a - b| + 1`` apart, and on the same integer when ``a = b``. With
    ``delta = scale * (x - x')`` and ``m <= dim`` the coordinates where it is not zero, the
    integer difference ``e`` has ``|e_i| <= |delta_i| + [delta_i != 0]``, so (triangle
    inequality) ``||e||_2 <= ||delta||_2 + sqrt(m) <= scale * float_l2 + sqrt(dim)``; ``e`` is
    an integer vector, so ``||e||_1 <= min(||e||_2^2, sqrt(dim) ||e||_2)``.

    Why the shared uniforms are enough: the mechanism's output given the inputs is the mixture,
    over the uniforms ``u``, of the Skellam mechanism shifted by the rounded sum. For each
    ``u`` the two shifts differ by such an ``e``, so each pair of components meets the Skellam
    RDP bound at ``(l1, l2)``; the Renyi divergence is jointly quasi-convex (van Erven and
    Harremoes 2014, Theorem 13), so the two mixtures meet it too."""
    if not (math.isfinite(float_l2) and float_l2 >= 0):
        raise ValueError(f"float_l2={float_l2} must be a finite number >= 0")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale} must be a finite number > 0")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim={dim} must be an integer >= 1")
    if float_l2 == 0:
        return 0.0, 0.0
    l2 = scale * float_l2 + math.sqrt(dim)
    return integer_l1(l2, dim), l2


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    """``x`` scaled to L2 norm at most ``clip``; the norm is computed on ``x / max|x|`` so that
    huge finite values do not overflow, and a zero vector stays zero."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top == 0.0:
        return np.zeros_like(x)
    unit = x / top
    norm = float(np.linalg.norm(unit))  # ||x|| = top * norm, norm in [1, sqrt(d)]
    return unit * min(top, clip / norm)


def _conditional_rounding(
    x: np.ndarray, bound: float, rng: np.random.Generator, beta: float
) -> np.ndarray:
    floor = np.floor(x)
    frac = x - floor
    base = floor.astype(np.int64)
    # the squared norm is summed in float64 (pairwise summation, relative error far below
    # 1e-13); the test keeps that margin so that the accepted integer norm is <= bound exactly
    limit = bound * bound * (1 - 1e-12)
    for _ in range(MAX_ROUNDING_TRIES):
        z = base + (rng.random(x.size) < frac)
        zf = z.astype(np.float64)
        if float(np.dot(zf, zf)) <= limit:
            return z
    raise RuntimeError(
        f"conditional randomized rounding missed the L2 bound {bound:.6g} in "
        f"{MAX_ROUNDING_TRIES} draws (each meets it with probability >= 1 - beta = "
        f"{1 - beta:.3g}): the input was not clipped to clip * scale, or beta is near 1"
    )


def modular_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    """The coordinate-wise sum modulo ``2**bits`` of vectors with values in ``[0, 2**bits)``
    (what secure aggregation returns), in uint64: both summands are below ``2**62``, so no
    partial sum overflows."""
    _check_bits(bits)
    if not vectors:
        raise ValueError("modular_sum of no vectors")
    mod = np.uint64(2**bits)
    total: np.ndarray | None = None
    for v in vectors:
        u = _as_residues(v, bits)
        if total is None:
            total = u.copy()
        elif u.shape != total.shape:
            raise ValueError(f"vector of shape {u.shape} differs from {total.shape}")
        else:
            total = (total + u) % mod
    assert total is not None
    return total


def _as_residues(v: np.ndarray, bits: int) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "iu":
        raise ValueError(f"expected an integer vector, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, 2**{bits}) (residues modulo 2**{bits})")
    return a.astype(np.uint64).ravel()


def decode(total: np.ndarray, cfg: SkellamConfig) -> np.ndarray:
    """The server's estimate of the sum of the clipped float updates: the modular sum
    ``total`` read as centered signed integers (residues ``>= 2**(bits-1)`` are negative:
    ``r - 2**bits``), divided by ``cfg.scale``, as float64."""
    u = _as_residues(total, cfg.bits)
    if u.size != cfg.dim:
        raise ValueError(f"total has {u.size} values, the config says dim={cfg.dim}")
    signed = u.astype(np.int64)
    half = np.int64(2 ** (cfg.bits - 1))
    signed = np.where(signed >= half, signed - np.int64(2**cfg.bits), signed)
    return signed.astype(np.float64) / cfg.scale


def noise_shares(mu_total: float, honest: int) -> float:
    """Each client's ``mu`` so that any ``honest`` of the shares sum to ``mu_total``.

    A client that colludes with the server (it knows its own share and can subtract it) or that
    drops out after the masks are fixed contributes no noise: if at least ``honest`` clients
    add their share, the sum carries ``Sk(mu, mu)`` with ``mu >= mu_total`` (more noise is only
    more private). With all ``n`` clients honest the sum carries ``n / honest * mu_total``."""
    mu_total = _check_mu(mu_total, "mu_total")
    if int(honest) != honest or honest < 1:
        raise ValueError(
            f"honest={honest}: at least one client must add its noise share (the noise of the "
            "sum comes only from the clients' shares)"
        )
    return mu_total / honest


# --- accounting --------------------------------------------------------------------------------


def _check_sens(l1: float, l2: float) -> None:
    for name, v in (("l1", l1), ("l2", l2)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}={v} must be a finite number >= 0")


def _check_release(releases: int, delta: float) -> None:
    if int(releases) != releases or releases < 0:
        raise ValueError(f"releases={releases} must be a non-negative integer")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")


def _analytic_rdp(orders: np.ndarray, mu: float, l1: float, l2: float) -> np.ndarray:
    a = np.ceil(orders)  # the theorem's integer orders; D_alpha is nondecreasing in alpha
    var = 2.0 * mu
    gauss = a * l2 * l2 / (2 * var)
    extra = np.minimum(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * var * var), 3 * l1 / (2 * var))
    return np.asarray(gauss + extra, dtype=np.float64)


def skellam_rdp(alpha: float, mu_total: float, l1: float, l2: float) -> float:
    """RDP at order ``alpha`` of one release of the multi-dimensional Skellam mechanism: noise
    ``Sk(mu_total, mu_total)`` per coordinate (variance ``2 mu_total``), integer sensitivities
    ``l1`` (L1) and ``l2`` (L2).

    Theorem 3.5 of Agarwal, Kairouz, Liu 2021 (arXiv:2110.04995); the formula as implemented by
    the authors in google-research/federated, ``distributed_dp/accounting_utils.py``,
    ``_skellam_rdp`` (commit 5e27a86)::

        a / (2 v) D2^2 + min( ((2a - 1) s D2^2 + 6 D1) / (4 s^3 v^2),  3 D1 / (2 s v) )

    in float units (``s`` = scale, sensitivities ``D = integer / s``, ``v`` = central variance
    ``= 2 mu / s^2``, as ``distributed_dp/distributed_skellam_query.py`` draws
    ``Poisson(stddev^2 / 2)`` twice). In integer units (``s`` cancels) with ``v = 2 mu``::

        alpha l2^2 / (4 mu) + min( ((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2),  3 l1 / (4 mu) )

    The theorem is for integer orders (the reference code casts orders to int); a fractional
    ``alpha`` gets the bound at ``ceil(alpha)``, valid because the Renyi divergence is
    nondecreasing in its order (van Erven and Harremoes 2014, Theorem 3). ``inf`` at
    ``mu_total == 0``."""
    if not alpha > 1:
        raise ValueError(f"alpha={alpha} must be > 1")
    _check_sens(l1, l2)
    mu = _check_mu(mu_total, "mu_total")
    if l2 == 0:
        return 0.0
    if mu == 0:
        return math.inf
    return float(_analytic_rdp(np.array([float(alpha)]), mu, l1, l2)[0])


def _opacus_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():  # "optimal order is the largest alpha": still a valid bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _alpha = rdp_analysis.get_privacy_spent(
            orders=list(orders), rdp=list(rdp), delta=delta
        )
    return max(0.0, float(eps))


def skellam_epsilon(mu_total: float, l1: float, l2: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``releases`` Skellam releases with noise ``Sk(mu_total,
    mu_total)`` and integer sensitivities ``l1``, ``l2``: :func:`skellam_rdp` at the integer
    orders :data:`ANALYTIC_ORDERS`, composed (RDP adds up) and converted as the rest of fedrec
    does (Opacus' ``get_privacy_spent``, Balle et al. 2020 Theorem 21; see
    :mod:`fedrec.shared.privacy.accounting`). 0 for no release; ``inf`` with no noise."""
    _check_release(releases, delta)
    _check_sens(l1, l2)
    mu = _check_mu(mu_total, "mu_total")
    if releases == 0 or l2 == 0:
        return 0.0
    if mu == 0:
        return math.inf
    rdp = _analytic_rdp(ANALYTIC_ORDERS, mu, l1, l2) * releases
    return _opacus_epsilon(ANALYTIC_ORDERS, rdp, delta)


def gaussian_rdp(orders: np.ndarray, gaussian: Sequence[float]) -> np.ndarray:
    """RDP at ``orders`` of Gaussian releases, each with sensitivity 1 and noise multiplier
    ``z`` (std ``z`` times the sensitivity): ``alpha / (2 z^2)`` each, exact at every order
    (Mironov 2017, Proposition 7), added up. ValueError for a ``z`` that is not finite and > 0."""
    total = 0.0
    for z in gaussian:
        if isinstance(z, bool) or not (math.isfinite(z) and z > 0):
            raise ValueError(f"Gaussian noise multiplier {z!r} must be a finite number > 0")
        total += 1.0 / (2.0 * z * z)
    return np.asarray(orders, dtype=np.float64) * total


def composed_epsilon(
    releases: list[tuple[float, float, float]], delta: float, gaussian: Sequence[float] = ()
) -> float:
    """Epsilon at ``delta`` after Skellam releases that may differ, each ``(mu_total, l1,
    l2)``: their :func:`skellam_rdp` bounds at :data:`ANALYTIC_ORDERS` added up and converted
    as :func:`skellam_epsilon` does (which is this with ``releases`` identical ones), with the
    RDP of Gaussian releases of noise multipliers ``gaussian`` (:func:`gaussian_rdp`; a
    trusted server's user-level rounds) added in. 0 for none; ``inf`` if one has no noise."""
    _check_release(len(releases), delta)
    rdp = gaussian_rdp(np.asarray(ANALYTIC_ORDERS, dtype=np.float64), gaussian)
    for mu_total, l1, l2 in releases:
        _check_sens(l1, l2)
        mu = _check_mu(mu_total, "mu_total")
        if l2 == 0:
            continue
        if mu == 0:
            return math.inf
        rdp = rdp + _analytic_rdp(ANALYTIC_ORDERS, mu, l1, l2)
    if not rdp.any():
        return 0.0
    return _opacus_epsilon(ANALYTIC_ORDERS, rdp, delta)


def calibrate_mu(epsilon: float, delta: float, releases: int, l1: float, l2: float) -> float:
    """The smallest ``mu_total`` (to a relative 1e-9, rounded up) with :func:`skellam_epsilon`
    at most ``epsilon``; bisection in ``log mu`` (epsilon decreases as mu grows)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon={epsilon} must be a finite number > 0")
    _check_release(releases, delta)
    _check_sens(l1, l2)
    if releases == 0 or l2 == 0:
        return 0.0

    def ok(mu: float) -> bool:
        return skellam_epsilon(mu, l1, l2, releases, delta) <= epsilon

    hi = max(l2 * l2, 1e-6)
    while not ok(hi):
        hi *= 4
        if hi > 1e300:
            raise ValueError(f"no mu reaches epsilon={epsilon} at delta={delta}")
    lo = hi / 4
    while ok(lo):
        lo /= 4
        if lo < 1e-300:
            return lo
    while hi - lo > 1e-9 * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def calibrate_mu_claimed(
    epsilon: float, delta: float, releases: int, l1: float, l2: float
) -> float:
    """The ``mu_total`` whose *claimed* epsilon, the larger of :func:`skellam_epsilon` and
    :func:`skellam_epsilon_independent`, is at most ``epsilon``. :func:`calibrate_mu` meets the
    analytic bound; at small epsilon the numerical one can lie a little above it (0.5009 for a
    target of 0.5), and a statement claims the larger: mu then grows by 0.1 % steps until
    both meet the target (the numerical epsilon falls as mu grows)."""
    mu = calibrate_mu(epsilon, delta, releases, l1, l2)
    if releases == 0 or l2 == 0:
        return mu
    for _ in range(10_000):
        if skellam_epsilon_independent(mu, l2, releases, delta) <= epsilon:
            return mu
        mu *= 1.001
    raise ValueError(f"no mu brings the numerical epsilon to {epsilon} at delta={delta}")


# --- the independent computation ---------------------------------------------------------------

# orders of the numeric check (any real alpha > 1 works for the exact divergence)
INDEPENDENT_ORDERS = np.array(
    [1.1, 1.2, 1.3, 1.4, 1.5, 1.625, 1.75, 1.875, 2, 2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5, 5.5,
     6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20, 23, 26, 30, 34, 40, 46, 54, 64, 80, 96, 128, 160,
     192, 256, 384, 512, 1024, 2048, 4096],
    dtype=float,
)  # fmt: skip
# shifts c = 1..EXACT_SHIFTS: every one evaluated (both directions); larger: a geometric grid
EXACT_SHIFTS = 4
# exact pmf numerics up to this mu_total; above, the Gaussian limit (see the function doc)
MU_EXACT = 2.0**28
# exact sums on the geometric grid of larger shifts stop at this many terms (split bound beyond)
_MAX_WINDOW = 2**18
# the pmf window reaches this many standard deviations past the tilted mass
_TAIL_SD = 9.0
# a window edge whose log-term is this far below the maximum is negligible (e^-40 ~ 4e-18)
_EDGE_GAP = 40.0


def skellam_log_pmf(mu: float, n: int) -> np.ndarray:
    """``log P[Sk(mu, mu) = k]`` for ``k = -n..n`` (index ``k + n``), from ``P[k] = e^{-2 mu}
    I_|k|(2 mu)``: the ratios ``r_v = I_{v+1}(x) / I_v(x)`` (``x = 2 mu``) by the backward
    recurrence ``r_{v-1} = 1 / (2v/x + r_v)`` (stable: it contracts errors), carried together
    with ``s_v = 1 - r_v`` so that ``log r_v`` keeps full relative precision both when ``r_v``
    is tiny (small ``mu``) and when it is near 1 (large ``mu``); the cumulative sums of
    ``log r_v`` give ``log P[k] - log P[0]``, normalised over the table (the mass beyond ``n``
    must be negligible: callers take ``n`` many standard deviations out). Agrees with
    ``scipy.stats.skellam.logpmf`` to ~1e-15 relative where that is finite, does not underflow
    in the tails and costs one pass of ~``sqrt(n^2 + 40 x)`` steps."""
    mu = float(mu)
    if not mu > 0:
        raise ValueError(f"mu={mu} must be > 0")
    x = 2.0 * mu
    # start far enough up that the start's error is damped below rounding: the recurrence
    # multiplies errors by ~r^2 per step, i.e. by ~exp(-(top^2 - n^2) / x) over the run
    top = int(math.ceil(math.sqrt(float(n) * n + 40.0 * x))) + 64
    v1 = top + 1.0
    root = math.sqrt(v1 * v1 + x * x)
    r = x / (v1 + root)  # Amos' (1974) approximation of r_top: only a starting value
    s = (v1 + v1 * v1 / (root + x)) / (v1 + root)
    for v in range(top, n, -1):
        t = 2.0 * v / x
        den = t + r
        r, s = 1.0 / den, (t - s) / den
    rs = np.empty(n)
    ss = np.empty(n)
    for v in range(n, 0, -1):
        t = 2.0 * v / x
        den = t + r
        r, s = 1.0 / den, (t - s) / den
        rs[v - 1] = r
        ss[v - 1] = s
    with np.errstate(divide="ignore"):
        log_r = np.where(rs < 0.5, np.log(rs), np.log1p(-np.minimum(ss, 0.5)))
    half = np.concatenate([[0.0], np.cumsum(log_r)])
    full = np.concatenate([half[:0:-1], half])
    peak = float(full.max())
    return full - (peak + math.log(float(np.exp(full - peak).sum())))


@functools.lru_cache(maxsize=8)
def _log_pmf_cached(mu: float, n: int) -> np.ndarray:
    table = skellam_log_pmf(mu, n)
    table.flags.writeable = False
    return table


def _lse(t: np.ndarray) -> tuple[float, bool]:
    """log-sum-exp of ``t`` and whether both ends are negligible (the window holds the mass)."""
    m = float(t.max())
    ok = t[0] < m - _EDGE_GAP and t[-1] < m - _EDGE_GAP
    return m + math.log(float(np.exp(t - m).sum())), ok


def skellam_shift_divergence(
    mu: float,
    shift: int,
    orders: np.ndarray = INDEPENDENT_ORDERS,
    *,
    both: bool = True,
    max_window: int | None = None,
) -> np.ndarray:
    """The exact Renyi divergences ``D_a(Sk + c || Sk)`` of a shifted one-dimensional Skellam
    ``Sk = Sk(mu, mu)``, integer ``c = shift >= 1``, at each order ``a`` in ``orders``; with
    ``both``, the larger of that and ``D_a(Sk || Sk + c)``.

    Each is ``log(sum_k P[k]^a Q[k]^(1-a)) / (a - 1)`` over the pmf of :func:`skellam_log_pmf`,
    by log-sum-exp over a window that holds the tilted mass: from the centre of the reverse
    direction, ``-(a-1)c``, to that of the forward one, ``a c``, plus 9 standard deviations on
    either side. Checked: ``inf`` where an end of the window is not negligible, or where the
    window would exceed ``max_window`` terms; the truncation error is ~1e-17 relative. The two
    directions are equal for this symmetric noise (``k -> c - k`` maps one sum onto the other);
    ``both`` computes them separately anyway."""
    c = int(shift)
    if c < 1:
        raise ValueError(f"shift={shift} must be an integer >= 1")
    pad = int(_TAIL_SD * math.sqrt(2.0 * mu)) + 32
    lo_of = np.ceil((orders - 1) * c).astype(np.int64) + pad
    hi_of = np.ceil(orders * c).astype(np.int64) + pad
    feasible = np.ones(orders.size, dtype=bool)
    if max_window is not None:
        feasible = lo_of + hi_of + 1 <= max_window
    out = np.full(orders.size, np.inf)
    if not feasible.any():
        return out
    lo_max, hi_max = int(lo_of[feasible].max()), int(hi_of[feasible].max())
    n = 1 << max(lo_max + c, hi_max).bit_length()  # a power of 2: shifts share the table
    lq = _log_pmf_cached(mu, n)
    # over the widest window k = -lo_max..hi_max: log Q[k], log P[k] = log Q[k - c], their
    # difference L; the forward terms are log Q + a L, the reverse ones log P - a L
    here = lq[n - lo_max : n + hi_max + 1]
    back = lq[n - lo_max - c : n + hi_max + 1 - c]
    diff = back - here
    for j in np.flatnonzero(feasible).tolist():
        a = float(orders[j])
        sl = slice(lo_max - int(lo_of[j]), lo_max + int(hi_of[j]) + 1)
        fwd, ok = _lse(here[sl] + a * diff[sl])
        if both:
            bwd, ok_b = _lse(back[sl] - a * diff[sl])
            fwd, ok = max(fwd, bwd), ok and ok_b
        if ok:
            out[j] = max(fwd, 0.0) / (a - 1)
    return out


def _mironov(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    return max(0.0, float(np.min(rdp + math.log(1 / delta) / (orders - 1))))


def _balle(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    # Balle et al. 2020 Theorem 21, written out here (no Opacus code)
    eps = rdp + (math.log(1 / delta) - np.log(orders)) / (orders - 1) + np.log1p(-1 / orders)
    return max(0.0, float(np.min(eps)))


def independent_rdp_ratio(
    mu_total: float, l2: float, orders: np.ndarray = INDEPENDENT_ORDERS
) -> tuple[np.ndarray, bool]:
    """``R(alpha)``, an estimate from above of ``max_c D_alpha(c) / c^2`` over the integer
    shifts ``1 <= c <= l2``, and whether it was computed from the pmf (False: Gaussian limit).
    See :func:`skellam_epsilon_independent`."""
    mu = _check_mu(mu_total, "mu_total")
    if mu > MU_EXACT:
        return orders / (4 * mu), False
    top = max(1, int(math.floor(l2 + 1e-9)))
    ratio = np.zeros(orders.size)
    for c in range(1, min(top, EXACT_SHIFTS) + 1):
        ratio = np.maximum(ratio, skellam_shift_divergence(mu, c, orders) / c**2)
    if top > EXACT_SHIFTS:
        doublings = math.log2(top / EXACT_SHIFTS)
        grid = np.geomspace(EXACT_SHIFTS + 1, top, 2 + int(2 * doublings))
        for c in np.unique(np.round(grid).astype(np.int64)).tolist():
            d = skellam_shift_divergence(mu, c, orders, both=False, max_window=_MAX_WINDOW)
            value = d / c**2
            if not np.isfinite(d).all():
                # split bound: Sk(mu) is the sum of c independent Sk(mu / c) and a shift by c
                # is c shifts by 1, so (data processing) D(c; mu) <= c D(1; mu / c)
                split = skellam_shift_divergence(mu / c, 1, orders) / c
                value = np.where(np.isfinite(d), value, split)
            ratio = np.maximum(ratio, value)
    return ratio, True


def skellam_epsilon_independent(
    mu_total: float, l2: float, releases: int, delta: float, *, conversion: str = "balle"
) -> float:
    """Epsilon of ``releases`` Skellam releases (noise ``Sk(mu_total, mu_total)``, integer L2
    sensitivity ``l2``, any L1), computed without :func:`skellam_rdp`: a second computation
    to check the theorem's constants and the code.

    1. ``D_alpha(c)``: exact Renyi divergences of ``Sk + c`` vs ``Sk``, both directions, from
       the pmf (:func:`skellam_shift_divergence`) at the real orders
       :data:`INDEPENDENT_ORDERS`.
    2. A shift vector ``c`` in Z^d with ``||c||_2 <= l2`` has RDP ``sum_i D(c_i)`` (RDP of a
       product is additive) ``<= R(alpha) l2^2`` with ``R = max_c D(c)/c^2`` over integers
       ``1 <= c <= floor(l2)`` (:func:`independent_rdp_ratio`): exact for ``c = 1..4``; for
       larger ``c`` exact on a geometric grid (2 points per doubling, up to ``floor(l2)``),
       except where the sum would exceed 2^18 terms (large ``alpha c``), where the rigorous
       split bound ``D(c; mu)/c^2 <= D(1; mu/c)/c`` stands in. Between grid points the max is
       not certified; in every case tried (mu from 0.5 to 1e8) ``D(c)/c^2`` decreases in ``c``,
       so the max is at ``c = 1`` and the worst vector is ``l2^2`` coordinates shifted by 1
       (the bound is then attained when ``d >= l2^2`` and ``l2^2`` is an integer). The bound
       ignores ``d``: compare it with the theorem at ``l1 = l2^2``. ``D(c)/c^2`` is not below
       the Gaussian ``alpha / (4 mu)`` everywhere: for orders near 1 and small ``mu`` it is
       above (by 5 % at ``mu = 0.5``, 7e-4 at ``mu = 5``, 8e-6 at ``mu = 50``).
    3. Above ``mu_total = 2^28`` (:data:`MU_EXACT`) the exact sums are too long (~18
       ``sqrt(2 mu)`` terms per order and shift) and ``D`` (~``alpha / (4 mu)``) nears the
       resolution of float64 sums; there ``R = alpha / (4 mu)``, the Gaussian limit. The
       exact values differ from it by a relative ``O(1/mu^2)`` (the numbers above), far below
       1e-12 there. Not an evaluation of the pmf: say so when quoting it.
    4. Compose (``releases`` times the RDP) and convert at ``delta``: ``conversion="balle"``
       (default; Balle et al. 2020 Theorem 21, written out here; the same theorem as the
       analytic path, so that the two epsilons differ only by their RDP curves) or
       ``"mironov"`` (``eps = min_alpha rdp + log(1/delta)/(alpha - 1)``, Mironov 2017
       Proposition 3: valid, looser by ``~log(alpha)/(alpha - 1) - log(1 - 1/alpha)``, about
       1 at ``alpha = 3``).
    """
    if conversion not in ("balle", "mironov"):
        raise ValueError(f"conversion={conversion!r}: use 'balle' or 'mironov'")
    _check_release(releases, delta)
    _check_sens(0.0, l2)
    mu = _check_mu(mu_total, "mu_total")
    if releases == 0 or l2 == 0:
        return 0.0
    if mu == 0:
        return math.inf
    ratio, _exact = independent_rdp_ratio(mu, l2)
    rdp = ratio * l2 * l2 * releases
    keep = np.isfinite(rdp)
    if not keep.any():
        return math.inf
    convert = _balle if conversion == "balle" else _mironov
    return convert(INDEPENDENT_ORDERS[keep], rdp[keep], delta)


def composed_epsilon_independent(
    releases: list[tuple[float, float]], delta: float, gaussian: Sequence[float] = ()
) -> float:
    """:func:`skellam_epsilon_independent` for releases that may differ, each ``(mu_total,
    l2)``: their numerical RDP curves added up, with the RDP of Gaussian releases of noise
    multipliers ``gaussian`` (:func:`gaussian_rdp`), and converted at ``delta`` as that
    function does (Balle et al.). 0 for none; ``inf`` if one has no noise. Identical releases
    are computed once."""
    _check_release(len(releases), delta)
    rdp = gaussian_rdp(INDEPENDENT_ORDERS, gaussian)
    for (mu_total, l2), times in Counter(releases).items():
        _check_sens(0.0, l2)
        mu = _check_mu(mu_total, "mu_total")
        if l2 == 0:
            continue
        if mu == 0:
            return math.inf
        ratio, _exact = independent_rdp_ratio(mu, l2)
        rdp = rdp + ratio * l2 * l2 * times
    if not rdp.any():
        return 0.0
    keep = np.isfinite(rdp)
    if not keep.any():
        return math.inf
    return _balle(INDEPENDENT_ORDERS[keep], rdp[keep], delta)


# --- choosing gamma ----------------------------------------------------------------------------

# largest rounding inflation of the sensitivity that choose_scale accepts
MAX_INFLATION = 1.01


def choose_scale(
    clip: float,
    dim: int,
    clients: int,
    bits: int,
    noise_multiplier_hint: float = 2.0,
    k: float = 6.0,
) -> float:
    """A scale gamma for ``clients`` clients summing ``dim`` coordinates modulo ``2**bits``.

    Two requirements, with ``u = gamma clip`` and ``L(u)`` = :func:`l2_bound` (default beta):

    - precision: rounding inflates the integer sensitivity by at most 1 %, ``L(u) <= 1.01 u``
      (needs ``u`` well above ``sqrt(dim) / 2``; ``u >~ 3.5 sqrt(dim)`` for large ``dim``);
    - no wrap-around: even if every client puts its whole clipped norm in the same coordinate
      (``|x_i| <= L``), the sum of ``clients`` of them plus ``k`` standard deviations of the
      noise fits in ``[-2**(bits-1), 2**(bits-1))``: ``(clients + k z) L(u) < 2**(bits-1)``
      where the noise's standard deviation is taken as ``z L`` with ``z`` =
      ``noise_multiplier_hint`` (the Gaussian-equivalent noise multiplier ``sqrt(2 mu_total) /
      l2_bound`` of the *whole* noise in the sum: count every client's share, e.g. ``n /
      honest`` times the calibrated ``mu_total``, and pass a hint at least that large).

    Returns the largest gamma that meets the second requirement (the finest grid, like the
    authors' ``heuristic_scale_factor``), capped so that ``mu_total = (z L)^2 / 2`` stays at
    most :data:`MAX_MU` (Poisson sampling, exact float grid). ValueError saying what to change
    (more bits, fewer clients, a smaller hint or ``k``) if that is below the first."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip={clip} must be a finite number > 0")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim={dim} must be an integer >= 1")
    if int(clients) != clients or clients < 1:
        raise ValueError(f"clients={clients} must be an integer >= 1")
    _check_bits(bits)
    if not (math.isfinite(noise_multiplier_hint) and noise_multiplier_hint >= 0):
        raise ValueError(f"noise_multiplier_hint={noise_multiplier_hint} must be >= 0")
    if not (math.isfinite(k) and k >= 0):
        raise ValueError(f"k={k} must be >= 0")

    def bound(u: float) -> float:
        return l2_bound(SkellamConfig(clip=1.0, scale=u, dim=dim, bits=62))

    # smallest u with L(u) <= 1.01 u (L(u)/u decreases in u): bisection in log u
    lo, hi = 1e-6, max(1.0, 10 * math.sqrt(dim))
    while bound(hi) > MAX_INFLATION * hi:
        hi *= 2
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if bound(mid) <= MAX_INFLATION * mid else (mid, hi)
    u_min = hi
    # largest u with (clients + k z) L(u) <= 2**(bits-1) - 1 and (z L(u))^2 / 2 <= MAX_MU
    room = (2.0 ** (bits - 1) - 1) / (clients + k * noise_multiplier_hint)
    if noise_multiplier_hint > 0:
        room = min(room, math.sqrt(2 * MAX_MU) / noise_multiplier_hint)
    room = min(room, 2.0**52)
    if bound(u_min) > room:
        need = math.log2((clients + k * noise_multiplier_hint) * bound(u_min)) + 1
        raise ValueError(
            f"no scale fits: {clients} clients x a worst-case integer norm of "
            f"{bound(u_min):.4g} (clip * scale >= {u_min:.4g} for at most 1 % rounding "
            f"inflation at dim={dim}) plus {k} x noise std (hint {noise_multiplier_hint}) need "
            f"about {math.ceil(need)} bits, bits={bits}: use more bits, fewer clients per sum, or "
            "a smaller noise hint / k"
        )
    lo, hi = u_min, u_min
    while bound(hi * 2) <= room:
        hi *= 2
    hi *= 2
    lo = hi / 2
    while hi / lo > 1 + 1e-12:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if bound(mid) <= room else (lo, mid)
    return lo / clip
