"""Distributed user-level DP with secure aggregation: the run's plan, summary and audit.

The arithmetic both the server (:mod:`fedrec.server.secure_agg`, which runs the rounds) and
``fedrec audit`` use. A run's plan fixes the cohort size, the SecAgg+ graph, the integer encoding
and each client's Skellam noise share; each released round's sum carries ``mu_client`` times the
number of honest survivors' shares; the run's epsilon composes the releases, each at the smallest
released round's noise (:mod:`fedrec.shared.privacy.skellam` for the mechanism and its two
accountants).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.secagg import default_threshold
from fedrec.shared.privacy import skellam
from fedrec.shared.privacy.user_level import sample_size, server_optimizer_text


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
    # the chance, over the run, that the colluders hold a threshold of some node's shares
    # (SecAgg+'s random graph; see collusion_risk); taken out of user-delta: the accountant
    # works at delta = user-delta - collusion_risk
    collusion_risk: float
    delta: float
    # the population the colluders are counted in (None: runs before 2026-12-03 counted
    # secagg-colluders per cohort)
    clients: int | None = None

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
            "collusion_risk": self.collusion_risk,
            "delta_accountant": self.delta,
        } | ({} if self.clients is None else {
            "colluders_scope": "population", "population": self.clients
        })  # fmt: skip


# the integer L2 norm a clipped update is scaled to (see plan)
TARGET_NORM = 1024.0


def honest_shares(survivors: int, colluders: int) -> int:
    """Noise shares the claim counts in a sum of ``survivors`` inputs: not the colluders'
    (they can subtract theirs), not the protected user's own."""
    return survivors - colluders - 1


def collusion_risk(cohort: int, k: int, threshold: int, colluders: int, rounds: int) -> float:
    """An upper bound on the chance that, in some round, the colluders hold ``threshold`` or
    more of some honest node's shares (they could then rebuild its masking key and, with the
    self-mask seed the server legitimately rebuilds, its noisy input alone).

    SecAgg+ draws each round's graph at random after the colluders are fixed: a node's ``k``
    neighbours are a uniform draw from the other ``cohort - 1`` nodes, so the number of
    colluders among them is hypergeometric; a union bound over nodes and rounds. (The ring
    makes neighbourhoods dependent but each one is still such a draw; the union bound does not
    need independence.) With the complete graph it is 1 as soon as ``colluders >= threshold``.
    """
    from scipy.stats import hypergeom

    if colluders <= 0:
        return 0.0
    k = min(k, cohort - 1)
    per_node = float(hypergeom.sf(threshold - 1, cohort - 1, colluders, k))
    return min(1.0, rounds * cohort * per_node)


# the largest part of user-delta the collusion risk may take
RISK_SHARE = 0.01


def check_cohort(cfg: FedConfig, clients: int) -> None:
    """Before a run starts: the cohort that ``clients`` connected clients give is large enough
    for secure aggregation (at least 3, at least one counted noise share, a collusion risk
    within 1 % of delta). Raises ValueError saying what to change."""
    delta = cfg.delta if cfg.dp_noise == "secure" else None  # per interaction: its delta
    _cohort_parameters(cfg, sample_size(cfg, clients), clients, delta=delta)


def cohort_colluders(cfg: FedConfig, cohort: int, clients: int | None) -> int:
    """The colluders the plan subtracts from a cohort: ``secagg-colluders`` of the whole
    population of ``clients``, all of them assumed to be in the cohort (the worst case; the
    server does not have to bias its sampling for it to happen by chance), at most the
    cohort. ``clients=None`` is the rule of runs made before 2026-12-03: the fraction of each
    cohort, an assumption about every round's draw rather than about the population."""
    if clients is None:
        return math.ceil(cfg.secagg_colluders * cohort)
    return min(cohort, population_colluders(clients, cfg.secagg_colluders))


def _cohort_parameters(
    cfg: FedConfig, cohort: int, clients: int | None, delta: float | None = None
) -> tuple[int, int, int, int, int, float]:
    """``(k, threshold, min_survivors, colluders, honest, collusion_risk)`` for a cohort drawn
    from ``clients`` (None: the pre-2026-12-03 per-cohort colluder rule, for audits). The
    collusion risk may take at most :data:`RISK_SHARE` of ``delta`` (default ``user-delta``;
    a per-interaction guarantee passes ``delta``).

    With ``secagg-neighbours`` = 0 the neighbour count starts at :func:`neighbours_for`'s
    3 log2(cohort) and grows (by 2) until the collusion risk is within its share of delta:
    more colluders need larger groups (Bell et al. 2020 size k by the corrupted fraction)."""
    # a larger cohort: more of the clients per round, or (every client already in it) more
    grow = "raise fraction-train" if cfg.fraction_train < 1 else "add clients (silos)"
    if cohort < 3:
        raise ValueError(
            f"secure-agg=true needs a cohort of at least 3 clients per round, got {cohort}: "
            + ("raise fraction-train or min-replies" if cfg.fraction_train < 1 else grow)
        )
    colluders = cohort_colluders(cfg, cohort, clients)
    min_survivors = max(2, math.ceil((1 - cfg.secagg_dropout) * cohort))
    whole = f"{clients} clients" if clients is not None else "the cohort"
    if clients is not None and population_colluders(clients, cfg.secagg_colluders) > colluders:
        whole += (
            f": {population_colluders(clients, cfg.secagg_colluders)} colluders, as many as the "
            "cohort holds"
        )
    k = neighbours_for(cohort, cfg.secagg_neighbours)
    t = default_threshold(k + 1)
    risk = collusion_risk(cohort, k, t, colluders, cfg.num_rounds)
    delta_name, delta = ("user-delta", cfg.user_delta) if delta is None else ("delta", delta)
    budget = RISK_SHARE * delta
    while risk > budget and not cfg.secagg_neighbours and k < neighbours_for(cohort, cohort):
        k = min(k + 2, neighbours_for(cohort, cohort))
        t = default_threshold(k + 1)
        risk = collusion_risk(cohort, k, t, colluders, cfg.num_rounds)
    min_survivors = max(t, min_survivors)
    honest = honest_shares(min_survivors, colluders)
    if honest < 1:
        raise ValueError(
            f"secure-agg: a cohort of {cohort} with secagg-dropout={cfg.secagg_dropout} and "
            f"secagg-colluders={cfg.secagg_colluders} of {whole} ({colluders} colluders "
            f"counted, all possibly in one cohort) leaves {honest} honest noise shares; {grow} "
            "or lower secagg-dropout / secagg-colluders"
        )
    if risk > budget:
        raise ValueError(
            f"secure-agg: with {colluders} colluders ({cfg.secagg_colluders} of {whole}) in a "
            f"cohort of {cohort}, {k} neighbours and threshold {t}, the chance that colluders "
            f"hold a threshold of some node's shares over {cfg.num_rounds} rounds is up to "
            f"{risk:.3g}, above {RISK_SHARE:g} x {delta_name}={delta}: "
            + ("raise secagg-neighbours (0 = automatic), " if cfg.secagg_neighbours else "")
            + f"{grow} or lower secagg-colluders"
        )
    return k, t, min_survivors, colluders, honest, risk


@functools.lru_cache(maxsize=8)
def plan(cfg: FedConfig, cohort: int, dim: int, clients: int | None) -> SecurePlan:
    """Calibrate the run: the cohort's graph, the integer encoding and each client's noise,
    for a cohort of ``cohort`` drawn from ``clients`` connected clients (None: the rule of runs
    made before 2026-12-03, see :func:`cohort_colluders`; only audits of such runs use it).

    Deterministic in ``(cfg, cohort, dim, clients)``: the server computes it once, each client
    again to check what the server asks of it (:func:`check_request`); cached per process."""
    k, t, min_survivors, colluders, honest, risk = _cohort_parameters(cfg, cohort, clients)
    delta = cfg.user_delta - risk

    def calibrated(enc: skellam.SkellamConfig) -> float:
        l1, l2 = skellam.l1_bound(enc), skellam.l2_bound(enc)
        if cfg.user_noise_multiplier > 0:  # fixed: noise std on the sum = z * l2
            return float((cfg.user_noise_multiplier * l2) ** 2 / 2)
        # the statement claims max(analytic, numerical): both must meet the budget
        return skellam.calibrate_mu_claimed(cfg.user_epsilon, delta, cfg.num_rounds, l1, l2)

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
        collusion_risk=risk,
        delta=delta,
        clients=clients,
    )


def check_request(cfg: FedConfig, fields: dict[str, Any], threshold: int) -> SecurePlan:
    """A client's check of a masked-input request against its own recomputation of the plan
    (from the run config, the cohort size and the population the server states): the server
    cannot ask it for less noise, a coarser or different encoding, or a lower Shamir threshold
    than the calibration gives. The stated population must give the stated cohort under the
    run's sampling (``fraction-train``, ``min-replies``), which pins it to within 1 /
    fraction-train clients (so a server that understated it could lower the colluder count
    ceil(secagg-colluders x clients) by up to ceil(secagg-colluders / fraction-train): 1 at
    the defaults), and when ``min-replies`` sets the cohort not at all; an honest-but-curious
    server states it truly, and that is the trust model. Raises ValueError saying what
    differs; returns the client's own plan."""
    cohort, clients = fields.get("cohort"), fields.get("clients")
    for key, v in (("cohort", cohort), ("clients", clients)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"secure aggregation: the server's request has {key}={v!r}, not a positive whole "
                "number; refused"
            )
    assert isinstance(cohort, int) and isinstance(clients, int)
    if clients < cohort:
        raise ValueError(
            f"secure aggregation: the server states a cohort of {cohort} drawn from {clients} "
            "clients, fewer than the cohort; refused"
        )
    if sample_size(cfg, clients) != cohort:
        raise ValueError(
            f"secure aggregation: the server states a cohort of {cohort} drawn from {clients} "
            f"clients, but fraction-train={cfg.fraction_train} and min-replies="
            f"{cfg.min_replies} give {sample_size(cfg, clients)}; refused"
        )
    p = plan(cfg, cohort, int(fields["dim"]), clients)
    e = p.encoding
    wants = {
        "clip": e.clip, "scale": e.scale, "bits": e.bits, "beta": e.beta, "mu": p.mu_client,
        "threshold": p.threshold,
    }  # fmt: skip
    asked = {k: fields.get(k) for k in wants} | {"threshold": threshold}
    for key, mine in wants.items():
        theirs = asked[key]
        if not isinstance(theirs, (int, float)) or not math.isclose(
            float(theirs), float(mine), rel_tol=1e-9
        ):
            raise ValueError(
                f"secure aggregation: the server asks {key}={theirs}, but this client's "
                f"calibration for a cohort of {p.cohort} of {clients} clients gives {mine}; "
                "refused"
            )
    return p


def population_colluders(clients: int, fraction: float) -> int:
    """``secagg-colluders``' fraction applied to the whole population, rounded up."""
    return min(clients, math.ceil(fraction * clients))


