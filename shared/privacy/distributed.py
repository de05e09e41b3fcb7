"""Distributed user-level DP with secure aggregation: the run's plan, summary and audit.

The arithmetic both the server (:mod:`fedrec.server.secure_agg`, which runs the rounds) and
``fedrec audit`` use. A run's plan fixes the cohort size, the SecAgg+ graph, the integer encoding
and each client's Skellam noise share; each released round's sum carries ``mu_client`` times the
number of honest survivors' shares; the run's epsilon composes the releases, each at the smallest
released round's noise (:mod:`fedrec.shared.privacy.skellam` for the mechanism and its two
accountants).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.secagg import default_threshold
from fedrec.shared.privacy import skellam


def neighbours_for(cohort: int, configured: int) -> int:
    """SecAgg+'s neighbour count k (even): the configured one, else about 3 log2(cohort)
    (Bell et al. 2020 use O(log n)); the complete graph when that covers the cohort."""
    k = configured or 2 * math.ceil(1.5 * math.log2(max(2, cohort)))
    return min(k, cohort - 1 if (cohort - 1) % 2 == 0 else cohort - 2) if cohort > 2 else 1


@dataclass(frozen=True)
class SecurePlan:
    """Everything fixed for the run: cohort size, graph, noise and encoding."""

    cohort: int
    neighbours: int
    threshold: int
    min_survivors: int
    colluders: int
    encoding: skellam.SkellamConfig
    mu_total: float  # the claimed noise: what the worst accepted round still carries
    mu_client: float  # each client's noise share

    @property
    def honest_min(self) -> int:
        return honest_shares(self.min_survivors, self.colluders)

    def as_dict(self) -> dict[str, Any]:
        e = self.encoding
        return {
            "cohort": self.cohort,
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "min_survivors": self.min_survivors,
            "colluders": self.colluders,
            "honest_shares_min": self.honest_min,
            "clip": e.clip,
            "scale": e.scale,
            "dim": e.dim,
            "bits": e.bits,
            "beta": e.beta,
            "l2_sensitivity": skellam.l2_bound(e),
            "l1_sensitivity": skellam.l1_bound(e),
            "mu_client": self.mu_client,
            "mu_total_claimed": self.mu_total,
        }


# the integer L2 norm a clipped update is scaled to (see plan)
TARGET_NORM = 1024.0


def honest_shares(survivors: int, colluders: int) -> int:
    """Noise shares the claim counts in a sum of ``survivors`` inputs: not the colluders'
    (they can subtract theirs), not the protected user's own."""
    return survivors - colluders - 1


def plan(cfg: FedConfig, cohort: int, dim: int) -> SecurePlan:
    """Calibrate the run: the cohort's graph, the integer encoding and each client's noise."""
    if cohort < 3:
        raise ValueError(
            f"secure-agg=true needs a cohort of at least 3 clients per round, got {cohort}: "
            "raise fraction-train or min-replies"
        )
    k = neighbours_for(cohort, cfg.secagg_neighbours)
    t = default_threshold(k + 1)
    min_survivors = max(t, math.ceil((1 - cfg.secagg_dropout) * cohort))
    colluders = math.floor(cfg.secagg_colluders * cohort)
    honest = honest_shares(min_survivors, colluders)
    if honest < 1:
        raise ValueError(
            f"secure-agg: a cohort of {cohort} with secagg-dropout={cfg.secagg_dropout} and "
            f"secagg-colluders={cfg.secagg_colluders} leaves {honest} honest noise shares; "
            "raise fraction-train or lower secagg-dropout / secagg-colluders"
        )

    def calibrated(enc: skellam.SkellamConfig) -> float:
        l1, l2 = skellam.l1_bound(enc), skellam.l2_bound(enc)
        if cfg.user_noise_multiplier > 0:  # fixed: noise std on the sum = z * l2
            return float((cfg.user_noise_multiplier * l2) ** 2 / 2)
        return skellam.calibrate_mu(cfg.user_epsilon, cfg.user_delta, cfg.num_rounds, l1, l2)

    def encoding(scale: float) -> skellam.SkellamConfig:
        return skellam.SkellamConfig(clip=cfg.user_clip, scale=scale, dim=dim, bits=cfg.secagg_bits)

    # the integer grid: an integer norm of about TARGET_NORM (rounding then inflates the
    # sensitivity by well under 1 %, and the noise stays where the numerical accountant
    # evaluates the Skellam pmf exactly), never coarser than 1 % inflation needs and never
    # so fine that the cohort's sum plus the noise (every client's share) could wrap around
    target = max(TARGET_NORM, 8 * math.sqrt(dim)) / cfg.user_clip
    first = encoding(target)
    hint = math.sqrt(2 * calibrated(first) * cohort / honest) / skellam.l2_bound(first)
    enc = encoding(min(target, skellam.choose_scale(
        cfg.user_clip, dim, cohort, cfg.secagg_bits, noise_multiplier_hint=hint
    )))  # fmt: skip
    mu_total = calibrated(enc)
    return SecurePlan(
        cohort=cohort,
        neighbours=k,
        threshold=t,
        min_survivors=min_survivors,
        colluders=colluders,
        encoding=enc,
        mu_total=mu_total,
        mu_client=skellam.noise_shares(mu_total, honest),
    )


