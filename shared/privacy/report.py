"""``fedrec audit RUN``: the privacy statement re-derived from the ledger, the verification
findings, the budget view and ``RUN/privacy/epsilon.png``.

Nothing here trusts the epsilons the clients or the server reported: every epsilon of the
statement printed (per-interaction, user-level zero-out and replace-one) is recomputed, by two
accountants, and the run's own ``metrics.json`` claims are checked against the recomputation.
What it does trust is what no accountant can check: the run's config, the per-round counts the
server logged (replies, survivors of a secure round), and that the mechanism ran as the code
says (clients clipped and added their noise; the ledger lines are the clients' own).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.privacy.accounting import epsilon_spent
from fedrec.shared.privacy.audit import (
    INDEPENDENT_TOLERANCE,
    TOLERANCE,
    Finding,
    LedgerAudit,
    audit_ledger,
    summary,
)
from fedrec.shared.privacy.calibration import planned_release, run_checker, server_noise_std
from fedrec.shared.privacy.secure_interaction import audit_interaction
from fedrec.shared.privacy.statement import statement
from fedrec.shared.privacy.user_level import audit_user_level


def load_fed_config(run: Path) -> FedConfig:
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a federated run directory (one is written by "
            "`fedrec simulate` or the ServerApp)"
        )
    try:
        doc = json.loads(path.read_text())
        fed = doc["federation"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a federated run's config (no 'federation' section): {e}"
        ) from None
    if not isinstance(fed, dict):
        raise ValueError(
            f"{path} is not a federated run's config: its 'federation' section is a "
            f"{type(fed).__name__}, not an object of run-config keys"
        )
    return parse_run_config(fed, where=str(path))


def audit_run(
    run: Path,
    *,
    tolerance: float = TOLERANCE,
    plot: bool = True,
) -> tuple[dict[str, Any], str]:
    """The audit report (a JSON-able dict with ``ok``) and its human-readable text."""
    cfg = load_fed_config(run)
    acc = cfg.accountant
    user: dict[str, Any] = {"enabled": False}
    user_problems: list[str] = []
    if cfg.user_dp:
        user, user_problems = audit_user_level(run, cfg, tolerance)
    if not cfg.dp:
        p = {"user_level": user}
        text = statement(cfg, p)
        if cfg.user_dp:
            text += _user_text(user, user_problems)
        else:
            text += "\nNo ledger to verify: DP was off, nothing is claimed.\n"
        report = {
            "run": str(run),
            "ok": not user_problems,
            "dp": False,
            "user_level_dp": user,
            "secure_aggregation": cfg.secure_agg,
            "findings": [{"severity": "error", "message": m} for m in user_problems],
        }
        return report, text
    if cfg.dp_noise == "secure":
        return _audit_secure_interaction(run, cfg, tolerance)
    mech = cfg.dp_mechanism()
    audit = audit_ledger(
        run / "privacy" / "ledger.jsonl",
        tolerance=tolerance,
        budget=cfg.epsilon,
        num_rounds=cfg.num_rounds,
        mechanism=mech,
        expected_run=run_checker(cfg),
        expected_release=planned_release(cfg),
    )
    summ = summary(audit)
    _check_claim(run, audit, summ, tolerance)
    _check_complete(run, cfg, audit, tolerance)
    beyond = [r for c in audit.clients.values() for r in c.rounds if r > cfg.num_rounds]
    if plot and audit.clients and not beyond:  # (absurd rounds would make an absurd plot)
        plot_epsilon(run / "privacy" / "epsilon.png", audit, cfg.epsilon, acc)
    report = {
        "run": str(run),
        "ok": audit.ok,
        "dp": True,
        "accountant": acc,
        "delta": cfg.delta,
        "budget": cfg.epsilon,
        "summary": summ,
        "user_level_dp": user,
        "secure_aggregation": cfg.secure_agg,
        **{k: v for k, v in audit.as_dict().items() if k != "ok"},
    }
    if user_problems:
        report["ok"] = False
        report["findings"] = list(audit.as_dict()["findings"]) + [
            {"severity": "error", "message": m} for m in user_problems
        ]
    text = _text(cfg, audit, summ | {"user_level": user}, acc)
    if cfg.user_dp:
        text += _user_text(user, user_problems)
    return report, text


def _audit_secure_interaction(
    run: Path, cfg: FedConfig, tolerance: float
) -> tuple[dict[str, Any], str]:
    """``dp-noise=secure``: no per-client ledger of Gaussian steps (every client takes part in
    every released round with the same mechanism); the claim is recomputed from the config, the
    plan and ``privacy/secagg.jsonl`` (:func:`audit_interaction`), and the statement printed
    from the recomputation."""
    info, problems = audit_interaction(run, cfg, tolerance)
    text = statement(cfg, {"secure_interaction": info, "user_level": {"enabled": False}})
    lines = ["", "## Per-interaction verification (secure aggregation)", ""]
    if "epsilon_claimed" in info:
        lines.append(
            f"Recomputed from config.json, the plan and privacy/secagg.jsonl: epsilon "
            f"{info['epsilon']:.4f} at delta {cfg.delta} over {info['releases']} release(s) "
            f"(claimed {_num(info.get('epsilon_claimed'))}). The statement above is built from "
            "the recomputed values."
        )
    lines += [f"FAIL: {m}" for m in problems] or ["PASS"]
    report = {
        "run": str(run),
        "ok": not problems,
        "dp": True,
        "noise_at": "secure",
        "delta": cfg.delta,
        "budget": cfg.epsilon,
        "secure_interaction": info,
        "user_level_dp": {"enabled": False},
        "secure_aggregation": True,
        "findings": [{"severity": "error", "message": m} for m in problems],
    }
    return report, text + "\n".join(lines) + "\n"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "nothing"


def _user_text(user: dict[str, Any], problems: list[str]) -> str:
    lines = ["", "## User-level DP verification", ""]
    if "epsilon_recomputed" in user:
        lines.append(
            f"Recomputed from config.json and the aggregated rounds: epsilon "
            f"{user['epsilon_recomputed']:.4f} at delta {user.get('delta')} over "
            f"{user['releases_recomputed']} release(s) (claimed "
            f"{_num(user.get('epsilon_claimed'))}); replace-one "
            f"{user.get('epsilon_replace_one_recomputed', float('nan')):.4f} (claimed "
            f"{_num(user.get('epsilon_replace_one_claimed'))}). The statement above is built "
            "from the recomputed values."
        )
    lines += [f"FAIL: {m}" for m in problems] or ["PASS"]
    return "\n".join(lines) + "\n"


def _check_complete(run: Path, cfg: FedConfig, audit: LedgerAudit, tol: float) -> None:
    """The ledger against the run's other records. ``metrics.json`` counts, per round, the
    replies the server accepted and the refusals: each wrote a ledger line, so a round with
    fewer lines has lost some (an error). ``privacy/clients/<name>.json`` (simulation) is each
    client's own accountant history: steps beyond what the ledger accounts for are spending
    no ledger line shows (e.g. a round interrupted after the clients trained); the audit
    reports them with the epsilon of the file's history, an error above the budget."""
    per_round = audit.lines_per_round
    metrics = run / "metrics.json"
    try:
        doc = json.loads(metrics.read_text()) if metrics.is_file() else {}
    except (OSError, ValueError):
        doc = None
    rounds = doc.get("model", {}).get("rounds", []) if isinstance(doc, dict) else None
    if not isinstance(rounds, list):
        audit.findings.append(
            Finding("error", f"{metrics} is not a fedrec metrics object: cannot check the ledger")
        )
        rounds = []
    for info in rounds:
        if not isinstance(info, dict) or not isinstance(info.get("round"), int):
            continue
        need = int(info.get("accepted", 0) or 0) + int(info.get("refused", 0) or 0)
        have = per_round.get(info["round"], 0)
        if have < need:
            audit.findings.append(
                Finding(
                    "error",
                    f"metrics.json counts {need} accepted or refused replies in this round, the "
                    f"ledger has {have} line(s) for it: ledger lines are missing",
                    round=info["round"],
                )
            )
    _check_noise_at(run, cfg, audit, rounds)
    folder = run / "privacy" / "clients"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name = path.stem
        try:
            raw = json.loads(path.read_text())
            hist = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
        except (OSError, ValueError, KeyError, TypeError):
            audit.findings.append(Finding("error", f"{path} is not a readable budget file", name))
            continue
        spent = sum(n for *_, n in hist)
        c = audit.clients.get(name)
        ledgered = sum(n for *_, n in c.history) if c is not None else 0
        if spent <= ledgered:
            continue
        eps = epsilon_spent(
            history=hist,
            delta=cfg.delta,
            accountant=cfg.accountant,
            group=cfg.dp_group(),
            adjacency=cfg.dp_adjacency(),
        )
        over = eps > cfg.epsilon * (1 + tol)
        audit.findings.append(
            Finding(
                "error" if over else "warning",
                f"its budget file {path.name} records {spent} DP steps, the ledger accounts for "
                f"{ledgered}: spending no ledger line shows (an interrupted round?); epsilon of "
                f"the file's history {eps:.4f}"
                + (
                    f" > the budget {cfg.epsilon}"
                    if over
                    else f" (within the budget {cfg.epsilon})"
                ),
                name,
            )
        )


