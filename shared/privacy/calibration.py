"""The local DP noise multiplier of a run: one rule for the clients and for ``fedrec audit``.

A client calibrates sigma once from its budget over the planned rounds
(:meth:`FedConfig.rounds_planned`) at the run's interaction-level adjacency; the audit recomputes
the same value to check every ledger line against it.
"""

from __future__ import annotations

from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy.accounting import noise_for_budget

_SIGMA: dict[tuple[Any, ...], float] = {}


def calibrated_noise(cfg: FedConfig) -> float:
    """sigma for the budget over the planned rounds (or the configured fixed value), at the
    interaction-level adjacency of ``cfg`` (:meth:`FedConfig.dp_adjacency`). Memoized per
    process: the search takes seconds and every round of a run asks again."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    key = (
        cfg.epsilon,
        cfg.sample_rate,
        cfg.local_steps,
        cfg.rounds_planned(),
        *cfg.dp_mechanism().values(),
    )
    if key not in _SIGMA:
        _SIGMA[key] = noise_for_budget(
            epsilon=cfg.epsilon,
            delta=cfg.delta,
            sample_rate=cfg.sample_rate,
            steps=cfg.local_steps * cfg.rounds_planned(),
            accountant=cfg.accountant,
            group=cfg.dp_group(),
            adjacency=cfg.dp_adjacency(),
        )
    return _SIGMA[key]