def secure_summary(
    cfg: FedConfig, p: SecurePlan, rounds: list[dict[str, Any]], clients: int
) -> dict[str, Any]:
    """metrics.json's ``privacy.user_level`` for a secure-aggregation run."""
    released = [r for r in rounds if r.get("released")]
    mu = min((r["mu_honest"] for r in released), default=p.mu_total)
    l1, l2 = skellam.l1_bound(p.encoding), skellam.l2_bound(p.encoding)
    n = len(released)
    eps = skellam.skellam_epsilon(mu, l1, l2, n, cfg.user_delta) if n else 0.0
    indep = skellam.skellam_epsilon_independent(mu, l2, n, cfg.user_delta) if n else 0.0
    return {
        "enabled": True,
        "unit": "one client's whole data set ("
        + ("one user" if cfg.partition == "user" else "one silo of users")
        + ")",
        "adjacency": "zero-out one client (its update replaced by zeros: the client present "
        "with no data)",
        "mechanism": "distributed Skellam noise (Agarwal, Kairouz, Liu 2021) in a SecAgg+ sum "
        "(Bell et al. 2020); client-side clipping and conditional randomized rounding",
        "trust": (
            "honest-but-curious server; at most "
            f"{p.colluders} of each round's {p.cohort} clients collude with it (their noise "
            "shares are not counted); at most "
            f"{p.cohort - p.min_survivors} drop out (a round with fewer survivors is not "
            "released); clients add the noise the server asks for"
        ),
        "clip": cfg.user_clip,
        "secure_agg": p.as_dict(),
        "mu_total_used": mu,
        "noise_std_on_sum": math.sqrt(2 * mu) / p.encoding.scale,
        "noise_std_on_mean": math.sqrt(2 * mu) / p.encoding.scale / p.cohort,
        "sampled_per_round": p.cohort,
        "clients": clients,
        "releases": n,
        "delta": cfg.user_delta,
        "epsilon": max(eps, indep),
        "epsilon_analytic": eps,
        "epsilon_independent": indep,
        "epsilon_budget": cfg.user_epsilon,
        "accounting": "Skellam RDP bound (Agarwal et al. 2021) composed over releases, each at "
        "the smallest released round's honest noise; no amplification by client sampling; the "
        "claim is the larger of the analytic bound and a numerical Renyi-divergence computation",
    }


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """``RUN/privacy/secagg.jsonl``: one record per secure round (released or not)."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
            raise ValueError(f"{path}:{n}: not a secure-aggregation round record")
        out.append(rec)
    return out


def audit_secure(run: Path, cfg: FedConfig, tolerance: float) -> tuple[dict[str, Any], list[str]]:
    """Recompute a secure-aggregation run's user-level epsilon from its config, the plan it
    claims and ``privacy/secagg.jsonl``; problems as text.

    Checks: the plan's noise share is what the config calibrates for the plan's cohort and
    dimension; each released round's counted noise is ``mu_client`` times its honest survivors
    (survivors - colluders - 1), and no released round had fewer survivors than the plan's
    minimum; the number of releases covers every aggregated round in ``metrics.json``; the
    claimed epsilon is not below the analytic recomputation nor below the numerical one; and
    it is within the budget.
    """
    path = run / "metrics.json"
    if not path.is_file():
        return {"enabled": True, "verified": False}, [f"{path} missing: user-level DP unverified"]
    doc = json.loads(path.read_text())
    claim = (doc.get("privacy") or {}).get("user_level") or {}
    if not claim.get("enabled") or not isinstance(claim.get("secure_agg"), dict):
        return {"enabled": True, "verified": False}, [
            f"{path}: secure-agg=true in config.json but no secure-aggregation record in "
            "metrics.json"
        ]
    sa = claim["secure_agg"]
    problems: list[str] = []
    try:
        expected = plan(cfg, int(sa["cohort"]), int(sa["dim"]))
    except (KeyError, TypeError, ValueError) as err:
        return dict(claim) | {"verified": False}, [f"cannot recompute the plan: {err}"]
    for key, mine in expected.as_dict().items():
        theirs = sa.get(key)
        if not isinstance(theirs, (int, float)) or not math.isclose(
            float(theirs), float(mine), rel_tol=1e-9, abs_tol=1e-12
        ):
            problems.append(f"secure-aggregation plan: {key} is {theirs}, the config gives {mine}")
    try:
        rounds = read_rounds(run / "privacy" / "secagg.jsonl")
    except ValueError as err:
        return dict(claim) | {"verified": False}, [*problems, str(err)]
    released = [r for r in rounds if r.get("released")]
    for r in released:
        surv = int(r.get("survivors", 0))
        if surv < expected.min_survivors:
            problems.append(
                f"round {r['round']} was released with {surv} survivors, below the plan's "
                f"minimum {expected.min_survivors}"
            )
    mus = [expected.mu_client * honest_shares(int(r.get("survivors", 0)), expected.colluders)
           for r in released]  # fmt: skip
    aggregated = sum(1 for r in doc.get("model", {}).get("rounds", []) if r.get("aggregated"))
    n = max(len(released), aggregated, int(claim.get("releases", 0)))
    if len(released) < aggregated:
        problems.append(
            f"secagg.jsonl records {len(released)} released rounds but metrics.json has "
            f"{aggregated} aggregated rounds"
        )
    mu = min(mus, default=expected.mu_total)
    l1, l2 = skellam.l1_bound(expected.encoding), skellam.l2_bound(expected.encoding)
    eps = skellam.skellam_epsilon(mu, l1, l2, n, cfg.user_delta) if n and mu > 0 else 0.0
    if n and mu <= 0:
        eps = math.inf
    indep = skellam.skellam_epsilon_independent(mu, l2, n, cfg.user_delta) if n and mu > 0 else eps
    claimed = float(claim.get("epsilon", 0.0))
    if claimed < eps * (1 - tolerance):
        problems.append(f"claimed user-level epsilon {claimed} is below the recomputed {eps:.6g}")
    if claimed < indep * (1 - tolerance):
        problems.append(
            f"claimed user-level epsilon {claimed} is below the numerical recomputation {indep:.6g}"
        )
    if max(eps, indep) > cfg.user_epsilon * (1 + 1e-6):
        problems.append(
            f"user-level epsilon {max(eps, indep):.6g} exceeds the budget {cfg.user_epsilon}"
        )
    out = dict(claim) | {
        "verified": not problems,
        "epsilon_recomputed": eps,
        "epsilon_independent_recomputed": indep,
        "releases_recomputed": n,
        "rounds_logged": len(rounds),
    }
    return out, problems