def _check_noise_at(run: Path, cfg: FedConfig, audit: LedgerAudit, rounds: list[Any]) -> None:
    """Who added the noise the ledger accounts. Every line must say the run's ``dp-noise``
    (a line without ``noise_at`` is the client's: ledgers before it existed). With
    ``dp-noise=server`` every round in which a client trained must have a record, in
    ``metrics.json`` or ``progress.jsonl`` (which keeps the rounds before a resume), that it was
    not released, or of the noise the server added to the sum: at least
    ``lr * sigma * C / batch-divisor`` for the sigma of that round's ledger lines. A round with
    no record, or released with less, is an error. What the server drew is not visible here:
    the audit checks what it recorded (the server is trusted; the statement says so)."""
    sigmas: dict[int, set[float]] = {}
    for _n, e in audit.rows:
        if "client" not in e:
            continue
        at = e.get("noise_at", "client")
        if at != cfg.dp_noise:
            audit.findings.append(
                Finding(
                    "error",
                    f"ledger line says the noise was added at the {at}, the run's config "
                    f"says dp-noise = {cfg.dp_noise}",
                    str(e.get("client")),
                    round=e.get("round") if isinstance(e.get("round"), int) else None,
                )
            )
        if e.get("trained") and isinstance(e.get("round"), int):
            sigmas.setdefault(e["round"], set()).add(float(e.get("noise_multiplier", 0.0)))
    if cfg.dp_noise != "server":
        return
    records: dict[int, dict[str, Any]] = {}
    progress = run / "progress.jsonl"
    lines = progress.read_text().splitlines() if progress.is_file() else []
    for text in lines:
        try:
            info = json.loads(text)
        except ValueError:
            continue
        if isinstance(info, dict) and isinstance(info.get("round"), int) and "aggregated" in info:
            records[info["round"]] = info
    for info in rounds:  # metrics.json's own rounds have the last word
        if isinstance(info, dict) and isinstance(info.get("round"), int):
            records[info["round"]] = info
    for rnd in sorted(sigmas):
        info = records.get(rnd)
        if info is None:
            audit.findings.append(
                Finding(
                    "error",
                    "dp-noise = server: clients trained in this round, but neither metrics.json "
                    "nor progress.jsonl records whether, and with what noise, it was released",
                    round=rnd,
                )
            )
            continue
        if not info.get("aggregated"):
            continue
        got = info.get("server_noise_std")
        for sigma in sorted(sigmas[rnd]):
            need = server_noise_std(cfg, sigma)
            if not isinstance(got, (int, float)) or got < need * (1 - 1e-9):
                audit.findings.append(
                    Finding(
                        "error",
                        f"dp-noise = server: the run records server noise std {got} for this "
                        f"round, the ledger's noise multiplier {sigma:.6g} needs {need:.6g} "
                        "(lr x sigma x max-grad-norm / batch-divisor)",
                        round=rnd,
                    )
                )


def _check_claim(run: Path, audit: LedgerAudit, summ: dict[str, Any], tol: float) -> None:
    """The run's own claim (``metrics.json``) must not be below the recomputed epsilon."""
    path = run / "metrics.json"
    if not path.is_file():
        audit.findings.append(
            Finding("warning", f"{path} missing (run not finished?): no claim to compare")
        )
        return
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        doc = err
    privacy = doc.get("privacy") if isinstance(doc, dict) else None
    claimed = privacy.get("epsilon_max") if isinstance(privacy, dict) else None
    if (
        not isinstance(claimed, (int, float))
        or isinstance(claimed, bool)
        or not math.isfinite(claimed)
    ):
        why = "no numeric privacy.epsilon_max"
        if isinstance(doc, Exception):
            why = f"unreadable ({doc})"
        audit.findings.append(Finding("error", f"{path}: {why}; the run's claim cannot be checked"))
        return
    if claimed < summ["epsilon_max"] * (1 - tol):
        audit.findings.append(
            Finding(
                "error",
                f"metrics.json claims max epsilon {claimed:.6g}; the ledger gives "
                f"{summ['epsilon_max']:.6g}",
            )
        )


def _text(cfg: FedConfig, audit: LedgerAudit, summ: dict[str, Any], acc: str) -> str:
    out = [statement(cfg, summ).rstrip(), "", f"## Verification ({audit.path})", ""]
    trained = [c for c in audit.clients.values() if c.rounds]
    if trained:
        dev = max(
            abs(c.epsilon_reported - c.epsilon) / max(c.epsilon_reported, 1e-12) for c in trained
        )
        ratios = [
            c.epsilon_independent / c.epsilon
            for c in trained
            if 0 < c.epsilon < math.inf and math.isfinite(c.epsilon_independent)
        ] or [math.nan]
        first = trained[0]
        out += [
            f"- {audit.lines} ledger lines, {len(audit.clients)} clients ({len(trained)} trained).",
            f"- Mechanism recomputed from config.json: {first.accountant.upper()} accountant, "
            f"{first.adjacency} adjacency"
            + (f" (group of {first.group})" if first.group > 1 else "")
            + f", delta {first.delta}.",
            f"- Reported vs recomputed epsilon (same accountant): largest relative difference "
            f"{dev:.2e} (tolerance {audit.tolerance:.0e}).",
            f"- Independent recomputation ({first.independent}) / recomputed, over clients: "
            f"min {min(ratios):.4f}, median {statistics.median(ratios):.4f}, max "
            f"{max(ratios):.4f} (a claim more than {INDEPENDENT_TOLERANCE:.0%} below the "
            "independent value fails).",
        ]
    if audit.findings:
        out += ["", *[f"- {f}" for f in audit.findings]]
    out += [
        "",
        f"Result: {'PASS' if audit.ok else 'FAIL'}",
        "",
        "## Budget (highest epsilon first)",
        "",
    ]
    rows = sorted(audit.clients.values(), key=lambda c: c.epsilon, reverse=True)
    out.append(
        f"{'client':>10} {'rounds':>6} {'refused':>7} {'reported':>9} {'recomputed':>10} "
        f"{'independent':>11} {'left':>7} {'more rounds':>11}"
    )
    for c in rows[:15]:
        left = f"{c.budget_left:.3f}" if c.budget_left is not None else "-"
        more = str(c.more_rounds) if c.more_rounds is not None else "-"
        out.append(
            f"{c.client:>10} {len(c.rounds):>6} {len(c.refusals):>7} {c.epsilon_reported:>9.4f} "
            f"{c.epsilon:>10.4f} {c.epsilon_independent:>11.4f} {left:>7} {more:>11}"
        )
    if len(rows) > 15:
        out.append(f"... {len(rows) - 15} more clients: `fedrec audit RUN --json` lists all")
    return "\n".join(out) + "\n"


def plot_epsilon(path: Path, audit: LedgerAudit, budget: float, acc: str) -> None:
    """Epsilon over rounds (max, median, 10-90 % band of clients that have trained so far) and
    the distribution of final per-client epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_round = max((r for c in audit.clients.values() for r, _ in c.trajectory), default=0)
    rounds = np.arange(1, last_round + 1)
    current: dict[str, float] = {}
    events = sorted((r, c.client, e) for c in audit.clients.values() for r, e in c.trajectory)
    stats, i = [], 0
    for r in rounds:
        while i < len(events) and events[i][0] <= r:
            current[events[i][1]] = events[i][2]
            i += 1
        finite = [x for x in current.values() if math.isfinite(x)]
        v = np.array(finite) if finite else np.zeros(1)
        stats.append((v.max(), np.median(v), *np.percentile(v, [10, 90])))
    s = np.array(stats) if stats else np.zeros((0, 4))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    if len(s):
        axes[0].fill_between(rounds, s[:, 2], s[:, 3], alpha=0.3, label="10-90 % of clients")
        axes[0].plot(rounds, s[:, 0], "-", label="max")
        axes[0].plot(rounds, s[:, 1], "--", label="median")
    axes[0].axhline(budget, color="red", lw=1, label=f"budget {budget}")
    axes[0].set(
        title=f"epsilon spent by clients that trained so far ({acc.upper()}, recomputed)",
        xlabel="round",
        ylabel="epsilon",
    )
    axes[0].legend(fontsize=7)
    final = [e for e in audit.epsilons() if math.isfinite(e)]  # inf: no finite bound
    axes[1].hist(final, bins=20)
    axes[1].axvline(budget, color="red", lw=1)
    axes[1].set(
        title=f"final per-client epsilon ({acc.upper()})", xlabel="epsilon", ylabel="clients"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
