"""The local DP noise multiplier of a run: one rule for the clients and for ``fedrec audit``.

A client calibrates sigma once from its budget over the planned rounds
(:meth:`FedConfig.rounds_planned`) at the run's interaction-level adjacency; the audit recomputes
the same value to check every ledger line against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy.accounting import noise_for_budget


def calibrated_noise(cfg: FedConfig, sample_rate: float | None = None) -> float:
    """sigma for the budget over the planned rounds (or the configured fixed value), at the
    interaction-level adjacency of ``cfg`` (:meth:`FedConfig.dp_adjacency`), for a client that
    samples at ``sample_rate`` (default: a one-user client's,
    :meth:`FedConfig.client_sample_rate`; with ``expected-batch`` each client has its own).
    Memoized per process (:func:`noise_for_budget` is cached on its arguments): the search
    takes seconds and every round of a run asks again. With ``segment-prior`` the budget also
    pays for the segment release (:func:`planned_release`)."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    q = cfg.client_sample_rate(1) if sample_rate is None else sample_rate
    release = planned_release(cfg)
    return noise_for_budget(
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        sample_rate=q,
        steps=cfg.local_steps * cfg.rounds_planned(),
        accountant=cfg.accountant,
        group=cfg.dp_group(),
        adjacency=cfg.dp_adjacency(),
        extra=(release,) if release is not None else (),
    )


def planned_release(cfg: FedConfig) -> tuple[float, float, int] | None:
    """The accountant-history run the segment release is charged as under local DP
    (:func:`fedrec.shared.federation.segments.release_run`), or None when there is none."""
    if not (cfg.dp and cfg.segment_prior):
        return None
    from fedrec.shared.federation.segments import release_run

    return release_run(cfg.segment_noise, cfg.dp_adjacency(), cfg.dp_group())


def run_checker(cfg: FedConfig) -> Callable[[tuple[float, float, int]], str | None]:
    """What ``fedrec audit`` holds each trained ledger line's ``(sigma, q, steps)`` to: the
    config's steps, a sampling rate the config allows (``sample-rate`` when set; else
    ``min(1, expected-batch / (slots * users))`` for some whole number of users: the ledger does
    not say how many users a client holds), and the noise this module calibrates for that q.
    Returns what is wrong, or None."""

    def check(run: tuple[float, float, int]) -> str | None:
        sigma, q, steps = run
        if cfg.sample_rate == 0:
            # q = min(1, expected-batch / (slots * users)) for a whole number of users >= 1
            users = cfg.expected_batch / (cfg.slots * q) if q > 0 else math.inf
            whole = users >= 1 - 1e-9 and math.isclose(users, round(users), rel_tol=1e-9)
            if not (q == 1.0 and cfg.client_sample_rate(1) == 1.0 or 0 < q < 1 and whole):
                return (
                    f"sample rate {q} is not min(1, expected-batch / (slots x users)) = "
                    f"min(1, {cfg.expected_batch} / ({cfg.slots} x users)) for any whole number "
                    "of users, the rates config.json allows"
                )
        elif q != cfg.sample_rate:
            return f"sample rate {q} is not config.json's sample-rate {cfg.sample_rate}"
        want = calibrated_noise(cfg, q)
        if not math.isclose(sigma, want, rel_tol=1e-9) or steps != cfg.local_steps:
            return (
                f"not the one config.json calibrates: ({want}, {q}, {cfg.local_steps}) at that "
                "sample rate"
            )
        return None

    return check


def server_noise_std(cfg: FedConfig, sigma: float) -> float:
    """``dp-noise=server``: the standard deviation the trusted server adds to each coordinate of
    the summed change, ``lr * sigma * max-grad-norm / batch-divisor`` (one window changes that
    sum by at most ``lr * max-grad-norm / batch-divisor``; :mod:`fedrec.server.interaction_dp`)."""
    return cfg.lr * sigma * cfg.max_grad_norm / cfg.batch_divisor
