"""Per-interaction DP-SGD without a trusted server: the accounting of a full-batch round whose
noise is distributed Skellam shares inside a SecAgg+ sum.

This module is the calibration, the client's check of the server's request, the run's claim
and its audit; ``dp-noise=secure`` runs it (:mod:`fedrec.server.secure_agg` with a sum divisor
of 1, :func:`fedrec.client.secure.masked`). The mechanism it accounts for is the full-batch
case (``sample-rate`` = 1) of ``dp-noise=server`` (:mod:`fedrec.server.interaction_dp`), with
the server's Gaussian replaced by the clients' Skellam shares so that the server never sees one
client's change:

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

**What the runtime does for it**: a round with fewer than ``min_survivors`` survivors is not
released (:class:`fedrec.shared.federation.secagg.SecAggServer`); every client takes part every
round (the cohort is every client, checked each round); nothing else a client sends depends on
its data (a secure reply's metrics are constants; a client without data or budget sends a zero
change with its noise share); and the change is computed as ``-lr G / D`` in float64
(:func:`fedrec.client.local_train.secure_steps`: a float32 difference of two models would add
up to half an ulp of the weights per coordinate, which ``lr C / D`` does not bound). ``G`` itself
is Opacus' float32 sum of the clipped gradients divided by D: its rounding is not covered, as in
every DP-SGD implementation (the statement says so).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy import skellam
from fedrec.shared.privacy.distributed import (
    _cohort_parameters,
    _count,
    honest_shares,
    read_rounds,
    round_problems,
)

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

    clients: int  # every client, every round: the cohort
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
        return max(_epsilons(self, mu, n))

    def as_dict(self) -> dict[str, Any]:
        e = self.encoding
        return {
            "clients": self.clients,
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
    if cfg.partition != "silo" or clients != cfg.silos:
        # the clients' number sets the colluders and the shares counted: a client must be able
        # to check it, so it is the run config's silos, not the server's word
        raise ValueError(
            f"{clients} clients with partition={cfg.partition}, silos={cfg.silos}: "
            "per-interaction secure aggregation needs partition = silo and every one of the "
            "config's silos connected (the number of clients is checked against silos)"
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
        clients=clients,
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


def check_interaction_request(
    cfg: FedConfig, fields: dict[str, Any], threshold: int
) -> InteractionPlan:
    """A client's check of a ``dp-noise=secure`` masked-input request against its own
    :func:`plan_interaction` from the run config, the cohort and the clients the server
    states: the cohort must be every client, and the server cannot ask for less noise, another
    grid or projection radius, or a lower Shamir threshold. Raises ValueError saying what
    differs; returns the client's own plan."""
    cohort, clients, dim = fields.get("cohort"), fields.get("clients"), fields.get("dim")
    for key, v in (("cohort", cohort), ("clients", clients), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"secure aggregation: the server's request has {key}={v!r}, not a positive whole "
                "number; refused"
            )
    assert isinstance(cohort, int) and isinstance(clients, int) and isinstance(dim, int)
    p = plan_interaction(cfg, cohort, dim, clients)  # refuses a cohort other than the clients
    e = p.encoding
    wants = {
        "clip": e.clip, "scale": e.scale, "bits": e.bits, "mu": p.mu_client,
        "threshold": p.threshold,
    }  # fmt: skip
    asked = {k: fields.get(k) for k in wants} | {"threshold": threshold}
    for key, mine in wants.items():
        theirs = asked[key]
        if (
            isinstance(theirs, bool)
            or not isinstance(theirs, (int, float))
            or not math.isclose(float(theirs), float(mine), rel_tol=1e-9)
        ):
            raise ValueError(
                f"secure aggregation: the server asks {key}={theirs}, but this client's "
                f"per-interaction calibration for {clients} clients gives {mine}; refused"
            )
    return p


UNIT = (
    "one interaction (user, item, timestamp) of a client's data, except an interaction that is "
    "its user's only training interaction"
)
TRUST = (
    "honest-but-curious server that sees only the modular sum of the masked inputs; at most "
    "{colluders} of the {clients} clients (secagg-colluders = {fraction:g}) collude with it, "
    "and at most {dropped} drop out (a round with fewer survivors is not released); the noise "
    "share of the client holding the protected interaction is not counted"
)


