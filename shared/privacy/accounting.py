"""DP-SGD accounting: calibrate the noise for a budget, compute epsilon spent.

A mechanism history is a list of ``(noise_multiplier, sample_rate, steps)`` runs, the format of
Opacus' ``RDPAccountant.history``. Epsilon is always computed over a client's WHOLE history
(every round it took part in): recomputing it per round would under-report.

Adjacency at the example level (what one privacy unit can change among the training examples):

- ``add-remove``, ``group`` k: up to k examples added or removed (k = 1: the textbook DP-SGD
  neighbour). k > 1 is group privacy (:func:`group_epsilon`), RDP only.
- ``replace-one``: one example replaced by another, OR one example added or removed. Epsilon is
  the larger of the two relations' (the replacement is the larger in practice). ``pld``
  (Google's ``dp-accounting``, ``REPLACE_ONE``: the tight Poisson-subsampled pair) and ``prv``
  (Opacus' PRV numerics with :mod:`fedrec.shared.privacy.replace_prv`) compute it directly; ``rdp``
  has no replace-one curve for Poisson sampling and uses group privacy over 2 add/remove steps
  (valid, much looser).

Accountants: ``pld`` (dp-accounting's privacy-loss distributions), ``prv`` (Opacus' PRV
accountant), ``rdp`` (Opacus' RDP accountant). :func:`independent_epsilon` recomputes an epsilon
with a second accountant that shares no numerics with the first (pld <-> prv; rdp -> dp-accounting's
RDP accountant), which is how ``fedrec audit`` checks every claim.
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
ACCOUNTANTS = ("pld", "prv", "rdp")
ADJACENCIES = ("replace-one", "add-remove")
# dp-accounting's PLD grid: pessimistic rounding (an upper bound at any grid); 1e-3 agrees with
# 1e-4 to 4 digits at the settings fedrec runs and is ten times faster
PLD_DISCRETIZATION = 1e-3


def _check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be > 0")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps={steps} must be a non-negative integer")


def epsilon_spent(
    *,
    history: Sequence[Run],
    delta: float,
    accountant: str = "rdp",
    group: int = 1,
    adjacency: str = "add-remove",
) -> float:
    """Epsilon at ``delta`` after every run in ``history`` (0 for an empty history), for
    datasets that are neighbours under ``adjacency`` (see the module doc); ``group`` > 1 (with
    ``add-remove``): ``group`` add/remove steps apart, by :func:`group_epsilon`, RDP only."""
    runs = _checked(history, delta, accountant, group, adjacency)
    if not runs:
        return 0.0
    if adjacency == "replace-one":
        if accountant == "rdp":  # no replace-one RDP curve: a replacement is 2 add/remove steps
            return group_epsilon(lambda d: _rdp_epsilon(runs, d, WIDE_ALPHAS), delta, 2)
        merged = _merged(runs)
        if accountant == "pld":
            return max(_pld_epsilon(merged, delta, True), _pld_epsilon(merged, delta, False))
        return max(_prv_replace_epsilon(merged, delta), _prv_epsilon(merged, delta))
    if group > 1:
        # tiny deltas need RDP orders beyond Opacus' default 63
        return group_epsilon(lambda d: _rdp_epsilon(runs, d, WIDE_ALPHAS), delta, group)
    if accountant == "rdp":
        return _rdp_epsilon(runs, delta, tuple(RDPAccountant.DEFAULT_ALPHAS))
    if accountant == "pld":
        return _pld_epsilon(_merged(runs), delta, False)
    return _prv_epsilon(_merged(runs), delta)


def independent_epsilon(
    *,
    history: Sequence[Run],
    delta: float,
    accountant: str,
    group: int = 1,
    adjacency: str = "add-remove",
) -> tuple[float, str]:
    """The same epsilon as :func:`epsilon_spent` with ``accountant``, recomputed by a second
    accountant that shares none of its numerics, and that accountant's name: ``pld`` is checked
    with ``prv`` and vice versa; ``rdp`` with dp-accounting's RDP accountant (its own RDP curve
    of the Poisson-subsampled Gaussian), through the same group conversion."""
    runs = _checked(history, delta, accountant, group, adjacency)
    if accountant in ("pld", "prv"):
        other = "prv" if accountant == "pld" else "pld"
        return (
            epsilon_spent(
                history=runs, delta=delta, accountant=other, group=group, adjacency=adjacency
            ),
            other,
        )
    if not runs:
        return 0.0, "dp-accounting-rdp"
    k = 2 if adjacency == "replace-one" else group
    merged = _merged(runs)
    if k == 1:
        return _dpa_rdp_epsilon(merged, delta), "dp-accounting-rdp"
    return group_epsilon(lambda d: _dpa_rdp_epsilon(merged, d), delta, k), "dp-accounting-rdp"


def _checked(
    history: Sequence[Run], delta: float, accountant: str, group: int, adjacency: str
) -> list[Run]:
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r}: use one of {ACCOUNTANTS}")
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency={adjacency!r}: use one of {ADJACENCIES}")
    if group < 1 or int(group) != group:
        raise ValueError(f"group={group} must be an integer >= 1")
    if group > 1 and adjacency != "add-remove":
        raise ValueError("group > 1 goes with adjacency='add-remove' (k add/remove steps)")
    if group > 1 and accountant != "rdp":
        # Opacus' PRV accountant refuses the tiny example-level deltas group privacy needs
        raise ValueError("epsilon for group > 1 is computed with accountant='rdp' only")
    runs = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    for run in runs:
        _check_run(*run)
    return runs


def _merged(runs: Sequence[Run]) -> tuple[Run, ...]:
    """Composition does not depend on order, and equal (sigma, q) runs merge: the canonical
    merged history is the cache key (PLD and PRV take 0.1-1 s a call; a federation repeats
    histories)."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in runs:
        merged[s, q] = merged.get((s, q), 0) + n
    return tuple(sorted((s, q, n) for (s, q), n in merged.items()))


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(runs: tuple[Run, ...], delta: float, replace: bool) -> float:
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    rel = dp_accounting.NeighboringRelation
    acc = PLDAccountant(
        neighboring_relation=rel.REPLACE_ONE if replace else rel.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    for s, q, n in runs:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _prv_replace_epsilon(runs: tuple[Run, ...], delta: float) -> float:
    from fedrec.shared.privacy.replace_prv import replace_one_epsilon

    return float(replace_one_epsilon(history=list(runs), delta=delta))


@functools.lru_cache(maxsize=4096)
def _dpa_rdp_epsilon(runs: tuple[Run, ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    # orders from 2 up: dp-accounting's fractional-order series fails to converge below 2 at
    # small sigma (and logs each failure); any set of orders gives a valid bound
    acc = RdpAccountant(orders=list(_DPA_ORDERS))
    for s, q, n in runs:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
    return float(acc.get_epsilon(delta))


# Opacus' default RDP orders plus larger ones: RDP holds at every order, and the tiny
# example-level deltas of group privacy are optimised at orders above the default's 63.
WIDE_ALPHAS = (*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


_DPA_ORDERS = (*(2 + 0.25 * i for i in range(36)), *range(11, 64), *WIDE_ALPHAS[-10:])


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


# Pure in its arguments and called by every client of a run with the same ones (a user-level
# round computes the run's noise multiplier, a local-DP one its calibrated sigma; Opacus' binary
# search took about 4 ms a call, a tenth of a one-user client's round): once per process.
@functools.lru_cache(maxsize=1024)
def noise_for_budget(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    group: int = 1,
    adjacency: str = "add-remove",
    extra: tuple[Run, ...] = (),
) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``steps`` at ``sample_rate`` spend at most
    ``epsilon`` under ``adjacency`` / ``group`` (see :func:`epsilon_spent`), composed with the
    fixed runs ``extra`` (another release the same budget pays for, e.g. a count table's).

    Add/remove with group 1 under RDP or PRV and no ``extra`` starts from Opacus' binary search;
    every result is re-checked against :func:`epsilon_spent`, so the budget is never exceeded by
    a search's tolerance."""
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon} must be > 0")
    _check_run(1.0, sample_rate, steps)
    for run in extra:
        _check_run(*run)
    if extra:
        alone = epsilon_spent(
            history=list(extra),
            delta=delta,
            accountant=accountant,
            group=group,
            adjacency=adjacency,
        )
        if alone >= epsilon:
            raise ValueError(
                f"the fixed release(s) {list(extra)} alone spend epsilon {alone:.3f} >= the "
                f"budget {epsilon} at delta={delta}: raise their noise or the budget"
            )

    def spent(sigma: float) -> float:
        return epsilon_spent(
            history=[(sigma, sample_rate, steps), *extra],
            delta=delta,
            accountant=accountant,
            group=group,
            adjacency=adjacency,
        )

    if group == 1 and adjacency == "add-remove" and accountant in ("rdp", "prv") and not extra:
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
    lo, hi = 0.1, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(
                f"no noise multiplier up to 1e4 reaches epsilon={epsilon} at delta={delta} "
                f"({adjacency}, group {group}): raise the budget or lower the group size"
            )
    while hi - lo > 1e-3 * hi:  # spent() decreases with sigma
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi
