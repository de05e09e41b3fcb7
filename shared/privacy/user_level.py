"""User-level DP accounting (DP-FedAvg releases): calibration, the run's summary, its audit.

The mechanism lives in :mod:`fedrec.server.user_dp` (Flower's server-side fixed-clipping
wrapper); this module is the arithmetic both the server and ``fedrec audit`` use. Each
aggregated round is one release of the Gaussian mechanism with sensitivity ``user-clip / n``
and noise std ``z * user-clip / n``; ``releases`` of them compose, accounted with Opacus' RDP
at sample rate 1 (no amplification by client sampling is claimed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy.accounting import epsilon_spent, independent_epsilon, noise_for_budget
from fedrec.shared.privacy.audit import INDEPENDENT_TOLERANCE


def user_noise_multiplier(cfg: FedConfig) -> float:
    if cfg.user_noise_multiplier > 0:
        return cfg.user_noise_multiplier
    return noise_for_budget(
        epsilon=cfg.user_epsilon, delta=cfg.user_delta, sample_rate=1.0, steps=cfg.num_rounds
    )


def user_level_summary(
    cfg: FedConfig, *, noise_multiplier: float, releases: int, sampled: int, clients: int
) -> dict[str, Any]:
    """What ``metrics.json`` and the statement say about user-level DP."""
    hist = [(noise_multiplier, 1.0, releases)]
    q = min(1.0, sampled / max(1, clients))
    return {
        "enabled": True,
        "unit": "one client's whole data set ("
        + ("one user" if cfg.partition == "user" else "one silo of users")
        + ")",
        # the calibration covers one client's update replaced by zeros (sensitivity clip / n):
        # zero-out adjacency. Adding or removing a client is not claimed: n follows the number
        # of clients, so the divisor and the noise's scale can change with it (statement.py)
        "adjacency": "zero-out one client (its update replaced by zeros: the client present "
        "with no data)",
        "mechanism": "DP-FedAvg: server-side fixed clipping (Flower wrapper) + Gaussian noise on "
        "the clipped mean, before the server optimizer",
        "server_optimizer": server_optimizer_text(cfg),
        "clip": cfg.user_clip,
        "noise_multiplier": noise_multiplier,
        "noise_std": noise_multiplier * cfg.user_clip / sampled,
        "sampled_per_round": sampled,
        "clients": clients,
        "releases": releases,
        "delta": cfg.user_delta,
        "epsilon": epsilon_spent(history=hist, delta=cfg.user_delta) if releases else 0.0,
        "epsilon_budget": cfg.user_epsilon,
        # the same releases for replace-one (one client's update swapped for another's, the
        # number of clients unchanged): twice the sensitivity, i.e. noise multiplier z / 2
        "epsilon_replace_one": (
            epsilon_spent(history=[(noise_multiplier / 2, 1.0, releases)], delta=cfg.user_delta)
            if releases
            else 0.0
        ),
        "accounting": "Opacus RDP, no amplification by client sampling (claimed)",
        "epsilon_if_poisson_sampling": (
            epsilon_spent(history=[(noise_multiplier, q, releases)], delta=cfg.user_delta)
            if releases
            else 0.0
        ),
    }


def sample_size(cfg: FedConfig, num_clients: int) -> int:
    """The number of clients Flower's FedAvg samples per round (its own formula): the fixed
    denominator of the trusted server's mean, and so of its noise's std on that mean."""
    return max(int(num_clients * cfg.fraction_train), cfg.min_replies)


def server_optimizer_text(cfg: FedConfig) -> str:
    """How the server applies the released mean (post-processing), e.g. ``sgd, lr 2``."""
    decays = cfg.server_lr_final < 1 and cfg.num_rounds > 1  # as ServerOptimizer.lr_at
    return f"{cfg.server_opt}, lr {cfg.server_lr:g}" + (
        f" decayed to {cfg.server_lr_final:g}x by round {cfg.num_rounds} (cosine)" if decays else ""
    )


def audit_user_level(
    run: Path, cfg: FedConfig, tolerance: float
) -> tuple[dict[str, Any], list[str]]:
    """Recompute the run's user-level epsilon from its config and rounds; problems as text.

    Checks: the noise multiplier is the one the config calibrates (or fixes), the number of
    releases is at least the number of aggregated rounds in ``metrics.json``, the claimed epsilon
    and replace-one epsilon are not below their recomputations (Opacus' RDP and an independent
    accountant), and the recomputation is within the budget. It trusts the config and the
    round counts (written by the server, which this mode trusts to clip and add the noise).
    """
    if cfg.secure_agg:
        from fedrec.shared.privacy.distributed import audit_secure

        try:
            return audit_secure(run, cfg, tolerance)
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # a malformed record
            return {"enabled": True, "verified": False}, [
                f"{run / 'metrics.json'}: the secure-aggregation record is malformed ({err}): "
                "user-level DP unverified"
            ]
    path = run / "metrics.json"
    if not path.is_file():
        return {"enabled": True, "verified": False}, [f"{path} missing: user-level DP unverified"]
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"enabled": True, "verified": False}, [f"{path} is unreadable ({err})"]
    if not isinstance(doc, dict):
        doc = {}
    privacy = doc.get("privacy")
    claim = (privacy.get("user_level") if isinstance(privacy, dict) else None) or {}
    if not isinstance(claim, dict):
        claim = {}
    try:
        return _verify_trusted(path, doc, claim, cfg, tolerance)
    except (TypeError, ValueError, AttributeError) as err:  # a field of the wrong type
        return {"enabled": True, "verified": False}, [
            f"{path}: the user-level record is malformed ({err}): user-level DP unverified"
        ]


def _verify_trusted(
    path: Path, doc: dict[str, Any], claim: dict[str, Any], cfg: FedConfig, tolerance: float
) -> tuple[dict[str, Any], list[str]]:
    """:func:`audit_user_level` for a trusted-server run whose ``metrics.json`` parsed."""
    problems: list[str] = []
    if not claim.get("enabled"):
        return {"enabled": True, "verified": False}, [
            f"{path}: user-dp=true in config.json but no user-level DP record in metrics.json"
        ]
    z = user_noise_multiplier(cfg)
    aggregated = sum(1 for r in doc.get("model", {}).get("rounds", []) if r.get("aggregated"))
    releases = max(int(claim.get("releases", 0)), aggregated)
    eps = epsilon_spent(history=[(z, 1.0, releases)], delta=cfg.user_delta) if releases else 0.0
    if abs(float(claim.get("noise_multiplier", -1)) - z) > 1e-9 * max(1.0, z):
        problems.append(
            f"user-level noise multiplier {claim.get('noise_multiplier')} differs from the "
            f"config's calibration {z:.6g}"
        )
    if int(claim.get("releases", 0)) < aggregated:
        problems.append(
            f"metrics.json counts {claim.get('releases')} user-level releases but {aggregated} "
            "rounds were aggregated"
        )
    if float(claim.get("epsilon", 0.0)) < eps * (1 - tolerance):
        problems.append(
            f"claimed user-level epsilon {claim.get('epsilon')} is below the recomputed {eps:.6g}"
        )
    independent, name = independent_epsilon(
        history=[(z, 1.0, releases)], delta=cfg.user_delta, accountant="rdp"
    )
    if float(claim.get("epsilon", 0.0)) < independent * (1 - INDEPENDENT_TOLERANCE):
        problems.append(
            f"claimed user-level epsilon {claim.get('epsilon')} is below the independent "
            f"recomputation ({name}) {independent:.6g}"
        )
    if eps > cfg.user_epsilon * (1 + 1e-9):
        problems.append(f"user-level epsilon {eps:.6g} exceeds the budget {cfg.user_epsilon}")
    # replace-one: the same releases at half the noise multiplier (twice the sensitivity),
    # by both accountants
    half = [(z / 2, 1.0, releases)]
    replace = epsilon_spent(history=half, delta=cfg.user_delta) if releases else 0.0
    replace_indep = (
        independent_epsilon(history=half, delta=cfg.user_delta, accountant="rdp")[0]
        if releases
        else 0.0
    )
    claimed_replace = claim.get("epsilon_replace_one")
    # a run written before the replace-one figure existed states none: nothing to check (the
    # statement the audit prints gives the recomputed one)
    floor = max(replace * (1 - tolerance), replace_indep * (1 - INDEPENDENT_TOLERANCE))
    if isinstance(claimed_replace, (int, float)) and claimed_replace < floor:
        problems.append(
            f"claimed replace-one epsilon {claimed_replace} is below the recomputed "
            f"{replace:.6g} (independent: {replace_indep:.6g})"
        )
    # The sample size n (the mean's fixed denominator, and so the noise's std on the mean)
    # from what the server logged per round (`sent`: the clients it asked), which must be the
    # same every aggregated round and equal what the config gives for the logged client count;
    # never from the claim alone.
    rounds = [r for r in doc.get("model", {}).get("rounds", []) if r.get("aggregated")]
    sent = sorted({int(r.get("sent", 0)) for r in rounds})
    clients = claim.get("clients")
    if not isinstance(clients, int) or clients <= 0:
        problems.append(f"{path}: the user-level record names no client count ({clients!r})")
        clients = 0
    sampled = sample_size(cfg, clients) if clients else 0
    if len(sent) > 1 or (sent and sent[0] != sampled):
        problems.append(
            f"the server asked {sent} clients per aggregated round; fraction-train="
            f"{cfg.fraction_train} and min-replies={cfg.min_replies} give {sampled} for "
            f"{clients} clients"
        )
    # every figure the statement prints, rebuilt from the config and these counts
    fresh = user_level_summary(
        cfg, noise_multiplier=z, releases=releases, sampled=max(1, sampled), clients=clients
    )
    for key in ("sampled_per_round", "noise_std", "clip", "delta", "epsilon_budget", "unit"):
        said, true = claim.get(key), fresh[key]
        same = (
            said == true
            if isinstance(true, (str, int)) and not isinstance(true, float)
            else isinstance(said, (int, float)) and abs(float(said) - true) <= 1e-9 * abs(true)
        )
        if not same:
            problems.append(f"claimed {key} {said!r} differs from the recomputed {true!r}")
    # the statement the audit prints is built from these recomputed values, not the claim's
    out = fresh | {
        "verified": not problems,
        "epsilon_claimed": claim.get("epsilon"),
        "epsilon_replace_one_claimed": claimed_replace,
        "noise_std_claimed": claim.get("noise_std"),
        "epsilon": eps,
        "epsilon_replace_one": replace,
        "epsilon_recomputed": eps,
        "epsilon_independent": independent,
        "epsilon_replace_one_recomputed": replace,
        "epsilon_replace_one_independent": replace_indep,
        "independent": name,
        "releases_recomputed": releases,
    }
    return out, problems
