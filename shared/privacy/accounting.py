"""DP-SGD accounting with Opacus: calibrate the noise for a budget, compute epsilon spent.

A mechanism history is a list of ``(noise_multiplier, sample_rate, steps)`` runs, the format of
Opacus' ``RDPAccountant.history``. Epsilon is always computed over a client's WHOLE history
(every round it took part in): recomputing it per round would under-report (DESIGN 4).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

Run = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
ACCOUNTANTS = ("rdp", "prv")


def _check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be > 0")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps={steps} must be a non-negative integer")


def epsilon_spent(
    *, history: Sequence[Run], delta: float, accountant: str = "rdp", group: int = 1
) -> float:
    """Epsilon at ``delta`` after every run in ``history`` (0 for an empty history).

    ``group`` > 1: the guarantee for datasets at add/remove distance ``group`` instead of 1 (one
    privacy unit that can change up to ``group`` examples), by :func:`group_epsilon`.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r}: use one of {ACCOUNTANTS}")
    if group < 1 or int(group) != group:
        raise ValueError(f"group={group} must be an integer >= 1")
    runs = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    for run in runs:
        _check_run(*run)
    if not runs:
        return 0.0
    if group > 1:
        if accountant != "rdp":
            # Opacus' PRV accountant refuses the tiny example-level deltas group privacy needs
            raise ValueError("epsilon for group > 1 is computed with accountant='rdp' only")
        # tiny deltas need RDP orders beyond Opacus' default 63
        return group_epsilon(lambda d: _rdp_epsilon(runs, d, WIDE_ALPHAS), delta, group)
    if accountant == "rdp":
        return _rdp_epsilon(runs, delta, tuple(RDPAccountant.DEFAULT_ALPHAS))
    # Composition does not depend on order, and equal (sigma, q) runs merge: the canonical
    # merged history is the cache key (PRV takes ~1 s per call; a federation repeats histories).
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in runs:
        merged[s, q] = merged.get((s, q), 0) + n
    return _prv_epsilon(tuple(sorted((s, q, n) for (s, q), n in merged.items())), delta)


# Opacus' default RDP orders plus larger ones: RDP holds at every order, and the tiny
# example-level deltas of group privacy are optimised at orders above the default's 63.
WIDE_ALPHAS = (*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


def _rdp_epsilon(runs: Sequence[Run], delta: float, orders: tuple[float, ...]) -> float:
    # Opacus' RDPAccountant.get_privacy_spent, with the per-step RDP curve of each (sigma, q)
    # memoized: RDP composes additively, so T steps = T * one step's curve. (Opacus recomputes
    # the curve from scratch: ~1 s per call at fractional orders.)
    rdp = sum(_rdp_per_step(s, q, orders) * n for s, q, n in runs)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": still a valid bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _alpha = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


# log10 step of the example-level delta grid searched by group_epsilon, and its extent
_GROUP_GRID_STEP, _GROUP_GRID_DECADES = 0.125, 40


def group_epsilon(eps_at: Callable[[float], float], delta: float, group: int) -> float:
    """Group privacy for approximate DP: the epsilon for datasets ``group`` add/remove steps apart.

    A mechanism that is ``(e, d)``-DP for neighbours is ``(k e, d (1 + e^e + ... + e^((k-1)e)))``
    -DP for datasets k steps apart (induction on the neighbour inequality; Vadhan 2017, Lemma
    2.2, gives the bound ``k e^((k-1)e) d``). ``eps_at(d)`` is the neighbour-level epsilon at
    delta ``d`` (an accountant's curve). This returns ``k * eps_at(d)`` for the largest ``d`` on
    a log grid (from ``delta / k`` down by 10^-1/8 steps over 40 decades) whose group-level
    delta is at most ``delta``: any such ``d`` gives a valid bound, and a larger ``d`` a smaller
    epsilon. ``inf`` when no grid point qualifies.
    """
    log_delta = math.log(delta)
    for j in range(int(_GROUP_GRID_DECADES / _GROUP_GRID_STEP) + 1):
        d = delta / group * 10 ** (-j * _GROUP_GRID_STEP)
        e = eps_at(d)
        # log of d * sum_{i<k} e^(i e), computed without overflow
        log_sum = float(np.logaddexp.reduce(np.arange(group) * e))
        if math.log(d) + log_sum <= log_delta:
            return group * e
    return math.inf


@functools.lru_cache(maxsize=4096)
def _prv_epsilon(runs: tuple[Run, ...], delta: float) -> float:
    acc = PRVAccountant()
    acc.history = list(runs)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(
    noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]
) -> np.ndarray:
    return np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
        )
    )


def noise_for_budget(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    group: int = 1,
) -> float:
    """The smallest noise multiplier whose ``steps`` at ``sample_rate`` spend at most ``epsilon``.

    Opacus' binary search; its result is re-checked here so the budget can never be exceeded by
    the search's tolerance. With ``group`` > 1 (the budget holds for datasets ``group``
    add/remove steps apart, :func:`group_epsilon`) the search is this module's own, RDP only.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon} must be > 0")
    _check_run(1.0, sample_rate, steps)

    def spent(sigma: float) -> float:
        return epsilon_spent(
            history=[(sigma, sample_rate, steps)], delta=delta, accountant=accountant, group=group
        )

    if group > 1:  # spent() refuses accountants other than RDP
        lo, hi = 0.1, 1.0
        while spent(hi) > epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError(
                    f"no noise multiplier up to 1e4 reaches epsilon={epsilon} for groups of "
                    f"{group} at delta={delta}: lower the group size or raise the budget"
                )
        while hi - lo > 1e-3 * hi:  # spent() decreases with sigma
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
        return hi
    sigma = float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=tolerance,
        )
    )
    while spent(sigma) > epsilon:
        sigma *= 1.01
    return sigma
