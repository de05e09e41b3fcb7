"""Ledger verification for ``fedrec audit``: re-derive every client's epsilon from raw mechanism
parameters and check the ledger is complete, consistent and within budget.

The ledger (``RUN/privacy/ledger.jsonl``) holds one JSON line per client per round
with the mechanism of that round: ``noise_multiplier``, ``sample_rate``, ``steps`` (Poisson
sampled DP-SGD steps), ``delta``, ``accountant`` and the ``epsilon_after`` the client reported
for its whole history. The audit trusts none of the reported epsilons. For each client it
rebuilds the mechanism history from the ledger lines in round order and recomputes epsilon under
the mechanism the run's config gives (accountant, adjacency, group size, delta: never the
ledger's word for them), and again with a second, independent accountant
(:func:`fedrec.shared.privacy.accounting.independent_epsilon`), then checks:

- every line's mechanism fields equal the config's (a ledger that claims add/remove where the
  examples make one interaction a replacement is an error);
- the reported epsilon is not below the independent recomputation by more than
  ``INDEPENDENT_TOLERANCE``;

- every line parses and has the required fields with valid values (a truncated LAST line, the
  trace of a crash mid-write, is a warning; any other unreadable line is an error);
- no client has two lines for one round, and rounds are increasing in file order;
- the reported epsilon equals the recomputation with the same accountant within ``tolerance``
  (relative). Reported < recomputed: the client under-reports (e.g. it re-created its accountant
  each round). Reported > recomputed: the ledger misses spending the client did;
- when the client reports ``total_steps`` (its accountant's whole-history step count), it equals
  the sum of the ledger's steps: a mismatch means a missing (or invented) round. A round the
  client spent but the ledger lacks (its reply lost to the round timeout, or a run stopped after
  the client trained and before the server recorded the round, then resumed) is a warning when
  the client's reported ``history`` accounts for it exactly: the missing steps are then added
  to the recomputation, so every epsilon counts them. Without such a history it is an error;
- no client is over its budget, by its own report or by the recomputation;
- one delta and one accountant per client, refusals carry no steps.

Any error makes :func:`audit_ledger`'s report fail (``fedrec audit`` exits 1), naming the client,
the round and the ledger line.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedrec.shared.privacy.accounting import (
    ACCOUNTANTS,
    ADJACENCIES,
    Run,
    epsilon_spent,
    independent_epsilon,
)

TOLERANCE = 0.01  # relative: reported vs recomputed with the same accountant
# relative: the claim vs a second, independent accountant (different numerics, same bound)
INDEPENDENT_TOLERANCE = 0.02
_ABS_TOL = 1e-6  # epsilon values this small are compared absolutely


def _unledgered(reported: Any, ledger: list[Run]) -> list[Run] | None:
    """The spending in a client's reported ``history`` that the ledger lacks, per (sigma, q)
    (composition is order-free); None when the report is missing or malformed, or lacks
    spending the ledger has (then it cannot be believed)."""
    if not isinstance(reported, list):
        return None

    def tally(runs: Any) -> dict[tuple[float, float], int]:
        out: dict[tuple[float, float], int] = {}
        for s, q, n in runs:
            out[(float(s), float(q))] = out.get((float(s), float(q)), 0) + int(n)
        return out

    try:
        mine = tally(reported)
    except (TypeError, ValueError):
        return None
    ledger_steps = tally(ledger)
    if any(mine.get(k, 0) < n for k, n in ledger_steps.items()):
        return None
    return [(s, q, n - ledger_steps.get((s, q), 0)) for (s, q), n in mine.items()
            if n > ledger_steps.get((s, q), 0)]  # fmt: skip


def _carried(first: dict[str, Any]) -> list[Run] | None:
    """The history a client had before its first line in this ledger, from the line's reported
    ``history`` (after the round) minus the round itself; None when it carried nothing or did
    not report it (then any earlier spending shows up as a gap)."""
    hist, total = first.get("history"), int(first.get("total_steps", -1))
    trained = bool(first.get("trained", first["steps"] > 0)) and first["steps"] > 0
    own = first["steps"] if trained else 0
    this = [(float(first["noise_multiplier"]), float(first["sample_rate"]), own)] if trained else []
    release = _release_run(first["release"]) if "release" in first else None
    if release is not None and bool(first.get("trained", first["steps"] > 0)):
        this.append(release)  # the round's release is on the line too, not carried
        own += release[2]
    if total <= own:
        return None
    runs = _unledgered(hist, this)  # the reported history minus this round
    if not runs or sum(n for _s, _q, n in runs) != total - own:
        return None
    return runs


# field -> (accepted JSON types, check, rule shown in the error message)
_FIELDS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "client": ((str,), lambda v: v != "", "a non-empty string"),
    "round": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "steps": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "sample_rate": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "noise_multiplier": ((int, float), lambda v: v >= 0 and math.isfinite(v), "a number >= 0"),
    "delta": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "accountant": ((str,), lambda v: v in ACCOUNTANTS, f"one of {ACCOUNTANTS}"),
    "epsilon_after": ((int, float), lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
}
_OPTIONAL: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "trained": ((bool,), lambda v: True, "true or false"),
    "accepted": ((bool,), lambda v: True, "true or false"),
    "epsilon_max": ((int, float), lambda v: v > 0, "a number > 0"),
    "total_steps": ((int,), lambda v: v >= -1, "an integer (-1 = not reported)"),
    "max_grad_norm": ((int, float), lambda v: v > 0, "a number > 0"),
    "history": ((list,), lambda v: True, "a list of [sigma, q, steps]"),
    "adjacency": ((str,), lambda v: v in ADJACENCIES, f"one of {ADJACENCIES}"),
    "group_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
}


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "note"
    message: str
    client: str | None = None
    round: int | None = None
    line: int | None = None  # 1-based line number in ledger.jsonl

    def __str__(self) -> str:
        where = []
        if self.client is not None:
            where.append(f"client {self.client}")
        if self.round is not None:
            where.append(f"round {self.round}")
        if self.line is not None:
            where.append(f"ledger line {self.line}")
        return (
            f"{self.severity.upper()}: "
            + (", ".join(where) + ": " if where else "")
            + (self.message)
        )


@dataclass
class ClientAudit:
    client: str
    rounds: list[int] = field(default_factory=list)  # rounds it trained in
    refusals: list[int] = field(default_factory=list)  # rounds it refused (budget, no data)
    epsilon_reported: float = 0.0
    epsilon: float = 0.0  # recomputed with the run's accountant and adjacency
    epsilon_independent: float = 0.0  # recomputed by a second, independent accountant
    independent: str = ""  # that accountant's name
    budget: float | None = None
    delta: float | None = None
    accountant: str = "pld"
    adjacency: str = "replace-one"
    group: int = 1  # add/remove steps one interaction can make (adjacency add-remove)
    budget_left: float | None = None
    more_rounds: int | None = None  # rounds it could still join at its last round's settings
    history: list[Run] = field(default_factory=list)
    carried_steps: int = 0  # steps spent before this run (a device's budget spans runs)
    unledgered_steps: int = 0  # spent in this run but on no ledger line (lost replies)
    trajectory: list[tuple[int, float]] = field(default_factory=list)  # (round, recomputed eps)


@dataclass
class LedgerAudit:
    path: str
    lines: int
    findings: list[Finding]
    clients: dict[str, ClientAudit]
    tolerance: float
    # valid client lines per round (what fedrec.shared.privacy.report checks against the
    # per-round reply counts in metrics.json)
    lines_per_round: dict[int, int] = field(default_factory=dict)
    # every valid line as read, ``(line number, entry)`` (duplicates included; not in as_dict)
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def epsilons(self) -> list[float]:
        """The recomputed epsilon of every client that trained."""
        return [c.epsilon for c in self.clients.values() if c.rounds]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.path,
            "lines": self.lines,
            "ok": self.ok,
            "tolerance": self.tolerance,
            "findings": [asdict(f) for f in self.findings],
            "clients": {k: asdict(v) for k, v in sorted(self.clients.items())},
        }


def read_ledger_lines(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Finding]]:
    """``(line number, entry)`` for every valid line, and findings for the others."""
    if not path.is_file():
        return [], [Finding("error", f"no ledger at {path}: is this a DP run directory?")]
    raw = path.read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")
    complete = raw.endswith("\n")
    if complete:
        lines = lines[:-1]
    entries: list[tuple[int, dict[str, Any]]] = []
    findings: list[Finding] = []
    for no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        last = no == len(lines)
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
            if last and not complete:
                findings.append(
                    Finding(
                        "warning",
                        f"truncated last line ({len(text)} bytes, no newline; a crash while "
                        "writing?): ignored. Its round's spending cannot be verified from the "
                        "ledger; the client's own budget file is authoritative for it",
                        line=no,
                    )
                )
            else:
                findings.append(Finding("error", f"not valid JSON ({e.msg})", line=no))
            continue
        if (
            isinstance(entry, dict)
            and set(entry) == {"round", "note"}
            and isinstance(entry["note"], str)
            and isinstance(entry["round"], int)
        ):
            # the server's note on a round's missing clients (failed or silent)
            rnd = entry.get("round")
            findings.append(
                Finding(
                    "note",
                    str(entry["note"]),
                    round=rnd if isinstance(rnd, int) else None,
                    line=no,
                )
            )
            continue
        problem = _schema_problem(entry)
        if problem:
            client = entry.get("client") if isinstance(entry, dict) else None
            rnd = entry.get("round") if isinstance(entry, dict) else None
            findings.append(
                Finding(
                    "error",
                    problem,
                    client=client if isinstance(client, str) else None,
                    round=rnd if isinstance(rnd, int) else None,
                    line=no,
                )
            )
            continue
        entries.append((no, entry))
    return entries, findings


def _schema_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"a ledger line must be a JSON object, got {type(entry).__name__}"
    for key, (types, ok, rule) in _FIELDS.items():
        if key not in entry:
            return f"missing field '{key}'"
        if not _typed(entry[key], types) or not ok(entry[key]):
            return f"field '{key}' = {entry[key]!r} must be {rule}"
    for key, (types, ok, rule) in _OPTIONAL.items():
        if key in entry and (not _typed(entry[key], types) or not ok(entry[key])):
            return f"field '{key}' = {entry[key]!r} must be {rule}"
    return None


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number here
    return isinstance(value, types)


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= max(_ABS_TOL, tol * max(abs(a), abs(b)))


def audit_ledger(
    path: Path,
    *,
    tolerance: float = TOLERANCE,
    budget: float | None = None,
    num_rounds: int | None = None,
    mechanism: dict[str, Any] | None = None,
    expected_run: Callable[[Run], str | None] | None = None,
    expected_release: Run | None = None,
) -> LedgerAudit:
    """Verify ``path`` (see the module docstring). ``budget`` / ``num_rounds`` / ``mechanism``
    (:meth:`FedConfig.dp_mechanism`: accountant, adjacency, group_size, delta) come from the
    run's config when known; then every line's mechanism fields must agree with it, and every
    epsilon is recomputed under the config's mechanism, not the ledger's. Without it the
    ledger's own fields are used (a line without ``adjacency`` is an older add/remove claim).
    ``expected_run``: checks each trained line's (noise multiplier, sample rate, steps) against
    the run's config and returns what is wrong, or None
    (:func:`fedrec.shared.privacy.calibration.run_checker`; a ledger with less noise or more
    steps than the config's calibration is an error). A line's ``release`` (``[sigma, q,
    steps]``, a segment-count release the client paid for in that round, see
    :mod:`fedrec.shared.federation.segments`) joins the history after the round's DP-SGD steps;
    with ``expected_release`` (the run the config charges it as) any other value is an error."""
    entries, findings = read_ledger_lines(path)
    clients: dict[str, ClientAudit] = {}
    seen: dict[tuple[str, int], int] = {}
    by_client: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for no, e in entries:
        name, rnd = e["client"], e["round"]
        if (name, rnd) in seen:
            findings.append(
                Finding(
                    "error",
                    f"duplicate: the client already has a line for this round (line "
                    f"{seen[name, rnd]})",
                    name,
                    rnd,
                    no,
                )
            )
            continue
        seen[name, rnd] = no
        if by_client[name] and by_client[name][-1][1]["round"] > rnd:
            findings.append(
                Finding(
                    "error",
                    f"out of order: follows round {by_client[name][-1][1]['round']} of the same "
                    "client",
                    name,
                    rnd,
                    no,
                )
            )
        if num_rounds is not None and rnd > num_rounds:
            findings.append(
                Finding("error", f"round beyond the run's num-rounds={num_rounds}", name, rnd, no)
            )
        by_client[name].append((no, e))

    for name, rows in by_client.items():
        rows.sort(key=lambda r: r[1]["round"])
        c = ClientAudit(client=name)
        clients[name] = c
        first = rows[0][1]
        claimed = _line_mechanism(first)
        truth = dict(mechanism) if mechanism is not None else claimed
        c.accountant, c.adjacency = str(truth["accountant"]), str(truth["adjacency"])
        c.group, c.delta = int(truth["group_size"]), float(truth["delta"])
        steps_so_far = 0
        prior = _carried(rows[0][1])
        if prior is not None:
            c.history = list(prior)
            steps_so_far = c.carried_steps = sum(n for _s, _q, n in prior)
            findings.append(
                Finding(
                    "note",
                    f"carries {steps_so_far} DP steps from before this run (the device's own "
                    "budget history, reported by the client; included in every epsilon here)",
                    name,
                    rows[0][1]["round"],
                    rows[0][0],
                )
            )
        for no, e in rows:
            rnd = e["round"]
            trained = bool(e.get("trained", e["steps"] > 0))
            line_mech = _line_mechanism(e)
            if line_mech != claimed:
                findings.append(
                    Finding(
                        "error",
                        f"mechanism changed to {line_mech} from {claimed}: one client's history "
                        "must use one accountant, adjacency, group size and delta",
                        name,
                        rnd,
                        no,
                    )
                )
                continue
            if mechanism is not None and line_mech != truth:
                findings.append(
                    Finding(
                        "error",
                        f"the ledger claims {_differences(line_mech, truth)}; the run's "
                        "config.json gives the mechanism actually run: every epsilon here is "
                        "recomputed under config.json's",
                        name,
                        rnd,
                        no,
                    )
                )
            if trained and expected_run is not None and e["steps"] > 0:
                got = (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                problem = expected_run(got)
                if problem is not None:
                    findings.append(
                        Finding(
                            "error",
                            f"mechanism (noise multiplier, sample rate, steps) {got}: {problem}",
                            name,
                            rnd,
                            no,
                        )
                    )
            if trained:
                if e["steps"] > 0:
                    if not e["noise_multiplier"] > 0:
                        findings.append(
                            Finding(
                                "error",
                                "trained with noise_multiplier 0: no DP guarantee",
                                name,
                                rnd,
                                no,
                            )
                        )
                        continue
                    c.history.append(
                        (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                    )
                    steps_so_far += int(e["steps"])
                if "release" in e:
                    release = _release_run(e["release"])
                    problem = (
                        "is not [noise multiplier > 0, sample rate in (0, 1], steps >= 1]"
                        if release is None
                        else None
                        if expected_release is None or release == expected_release
                        else f"is not the one config.json charges, {list(expected_release)}"
                    )
                    if problem is not None:
                        findings.append(
                            Finding("error", f"release {e['release']!r} {problem}", name, rnd, no)
                        )
                    if release is not None:  # counted whatever its noise: never an under-count
                        c.history.append(release)
                        steps_so_far += release[2]
                c.rounds.append(rnd)
            else:
                if e["steps"] > 0:
                    findings.append(
                        Finding(
                            "error",
                            f"marked as not trained but reports {e['steps']} steps",
                            name,
                            rnd,
                            no,
                        )
                    )
                if "release" in e:
                    findings.append(
                        Finding(
                            "error",
                            "marked as not trained but reports a release (one goes only with a "
                            "trained round)",
                            name,
                            rnd,
                            no,
                        )
                    )
                c.refusals.append(rnd)
            total = int(e.get("total_steps", -1))
            if total >= 0 and total != steps_so_far:
                extra = _unledgered(e.get("history"), c.history)
                if extra and sum(n for _s, _q, n in extra) == total - steps_so_far:
                    c.history += extra
                    c.unledgered_steps += total - steps_so_far
                    findings.append(
                        Finding(
                            "warning",
                            f"gap: {total - steps_so_far} DP steps the client spent are on no "
                            "ledger line (a reply lost to the round timeout, or a run stopped "
                            "before the round was recorded); the client's reported history has "
                            "them, and every epsilon here counts them",
                            name,
                            rnd,
                            no,
                        )
                    )
                else:
                    findings.append(
                        Finding(
                            "error",
                            f"gap: the client's accountant holds {total} steps, the ledger's "
                            f"lines up to here hold {steps_so_far}",
                            name,
                            rnd,
                            no,
                        )
                    )
                steps_so_far = total  # report each gap once
            reported = float(e["epsilon_after"])
            recomputed = epsilon_spent(history=c.history, **_kw(c))
            # under-reporting is never tolerated beyond rounding (the client runs this same
            # code on the same history); over-reporting within ``tolerance`` is
            if reported < recomputed * (1 - 1e-9) or not _close(reported, recomputed, tolerance):
                why = (
                    "the client under-reports (did it re-create its accountant, or drop earlier "
                    "rounds?)"
                    if reported < recomputed
                    else "the client spent more than the ledger shows (a round missing from the "
                    "ledger?)"
                )
                findings.append(
                    Finding(
                        "error",
                        f"reported epsilon {reported:.6g}, recomputed {recomputed:.6g} from the "
                        f"ledger's mechanism history ({c.accountant.upper()}, {c.adjacency}, "
                        f"group {c.group}, delta={c.delta}): {why}",
                        name,
                        rnd,
                        no,
                    )
                )
            limit = budget if budget is not None else e.get("epsilon_max")
            if limit is not None:
                c.budget = float(limit)
                worst = max(reported, recomputed)
                if worst > c.budget * (1 + 1e-9):
                    findings.append(
                        Finding(
                            "error",
                            f"over budget: epsilon {worst:.6g} > epsilon_max {c.budget}",
                            name,
                            rnd,
                            no,
                        )
                    )
            c.epsilon_reported = reported
            c.trajectory.append((rnd, recomputed))
        c.epsilon = epsilon_spent(history=c.history, **_kw(c))
        c.epsilon_independent, c.independent = independent_epsilon(history=c.history, **_kw(c))
        if c.rounds and c.epsilon_reported < c.epsilon_independent * (1 - INDEPENDENT_TOLERANCE):
            findings.append(
                Finding(
                    "error",
                    f"reported epsilon {c.epsilon_reported:.6g} is below the independent "
                    f"recomputation ({c.independent}) {c.epsilon_independent:.6g} by more than "
                    f"{INDEPENDENT_TOLERANCE:.0%}",
                    name,
                )
            )
    audit = LedgerAudit(str(path), len(entries), findings, clients, tolerance, rows=entries)
    for _no, e in entries:
        audit.lines_per_round[e["round"]] = audit.lines_per_round.get(e["round"], 0) + 1
    for c in clients.values():
        budget_view(c, by_client[c.client])
    return audit


def _release_run(value: Any) -> Run | None:
    """A ledger line's ``release`` as a run, or None when it is not a valid one."""
    try:
        sigma, q, steps = value
        run = (float(sigma), float(q), int(steps))
    except (TypeError, ValueError):
        return None
    if isinstance(steps, bool) or steps != run[2]:
        return None
    if not (run[0] > 0 and math.isfinite(run[0]) and 0 < run[1] <= 1 and run[2] >= 1):
        return None
    return run


def _line_mechanism(e: dict[str, Any]) -> dict[str, Any]:
    """A ledger line's claimed mechanism; lines written before fedrec recorded the adjacency
    claimed add/remove."""
    return {
        "accountant": str(e["accountant"]),
        "adjacency": str(e.get("adjacency", "add-remove")),
        "group_size": int(e.get("group_size", 1)),
        "delta": float(e["delta"]),
    }


def _differences(claimed: dict[str, Any], truth: dict[str, Any]) -> str:
    return ", ".join(f"{k} {claimed[k]!r} (config.json: {truth[k]!r})" for k in truth
                     if claimed.get(k) != truth[k])  # fmt: skip


def _kw(c: ClientAudit) -> dict[str, Any]:
    assert c.delta is not None
    return {
        "delta": c.delta,
        "accountant": c.accountant,
        "group": c.group,
        "adjacency": c.adjacency,
    }


def budget_view(c: ClientAudit, rows: list[tuple[int, dict[str, Any]]], cap: int = 10_000) -> None:
    """Fill ``budget_left`` and ``more_rounds``: how many more rounds like its last trained one
    the client could join before its next round would exceed the budget."""
    if c.budget is None or c.delta is None:
        return
    budget = c.budget
    c.budget_left = max(0.0, c.budget - c.epsilon)
    last = next(
        (e for _no, e in reversed(rows) if e.get("trained", e["steps"] > 0) and e["steps"] > 0),
        None,
    )
    if last is None:
        return
    run = (float(last["noise_multiplier"]), float(last["sample_rate"]), int(last["steps"]))

    def fits(k: int) -> bool:
        return epsilon_spent(history=[*c.history, *[run] * k], **_kw(c)) <= budget

    if not fits(1):
        c.more_rounds = 0
        return
    lo, hi = 1, 2  # fits(lo) holds; grow hi until it fails, then bisect
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        c.more_rounds = cap
        return
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    c.more_rounds = lo


def histogram(values: list[float], bins: int = 10) -> list[tuple[float, float, int]]:
    """``(low, high, count)`` bins over ``[0, max]`` (equal width) of the finite values; an
    infinite epsilon (no finite bound) gets a last ``(max, inf, count)`` bin."""
    infinite = sum(1 for v in values if not math.isfinite(v))
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return [(0.0, math.inf, infinite)] if infinite else []
    top = max(values) or 1.0
    width = top / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width))] += 1
    bins_out = [(i * width, (i + 1) * width, n) for i, n in enumerate(counts)]
    return bins_out + ([(top, math.inf, infinite)] if infinite else [])


def summary(audit: LedgerAudit) -> dict[str, Any]:
    eps = audit.epsilons()
    rounds = [len(c.rounds) for c in audit.clients.values()]
    return {
        "clients": len(audit.clients),
        "clients_trained": len(eps),
        "epsilon_max": max(eps) if eps else 0.0,
        "epsilon_median": statistics.median(eps) if eps else 0.0,
        "rounds_per_client": {str(k): rounds.count(k) for k in sorted(set(rounds))},
        "refusals": sum(len(c.refusals) for c in audit.clients.values()),
        "histogram": histogram(eps),
    }
