"""Per-interaction DP-SGD without a trusted server: the accounting of a full-batch round whose
noise is distributed Skellam shares inside a SecAgg+ sum.

This module is the calibration and the accounting only; no run uses it yet. The mechanism it
accounts for is the full-batch case (``sample-rate`` = 1) of ``dp-noise=server``
(:mod:`fedrec.server.interaction_dp`), with the server's Gaussian replaced by the clients'
Skellam shares so that the server never sees one client's change:

1. every client (all of them, every round) takes every one of its examples (``sample-rate`` =
   1: no subsampling), clips each example's gradient to ``max-grad-norm`` C, sums them, divides
   by the public ``batch-divisor`` D and takes ONE plain SGD step at ``lr``, without noise;
2. it projects that change onto the L2 ball of radius ``update-norm-max`` R (a projection is
   1-Lipschitz: it never moves two changes further apart), scales it by ``scale`` and rounds
   it with plain randomized rounding
   (:func:`fedrec.shared.privacy.skellam.encode_unconditional`), adds its Skellam share
   ``mu_client`` and masks it for SecAgg+;
3. the server learns only the modular sum, decodes it and divides by ``scale``: the sum of the
   changes plus Skellam noise, which its optimizer post-processes.

**Sensitivity.** One add/remove step of one window moves a client's float change by at most
``lr C / D``. Under sliding windows one interaction removes its own window and changes the
context of the next ``history-len`` windows (each change a replacement, two steps):
:meth:`FedConfig.dp_group` = ``1 + 2 history-len`` steps; under disjoint examples it adds,
removes or replaces one example (at most two steps). So one interaction moves the change by at
most ``s = factor lr C / D``, ``factor`` = ``dp_group()`` or 2; every other client's change is
the same. Every tensor must train at ``lr`` (no per-tensor rates), which
:func:`plan_interaction` checks with the rest of ``dp-noise=server``'s rules.

After plain rounding with shared uniforms the integer sum moves by at most
:func:`fedrec.shared.privacy.skellam.rounded_shift_bounds` ``(s, scale, dim)``: ``L2 <= scale
s + sqrt(dim)``. The group is inside the sensitivity, so no group-privacy conversion is needed.

**Why full batch.** A Poisson-subsampled Skellam mechanism has no tight RDP bound that fedrec
can cite (the general bound of Zhu and Wang 2019, Theorem 6, about doubles epsilon at the
``silos-trusted-server`` preset's q = 0.1); at q = 1 each round is the plain multi-dimensional
Skellam mechanism: :func:`fedrec.shared.privacy.skellam.skellam_epsilon` (Theorem 3.5 of
Agarwal, Kairouz, Liu 2021, a proven bound) and
:func:`~fedrec.shared.privacy.skellam.skellam_epsilon_independent`, the claim being the larger.
At the noise a real model's dimension needs (``mu`` above
:data:`~fedrec.shared.privacy.skellam.MU_EXACT`) the second is the Gaussian limit, not a
computation from the probability mass function, so there the claim rests on the theorem
alone; the pmf is used for small ``mu`` only.

**Who adds the noise.** As under user-level secure aggregation
(:mod:`fedrec.shared.privacy.distributed`): the claim counts only the shares of survivors that
are neither colluders (``secagg-colluders`` of all clients, all assumed in the cohort) nor the
client holding the protected interaction, and the chance that the colluders can unmask one
client (SecAgg+'s random graph) is taken out of ``delta``.

**What the runtime must add** (nothing enforces it yet): a round with fewer than
``min_survivors`` survivors is not released; every client takes part every round; nothing else
a client sends depends on its data (no loss, no ``trained`` flag, no budget figure); and the
change is computed as ``-lr G / D`` in float64 (a float32 difference of two models adds up to
half an ulp of the weights per coordinate, which ``lr C / D`` does not bound).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy import skellam
from fedrec.shared.privacy.distributed import _cohort_parameters

# the integer grid is fine enough that rounding adds at most this share to the L2 sensitivity
ROUNDING_SHARE = 0.01
# standard deviations of the summed noise kept inside the modulus (beside the largest sum)
WRAP_SIGMAS = 8.0


def float_sensitivity(cfg: FedConfig) -> float:
    """How far one interaction can move one client's float change (L2): ``factor lr C / D``
    (module doc). ValueError when ``batch-divisor`` is not set (the divisor must be a public
    constant)."""
    if cfg.batch_divisor <= 0:
        raise ValueError(
            "batch-divisor must be > 0 for per-interaction secure aggregation: every client "
            "divides by the same public constant (e.g. slots x all users at sample-rate 1)"
        )
    factor = cfg.dp_group() if cfg.dp_adjacency() == "add-remove" else 2
    return factor * cfg.lr * cfg.max_grad_norm / cfg.batch_divisor


@dataclass(frozen=True)
class InteractionPlan:
    """Everything fixed for a run: cohort, graph, integer grid and noise."""

    cohort: int
    neighbours: int
    threshold: int
    min_survivors: int
    colluders: int
    honest_min: int
    encoding: skellam.SkellamConfig  # clip = the projection radius update-norm-max
    float_sensitivity: float
    l1: float  # integer sensitivities of the released sum (rounding included)
    l2: float
    mu_total: float  # the noise the claim counts in the worst accepted round
    mu_client: float
    collusion_risk: float
    delta: float  # what the accountant is given: delta - collusion_risk

    def epsilon(self, mu_counted: float | None = None, releases: int | None = None) -> float:
        """The claimed epsilon: the larger of the two accountants' (module doc), for
        ``releases`` rounds (required) each carrying at least ``mu_counted`` (default: the
        plan's ``mu_total``)."""
        mu = self.mu_total if mu_counted is None else mu_counted
        n = -1 if releases is None else releases
        if n < 0:
            raise ValueError("pass releases: the number of rounds released (>= 0)")
        if n == 0:
            return 0.0
        if mu <= 0:
            return math.inf
        return max(
            skellam.skellam_epsilon(mu, self.l1, self.l2, n, self.delta),
            skellam.skellam_epsilon_independent(mu, self.l2, n, self.delta),
        )

    def as_dict(self) -> dict[str, Any]:
        e = self.encoding
        return {
            "cohort": self.cohort,
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "min_survivors": self.min_survivors,
            "colluders": self.colluders,
            "honest_shares_min": self.honest_min,
            "projection_radius": e.clip,
            "scale": e.scale,
            "dim": e.dim,
            "bits": e.bits,
            "rounding": "unconditional",
            "float_sensitivity": self.float_sensitivity,
            "l2_sensitivity": self.l2,
            "l1_sensitivity": self.l1,
            "mu_client": self.mu_client,
            "mu_total_claimed": self.mu_total,
            "collusion_risk": self.collusion_risk,
            "delta_accountant": self.delta,
        }


def plan_interaction(cfg: FedConfig, cohort: int, dim: int, clients: int) -> InteractionPlan:
    """Calibrate a run of ``cfg.num_rounds`` full-batch rounds for a per-interaction
    (``epsilon``, ``delta``) guarantee: the cohort's SecAgg+ graph and colluders (as
    :func:`fedrec.shared.privacy.distributed.plan`, with the collusion risk taken out of
    ``delta``), the integer grid, and each client's noise share. Deterministic in its
    arguments, so that a client can recompute what the server asks of it.

    The grid: ``scale`` is the smallest at which rounding adds at most
    :data:`ROUNDING_SHARE` to the L2 sensitivity (``sqrt(dim) <= 1 % scale s``). Then every
    client's integer vector stays within ``scale R + 1`` per coordinate, and the modulus must
    hold the cohort's sum plus :data:`WRAP_SIGMAS` standard deviations of every share's noise;
    if it cannot, ValueError says to raise ``secagg-bits`` or lower ``update-norm-max``.
    ValueError too for anything but one full-batch SGD step per round."""
    if not cfg.dp:
        raise ValueError("per-interaction secure aggregation needs dp = true")
    try:  # dp-noise=server's rules: one plain SGD step a round, every tensor at lr, ...
        dataclasses.replace(cfg, dp_noise="server", secure_agg=False)
    except ValueError as err:
        raise ValueError(
            f"per-interaction secure aggregation needs what dp-noise=server needs: {err}"
        ) from None
    if cohort != clients:
        raise ValueError(
            f"a cohort of {cohort} of {clients} clients: per-interaction secure aggregation "
            "needs every client every round"
        )
    if cfg.sample_rate != 1:
        raise ValueError(
            f"sample-rate = {cfg.sample_rate}: per-interaction secure aggregation needs 1 (every "
            "example every round): no tight RDP bound is known for a Poisson-subsampled "
            "Skellam mechanism, and fedrec claims none"
        )
    if cfg.local_steps != 1 or cfg.local_opt != "sgd":
        raise ValueError(
            "per-interaction secure aggregation needs local-steps = 1 and local-opt = sgd: each "
            "round must be one step on the clipped sum"
        )
    if cfg.fraction_train != 1:
        raise ValueError(
            f"fraction-train = {cfg.fraction_train}: per-interaction secure aggregation needs 1 "
            "(no client sampling is assumed)"
        )
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim={dim} must be an integer >= 1")
    k, t, min_survivors, colluders, honest, risk = _cohort_parameters(
        cfg, cohort, clients, delta=cfg.delta
    )
    delta = cfg.delta - risk
    s = float_sensitivity(cfg)
    scale = math.sqrt(dim) / (ROUNDING_SHARE * s)
    enc = skellam.SkellamConfig(
        clip=cfg.update_norm_max, scale=scale, dim=int(dim), bits=cfg.secagg_bits
    )
    l1, l2 = skellam.rounded_shift_bounds(s, scale, int(dim))
    mu_total = skellam.calibrate_mu_claimed(cfg.epsilon, delta, cfg.num_rounds, l1, l2)
    mu_client = skellam.noise_shares(mu_total, honest)
    if mu_client > skellam.MAX_MU:
        raise ValueError(
            f"each client's Skellam share would be {mu_client:.3g}, above {skellam.MAX_MU:.3g}: "
            "raise epsilon or lower num-rounds"
        )
    largest = cohort * (scale * cfg.update_norm_max + 1)
    spread = WRAP_SIGMAS * math.sqrt(2 * mu_client * cohort)
    if largest + spread >= 2.0 ** (cfg.secagg_bits - 1):
        raise ValueError(
            f"secagg-bits = {cfg.secagg_bits} cannot hold the sum of {cohort} changes of norm up "
            f"to update-norm-max = {cfg.update_norm_max} on a grid of {scale:.4g} units per "
            f"1.0 plus the noise ({largest + spread:.3g} >= 2**{cfg.secagg_bits - 1}): raise "
            "secagg-bits or lower update-norm-max"
        )
    return InteractionPlan(
        cohort=cohort,
        neighbours=k,
        threshold=t,
        min_survivors=min_survivors,
        colluders=colluders,
        honest_min=honest,
        encoding=enc,
        float_sensitivity=s,
        l1=l1,
        l2=l2,
        mu_total=mu_total,
        mu_client=mu_client,
        collusion_risk=risk,
        delta=delta,
    )