def _epsilons(p: InteractionPlan, mu: float, n: int) -> tuple[float, float]:
    """(Theorem 3.5's epsilon, the numerical accountant's) for ``n`` releases at ``mu``."""
    if not n:
        return 0.0, 0.0
    if mu <= 0:
        return math.inf, math.inf
    return (
        skellam.skellam_epsilon(mu, p.l1, p.l2, n, p.delta),
        skellam.skellam_epsilon_independent(mu, p.l2, n, p.delta),
    )


def interaction_summary(
    cfg: FedConfig, p: InteractionPlan, rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """``metrics.json``'s ``privacy`` for a ``dp-noise=secure`` run: every client took part in
    every released round with the same mechanism, so every client's per-interaction epsilon is
    the run's (a client that dropped from a round is still charged for it: an over-count)."""
    released = [r for r in rounds if r.get("released")]
    n = len(released)
    mu = min((float(r["mu_honest"]) for r in released), default=p.mu_total)
    analytic, independent = _epsilons(p, mu, n)
    eps = max(analytic, independent)
    _ratio, exact = skellam.independent_rdp_ratio(mu, p.l2)
    return {
        "dp": True,
        "clients": p.clients,
        "epsilon_max": eps,
        "epsilon_median": eps,
        "epsilon_budget": cfg.epsilon,
        "delta": cfg.delta,
        "rounds_per_client": {n: p.clients},
        "refusals": None,  # a secure reply does not say whether its client trained
        "secure_interaction": {
            "unit": UNIT,
            "adjacency": cfg.dp_adjacency(),
            "group": cfg.dp_group() if cfg.dp_adjacency() == "add-remove" else 1,
            "mechanism": "one full-batch DP-SGD step a round (no noise at the clients' step); "
            "each client projects its change, rounds it (plain randomized rounding) and adds "
            "its Skellam noise share inside a SecAgg+ sum",
            "trust": TRUST.format(
                colluders=p.colluders,
                clients=p.clients,
                fraction=cfg.secagg_colluders,
                dropped=p.cohort - p.min_survivors,
            ),
            "plan": p.as_dict(),
            "releases": n,
            "mu_total_used": mu,
            "noise_std_on_sum": math.sqrt(2 * mu) / p.encoding.scale,
            "epsilon": eps,
            "epsilon_analytic": analytic,
            "epsilon_independent": independent,
            # False: the numerical accountant is the Gaussian limit there (not independent)
            "independent_exact": bool(exact),
            "delta_accountant": p.delta,
            "collusion_risk": p.collusion_risk,
            "accounting": "Skellam RDP bound (Agarwal, Kairouz, Liu 2021, Theorem 3.5) at the "
            "rounded sensitivities, composed over the releases, each at the smallest released "
            "round's counted noise; the claim is the larger of that and a numerical "
            "Renyi-divergence computation; no amplification by sampling",
        },
        "user_level": {"enabled": False},
    }


def audit_interaction(
    run: Path, cfg: FedConfig, tolerance: float
) -> tuple[dict[str, Any], list[str]]:
    """Recompute a ``dp-noise=secure`` run's per-interaction epsilon from its config, the
    plan its ``metrics.json`` states and ``privacy/secagg.jsonl``; problems as text.

    Checks: the stated plan is :func:`plan_interaction`'s for the config and the stated clients
    and dimension; the round records are consistent and no round was released below the plan's
    minimum survivors (:func:`~fedrec.shared.privacy.distributed.round_problems`); each released
    round's counted noise is ``mu_client`` times its honest survivors; the releases cover every
    aggregated round; the claimed epsilon is not below either recomputation; the recomputed
    epsilon is within the budget. Trusts what the server's files cannot show: that the clients
    took one clipped full-batch step, projected, rounded and added their shares."""
    path = run / "metrics.json"
    fail: dict[str, Any] = {"verified": False}
    try:
        doc = json.loads(path.read_text())
        claim = doc["privacy"]["secure_interaction"]
        stated = claim["plan"]
        expected = plan_interaction(
            cfg, int(stated["cohort"]), int(stated["dim"]), int(stated["clients"])
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        return fail, [
            f"{path}: cannot read the per-interaction secure-aggregation claim or recompute its "
            f"plan ({type(err).__name__}: {err})"
        ]
    problems: list[str] = []
    for key, mine in expected.as_dict().items():
        theirs = stated.get(key)
        same = (
            theirs == mine
            if isinstance(mine, str)
            else isinstance(theirs, (int, float))
            and not isinstance(theirs, bool)
            and math.isclose(float(theirs), float(mine), rel_tol=1e-9, abs_tol=1e-12)
        )
        if not same:
            problems.append(
                f"secure-interaction plan: {key} is {theirs!r}, the config gives {mine}"
            )
    try:
        rounds = read_rounds(run / "privacy" / "secagg.jsonl")
    except ValueError as err:
        return fail, [*problems, str(err)]
    problems += round_problems(rounds, expected.cohort, expected.min_survivors)
    released = [r for r in rounds if r.get("released")]

    # what the claim derives from the plan and the rounds: recomputed, never taken from it
    def counted_mu(r: dict[str, Any]) -> float:  # the noise a round's survivors give
        return expected.mu_client * honest_shares(_count(r, "survivors"), expected.colluders)

    counted = [r | {"mu_honest": counted_mu(r)} for r in rounds]
    mine = interaction_summary(cfg, expected, counted)["secure_interaction"]
    for key in ("noise_std_on_sum", "independent_exact", "delta_accountant", "collusion_risk",
                "group", "adjacency", "mu_total_used"):  # fmt: skip
        a, b = claim.get(key), mine[key]
        same = (
            math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
            if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool)
            else a == b
        )
        if not same:
            problems.append(f"metrics.json secure_interaction.{key} is {a!r}, recomputed {b!r}")
    if len(released) > cfg.num_rounds:
        problems.append(
            f"secagg.jsonl records {len(released)} released rounds, more than num-rounds = "
            f"{cfg.num_rounds}: the noise and the collusion risk were planned for num-rounds"
        )
    for r in released:
        want = counted_mu(r)
        got = r.get("mu_honest")
        if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-9):
            problems.append(
                f"secagg.jsonl round {r.get('round')}: counted noise {got}, but mu_client x "
                f"honest survivors gives {want}"
            )
    mus = [counted_mu(r) for r in released]
    aggregated = sum(1 for r in doc.get("model", {}).get("rounds", []) if r.get("aggregated"))
    if len(released) < aggregated:
        problems.append(
            f"secagg.jsonl records {len(released)} released rounds but metrics.json has "
            f"{aggregated} aggregated rounds"
        )
    n = max(len(released), aggregated, _count(claim, "releases"))
    mu = min(mus, default=expected.mu_total)
    analytic, independent = _epsilons(expected, mu, n)
    eps = max(analytic, independent)
    claimed = claim.get("epsilon")
    if not isinstance(claimed, (int, float)) or claimed < eps * (1 - tolerance):
        problems.append(f"claimed per-interaction epsilon {claimed} is below the recomputed {eps}")
    for key in ("epsilon_max", "epsilon_median"):
        value = doc["privacy"].get(key)
        if not isinstance(value, (int, float)) or value < eps * (1 - tolerance):
            problems.append(f"metrics.json privacy.{key} = {value} is below the recomputed {eps}")
    if eps > cfg.epsilon * (1 + 1e-6):
        problems.append(f"per-interaction epsilon {eps:.6g} exceeds the budget {cfg.epsilon}")
    # the statement the audit prints is built from these: the recomputed summary (text and
    # figures), with the audit's release count and epsilon
    out = mine | {
        "verified": not problems,
        "epsilon_claimed": claimed,
        "epsilon": eps,
        "epsilon_analytic": analytic,
        "epsilon_independent": independent,
        "mu_total_used": mu,
        "releases": n,
        "rounds_logged": len(rounds),
    }
    return out, problems