def secure_summary(
    cfg: FedConfig, p: SecurePlan, rounds: list[dict[str, Any]], clients: int
) -> dict[str, Any]:
    """metrics.json's ``privacy.user_level`` for a secure-aggregation run."""
    released = [r for r in rounds if r.get("released")]
    mu = min((r["mu_honest"] for r in released), default=p.mu_total)
    l1, l2 = skellam.l1_bound(p.encoding), skellam.l2_bound(p.encoding)
    n = len(released)
    eps = skellam.skellam_epsilon(mu, l1, l2, n, p.delta) if n else 0.0
    indep = skellam.skellam_epsilon_independent(mu, l2, n, p.delta) if n else 0.0
    _ratio, exact = skellam.independent_rdp_ratio(mu, l2)
    replace = _replace_one(mu, l1, l2, n, p.delta)
    if p.clients != clients:
        raise ValueError(
            f"secure_summary: the plan counts colluders among {p.clients} clients, the run had "
            f"{clients}"
        )
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
            f"{population_colluders(clients, cfg.secagg_colluders)} of all {clients} clients "
            f"(secagg-colluders = {cfg.secagg_colluders:g} of the population) collude with it, "
            f"and the claim assumes all of them are in every round's cohort of {p.cohort} "
            f"({p.colluders} noise shares not counted, whichever clients the server samples); "
            f"at most {p.cohort - p.min_survivors} drop out (a round with fewer survivors is not "
            "released); the clients not counted as colluders add their noise share"
        ),
        "clip": cfg.user_clip,
        "server_optimizer": server_optimizer_text(cfg),
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
        # False: the numerical accountant fell back to the Gaussian limit (not independent)
        "independent_exact": bool(exact),
        "epsilon_replace_one": replace,
        "delta_accountant": p.delta,
        "collusion_risk": p.collusion_risk,
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
    claimed epsilon is not below the analytic recomputation nor below the numerical one, the
    claimed replace-one epsilon not below its recomputation; and it is within the budget.

    What it trusts: the survivor counts in ``secagg.jsonl`` and the config (both written by
    the server), the plan's sensitivity bounds and survivor arithmetic (shared with the
    claim: only the Renyi-divergence curve is computed twice), and that the clients clipped
    and added their noise shares (nothing the server's files can show).
    """
    path = run / "metrics.json"
    if not path.is_file():
        return {"enabled": True, "verified": False}, [f"{path} missing: user-level DP unverified"]
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"enabled": True, "verified": False}, [f"{path} is unreadable ({err})"]
    privacy = doc.get("privacy") if isinstance(doc, dict) else None
    claim = (privacy.get("user_level") if isinstance(privacy, dict) else None) or {}
    if not isinstance(claim, dict):
        claim = {}
    if not claim.get("enabled") or not isinstance(claim.get("secure_agg"), dict):
        return {"enabled": True, "verified": False}, [
            f"{path}: secure-agg=true in config.json but no secure-aggregation record in "
            "metrics.json"
        ]
    sa = claim["secure_agg"]
    problems: list[str] = []
    # runs made before 2026-12-03 counted the colluders per cohort (no colluders_scope): they
    # are checked against that rule, and the audit adds what the population rule would give
    legacy = sa.get("colluders_scope") != "population"
    try:
        population = None if legacy else int(sa["population"])
        expected = plan(cfg, int(sa["cohort"]), int(sa["dim"]), population)
    except (KeyError, TypeError, ValueError) as err:
        return dict(claim) | {"verified": False}, [
            f"{path}: cannot recompute the secure-aggregation plan from its record ({err!r})"
        ]
    if not legacy and claim.get("clients") != population:
        problems.append(
            f"secure-aggregation plan: colluders counted among {population} clients, but the "
            f"run had {claim.get('clients')}"
        )
    for key, mine in expected.as_dict().items():
        theirs = sa.get(key)
        if isinstance(mine, str):
            if theirs != mine:
                problems.append(f"secure-aggregation plan: {key} is {theirs!r}, not {mine!r}")
            continue
        if not isinstance(theirs, (int, float)) or not math.isclose(
            float(theirs), float(mine), rel_tol=1e-9, abs_tol=1e-12
        ):
            problems.append(f"secure-aggregation plan: {key} is {theirs}, the config gives {mine}")
    try:
        rounds = read_rounds(run / "privacy" / "secagg.jsonl")
    except ValueError as err:
        return dict(claim) | {"verified": False}, [*problems, str(err)]
    released = [r for r in rounds if r.get("released")]
    # the records must agree with each other and with the config: the survivor counts set
    # the noise counted, so an impossible count (more survivors than clients sent a masked
    # input, more than the cohort) must not pass for more noise
    clients = claim.get("clients")
    if not isinstance(clients, int) or isinstance(clients, bool) or clients <= 0:
        problems.append(f"{path}: the secure-aggregation record names no client count")
    elif sample_size(cfg, clients) != expected.cohort:
        problems.append(
            f"secure-aggregation plan: cohort {expected.cohort}, but fraction-train="
            f"{cfg.fraction_train} and min-replies={cfg.min_replies} give "
            f"{sample_size(cfg, clients)} of {clients} clients"
        )
    problems += round_problems(rounds, expected.cohort, expected.min_survivors)
    mus = [expected.mu_client * honest_shares(_count(r, "survivors"), expected.colluders)
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
    extra: dict[str, Any] = {}
    eps = skellam.skellam_epsilon(mu, l1, l2, n, expected.delta) if n and mu > 0 else 0.0
    if n and mu <= 0:
        eps = math.inf
    indep = skellam.skellam_epsilon_independent(mu, l2, n, expected.delta) if n and mu > 0 else eps
    replace = _replace_one(mu, l1, l2, n, expected.delta)
    claimed = float(claim.get("epsilon", 0.0))
    claimed_replace = claim.get("epsilon_replace_one")
    # a run written before the replace-one figure existed states none: nothing to check (the
    # statement the audit prints gives the recomputed one)
    if isinstance(claimed_replace, (int, float)) and claimed_replace < replace * (1 - tolerance):
        problems.append(
            f"claimed replace-one epsilon {claimed_replace} is below the recomputed {replace:.6g}"
        )
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
    if legacy and isinstance(clients, int) and not isinstance(clients, bool) and clients > 0:
        (
            extra["epsilon_population_colluders"],
            extra["collusion_risk_population"],
        ) = _population_epsilon(cfg, expected, released, clients, n)
        extra["colluders_population"] = cohort_colluders(cfg, expected.cohort, clients)
    # the statement the audit prints is built from these recomputed values, not the claim's
    out = (
        dict(claim)
        | extra
        | {
            "verified": not problems,
            "server_optimizer": server_optimizer_text(cfg),  # from the config, as the claim's
            "epsilon_claimed": claimed,
            "epsilon_replace_one_claimed": claimed_replace,
            "epsilon": max(eps, indep),
            "epsilon_analytic": eps,
            "epsilon_independent": indep,
            "epsilon_replace_one": replace,
            "mu_total_used": mu,
            "releases": n,
            "epsilon_recomputed": max(eps, indep),
            "epsilon_independent_recomputed": indep,
            "epsilon_replace_one_recomputed": replace,
            "releases_recomputed": n,
            "rounds_logged": len(rounds),
        }
    )
    return out, problems


def round_problems(rounds: list[dict[str, Any]], cohort: int, min_survivors: int) -> list[str]:
    """What is wrong with ``secagg.jsonl``'s round records against a plan's ``cohort`` and
    ``min_survivors``: counts that are not whole numbers or are inconsistent (the survivor
    counts set the noise counted, so an impossible count must not pass for more noise), and a
    round released with fewer survivors than the minimum."""
    problems: list[str] = []
    released = [r for r in rounds if r.get("released")]
    for r in rounds:
        counts = [r.get("cohort", -1), r.get("masked", 0), r.get("survivors", 0)]
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            problems.append(
                f"secagg.jsonl round {r.get('round')}: the counts {counts} (cohort, masked "
                "inputs, survivors) are not whole numbers"
            )
            continue
        have, masked, surv = counts
        if have != cohort or not 0 <= surv <= masked <= have:
            problems.append(
                f"secagg.jsonl round {r.get('round')}: cohort {r.get('cohort')}, masked inputs "
                f"{r.get('masked')}, survivors {r.get('survivors')} are inconsistent (the plan's "
                f"cohort is {cohort}; survivors <= masked inputs <= cohort)"
            )
    for r in released:
        surv = _count(r, "survivors")
        if surv < min_survivors:
            problems.append(
                f"round {r['round']} was released with {surv} survivors, below the plan's "
                f"minimum {min_survivors}"
            )
    return problems


def _count(r: dict[str, Any], key: str) -> int:
    """A round record's count, 0 when it is not a whole number (flagged as a problem where the
    counts are checked; 0 survivors counts the least noise, the conservative reading)."""
    v = r.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _population_epsilon(
    cfg: FedConfig, p: SecurePlan, released: list[dict[str, Any]], clients: int, releases: int
) -> tuple[float, float]:
    """For a run made under the per-cohort colluder rule: its epsilon had ``secagg-colluders``
    of all ``clients`` colluded, all in the cohort (the rule of :func:`cohort_colluders`):
    fewer noise shares counted per round, and more of delta to the collusion risk of its graph.
    Returns (epsilon, that risk); epsilon is infinite when no noise share or no delta is left."""
    colluders = cohort_colluders(cfg, p.cohort, clients)
    risk = collusion_risk(p.cohort, p.neighbours, p.threshold, colluders, cfg.num_rounds)
    counted = [honest_shares(_count(r, "survivors"), colluders) for r in released]
    honest = min(counted, default=honest_shares(p.min_survivors, colluders))
    delta = cfg.user_delta - risk
    if not releases:
        return 0.0, risk
    if honest < 1 or delta <= 0:
        return math.inf, risk
    mu = p.mu_client * honest
    l1, l2 = skellam.l1_bound(p.encoding), skellam.l2_bound(p.encoding)
    eps = max(
        skellam.skellam_epsilon(mu, l1, l2, releases, delta),
        skellam.skellam_epsilon_independent(mu, l2, releases, delta),
    )
    return eps, risk


def _replace_one(mu: float, l1: float, l2: float, releases: int, delta: float) -> float:
    """Replace-one (one client's update swapped for another's): the same releases at twice the
    sensitivities (triangle inequality), the larger of the analytic bound and the numerical
    computation, as the zero-out claim."""
    if not releases:
        return 0.0
    if mu <= 0:
        return math.inf
    return max(
        skellam.skellam_epsilon(mu, 2 * l1, 2 * l2, releases, delta),
        skellam.skellam_epsilon_independent(mu, 2 * l2, releases, delta),
    )
