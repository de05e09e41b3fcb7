"""A client's privacy budget and where it is kept between rounds, runs and process restarts.

:class:`Budget` is the state (the accountant history, the mechanism it was spent under, the
client's own cap); a :class:`BudgetStore` keeps it. Which store a client gets
(:func:`budget_store`):

- a device (a SuperNode with ``data-dir``): :class:`FileStore`, ``<state-dir>/privacy-budget.json``
  on the device, across all runs (the budget is the device's, not a run's);
- a simulated client (``partition-id``): :class:`ContextStore`, Flower's ``Context.state``
  mirrored to ``RUN/privacy/clients/<name>.json`` so a resumed run restores it;
- otherwise (tests, benchmarks): :class:`MemoryStore`.

A device's per-interaction secure rounds (``dp-noise=secure``) are not in this history: they
have their own record beside it (:mod:`fedrec.client.interaction_budget`), capped together
with it.

Losing a budget would restart epsilon from zero: every reader refuses a file it cannot parse.
A round's steps are charged before it trains (:meth:`BudgetStore.update`): the check against
the cap and the write happen together, under a lock on a device's file, so two runs on one
device at the same time can neither lose each other's steps nor pass the cap together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord, Context

from fedrec.shared.privacy.accounting import Run

_log = logging.getLogger(__name__)

# What a refused secure round tells the server: nothing about the device's record (how many
# secure rounds it joined, its epsilon, where it keeps them); the device's own log has that.
CAP_REFUSAL = (
    "this device refuses the round: it would pass the user-level cap in its node config "
    "(user-epsilon-max); the device's own log says by how much"
)


class CapRefused(ValueError):
    """The device's user-level cap refused a round (its message is :data:`CAP_REFUSAL`)."""

    def __init__(self) -> None:
        super().__init__(CAP_REFUSAL)


RECORD_FAILURE = (
    "this device refuses the round: its user-level privacy record cannot be read or written "
    "(the device's own log says why)"
)


@contextlib.contextmanager
def quiet_record() -> Iterator[None]:
    """Errors of the device's user-level record reach the server as a constant: their text
    (the record's path, what is wrong with it) goes to the device's own log."""
    try:
        yield
    except CapRefused:
        raise
    except (ValueError, OSError) as err:
        _log.warning("user-level privacy record: %s: %s", type(err).__name__, err)
        raise ValueError(RECORD_FAILURE) from None


@dataclass
class Budget:
    """A client's privacy state: the accountant history, the mechanism it was spent under (the
    accounting parameters of :meth:`FedConfig.dp_mechanism`: accountant, adjacency, group size,
    delta) and the client's own cap. A device keeps all three, so a later run cannot re-account
    its history under another adjacency or group size, or raise its cap."""

    history: list[Run] = field(default_factory=list)
    mechanism: dict[str, Any] | None = None
    epsilon_max: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "history": [list(r) for r in self.history],
            "mechanism": self.mechanism,
            "epsilon_max": self.epsilon_max,
        }

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Budget:
        """Parse; a history without a mechanism (an older fedrec's file) is refused: its epsilon
        cannot be recomputed without knowing what it was spent under."""
        try:
            if not isinstance(raw, dict):
                raise TypeError(f"the record is a JSON {_json_type(raw)}, not an object")
            entries = raw["history"]
            if not isinstance(entries, list):
                raise TypeError(f"'history' is a JSON {_json_type(entries)}, not an array")
            for e in entries:
                if not (isinstance(e, list) and len(e) == 3):
                    raise ValueError(
                        f"history entry {e!r} is not [noise multiplier, sample rate, steps]"
                    )
            history = [_entry(s, q, n) for s, q, n in entries]
            mech = raw.get("mechanism")
            cap = raw.get("epsilon_max")
            if cap is not None and not (isinstance(cap, (int, float)) and 0 < cap < math.inf):
                raise ValueError(f"epsilon_max {cap!r} is not a positive number")
            if mech is not None and set(mech) != {"accountant", "adjacency", "group_size", "delta"}:
                raise ValueError(f"mechanism {mech!r} lacks fields or has unknown ones")
            budget = cls(history, mech, None if cap is None else float(cap))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"privacy state {where} is unreadable ({_why(err)}); refusing to train: a lost "
                "accountant would restart epsilon from zero. Restore it from a backup."
            ) from None
        if budget.history and budget.mechanism is None:
            raise ValueError(
                f"privacy state {where} holds {sum(n for *_x, n in history)} DP steps but not "
                "the mechanism they were spent under (a file from an older fedrec, which "
                "accounted disjoint examples as add/remove): refusing to train. Keep it as a "
                "record and start this device's budget afresh only if you accept that its "
                "earlier spending is not counted."
            )
        return budget


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``null``, ``object``...), not Python's."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number",
             str: "string", list: "array", dict: "object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _why(err: BaseException) -> str:
    """What is wrong with a budget file, in words (not a KeyError's bare ``'history'``)."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
    if isinstance(err, KeyError):
        return f"no field {err.args[0]!r}" if err.args else "a field is missing"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if isinstance(err, (TypeError, AttributeError)) and "JSON" not in str(err):
        return f"a field has the wrong type ({err})"
    return str(err)


def _entry(sigma: Any, q: Any, n: Any) -> tuple[float, float, int]:
    """One accountant history entry ``(noise multiplier, sample rate, steps)``, checked: a
    hand-edited or corrupted file must not under-count (negative or fractional steps, a zero
    or negative noise, a rate outside (0, 1])."""
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in (sigma, q, n)):
        raise ValueError(f"history entry {[sigma, q, n]!r} is not three numbers")
    if not (0 < sigma < math.inf and 0 < q <= 1 and n >= 0 and float(n).is_integer()):
        raise ValueError(
            f"history entry {[sigma, q, n]!r}: needs noise > 0, sample rate in (0, 1] and a "
            "whole number of steps >= 0"
        )
    return float(sigma), float(q), int(n)


class BudgetStore(Protocol):
    """Where a client keeps its :class:`Budget` between rounds (and process restarts)."""

    def load(self) -> Budget: ...

    def save(self, budget: Budget) -> None: ...

    def update(self, change: Callable[[Budget], Budget]) -> Budget:
        """Replace the budget with ``change(budget)`` as one step (a device's file: under its
        lock, so no other run reads or writes in between) and return the new one. ``change``
        may raise to leave the store as it was."""
        ...


@dataclass
class MemoryStore:
    """Tests and benchmarks: the budget lives in this object."""

    budget: Budget = field(default_factory=Budget)

    def load(self) -> Budget:
        return Budget(list(self.budget.history), self.budget.mechanism, self.budget.epsilon_max)

    def save(self, budget: Budget) -> None:
        self.budget = Budget(list(budget.history), budget.mechanism, budget.epsilon_max)

    def update(self, change: Callable[[Budget], Budget]) -> Budget:
        new = change(self.load())
        self.save(new)
        return new


# What a device's round tells the server when its local-DP budget file cannot be read or
# written: not the file's path or what is wrong with it (the device's own log has both).
BUDGET_FAILURE = (
    "this device refuses the round: its local-DP budget file cannot be read or written "
    "(the device's own log says why)"
)


@dataclass
class FileStore:
    """Deployment: a JSON file on the device, replaced atomically (never half-written); an
    :meth:`update` holds an ``flock`` on ``<file>.lock`` from its read to its write (Linux and
    macOS; on Windows there is no ``fcntl`` and no lock).

    ``quiet`` (a device's ClientApp): a file that cannot be read or written raises
    :data:`BUDGET_FAILURE`, whose text is all a ClientApp error tells the server; the path and
    the fault go to the device's log. Otherwise (the CLI, tests) the error says both."""

    path: Path
    quiet: bool = False

    def load(self) -> Budget:
        with self._errors():
            if not self.path.exists():
                return Budget()
            try:
                raw = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"privacy state file {self.path} is unreadable ({_why(err)}); refusing to "
                    "train: a lost accountant would restart epsilon from zero. Restore it from "
                    "a backup."
                ) from None
            return Budget.from_json(raw, f"file {self.path}")

    def save(self, budget: Budget) -> None:
        with self._errors():
            _write_durably(self.path, budget.to_json(), ".budget-")

    def update(self, change: Callable[[Budget], Budget]) -> Budget:
        with contextlib.ExitStack() as held:
            with self._errors():  # the lock's file; what change() raises is its own
                held.enter_context(_locked(self.path))
            new = change(self.load())
            self.save(new)
        return new

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (ValueError, OSError) as err:
            if not self.quiet or str(err) == BUDGET_FAILURE:
                raise
            _log.warning("local-DP budget file %s: %s: %s", self.path, type(err).__name__, err)
            raise ValueError(BUDGET_FAILURE) from None


def _write_durably(path: Path, doc: Any, prefix: str) -> None:
    """``doc`` as JSON at ``path``: a temp file, fsync, rename (never half-written, and on disk
    before the caller goes on: a privacy record must not lag what the device sent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # no stray temp file beside the record
            os.unlink(tmp)
        raise
    # the rename itself is in the folder's entry: sync it too, where the system allows
    with contextlib.suppress(OSError, AttributeError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<path>.lock`` (``fcntl.flock``) for a read-modify-write
    of ``path``: two runs on one device take turns. Where ``fcntl`` does not exist (Windows)
    there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class ContextStore:
    """The accountant history in Flower's ``Context.state`` (simulation), mirrored to a file in
    the run directory when the server names one, so a resumed run restores it (a process crash
    loses ``Context.state``; epsilon must not restart from zero)."""

    def __init__(self, context: Context, file: Path | None) -> None:
        self.context, self.file = context, FileStore(file) if file else None

    def load(self) -> Budget:
        rec = self.context.state.get("privacy")
        mem = (
            Budget.from_json(json.loads(str(rec["budget"])), "in Context.state")
            if isinstance(rec, ConfigRecord)
            else Budget()
        )
        disk = self.file.load() if self.file else Budget()
        steps = lambda b: sum(int(r[2]) for r in b.history)  # noqa: E731
        return mem if steps(mem) >= steps(disk) else disk  # the longer history wins

    def save(self, budget: Budget) -> None:
        self.context.state["privacy"] = ConfigRecord({"budget": json.dumps(budget.to_json())})
        if self.file:
            self.file.save(budget)

    def update(self, change: Callable[[Budget], Budget]) -> Budget:
        # no lock: one simulated client runs one round at a time, and each run has its own file
        new = change(self.load())
        self.save(new)
        return new


def device_state_dir(node: Any) -> Path | None:
    """A device's own state folder (``state-dir``, default ``<data-dir>/fedrec-state``); None in
    simulation, where clients have no folder of their own. ``state-dir`` without ``data-dir``
    is refused: a node with a state folder keeps a device's record, and only a device (a node
    with ``data-dir``) gets the device's checks (``client.app.device_guard``)."""
    if "state-dir" in node and "data-dir" not in node:
        raise ValueError(
            "node config has state-dir but no data-dir: state-dir is a device's option (where "
            "it keeps its privacy record); start the SuperNode with --node-config "
            "\"data-dir='/path/to/data' state-dir='/path/to/state'\", or without state-dir"
        )
    if "state-dir" in node:
        return Path(str(node["state-dir"]))
    if "data-dir" in node:
        return Path(str(node["data-dir"])) / "fedrec-state"
    return None


def budget_store(context: Context, name: str, extra: dict[str, Any]) -> BudgetStore:
    """This client's store: a device's file, a simulated client's Context.state, or memory."""
    node = context.node_config
    state = device_state_dir(node)
    if state is not None:
        # A device: its budget lives in a file on the device (default: next to its data), so a
        # restarted SuperNode, or a new run, continues the same history instead of restarting
        # from zero. The budget is the device's, across all runs.
        return FileStore(state / "privacy-budget.json", quiet=True)
    run_dir = extra.get("run-dir")
    file = Path(str(run_dir)) / "privacy" / "clients" / f"{name}.json" if run_dir else None
    if "partition-id" in node:
        return ContextStore(context, file)
    return MemoryStore()


# A user-level entry of a trusted-server round: its Gaussian noise multiplier (noise std on the
# clipped sum over the clip), instead of a secure round's Skellam fields.
GAUSSIAN_Z = "gaussian_z"
# A user-level entry's field: the colluders its plan assumed, counted in the whole population
# and all placed in the cohort (the rule since 2026-12-03). Entries without it are older.
POPULATION_COLLUDERS = "population_colluders"


def _number(e: dict[str, Any], k: str) -> float:
    v = e[k]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"release entry field {k!r} is not a number: {v!r}")
    return float(v)


def _ledger_entry(e: Any) -> dict[str, float]:
    """One release entry of ``user-level-budget.json``, checked: a secure round's Skellam
    ``mu_total``, ``l1``, ``l2``, ``risk`` (and ``population_colluders`` since 2026-12-03), or a
    trusted-server round's ``gaussian_z``. ValueError, KeyError or TypeError for anything that
    could lower the epsilon (a NaN would make it 0)."""
    if not isinstance(e, dict):
        raise TypeError(f"release entry {e!r} is a JSON {_json_type(e)}, not an object")
    if GAUSSIAN_Z in e:
        z = _number(e, GAUSSIAN_Z)
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"entry {e}: {GAUSSIAN_Z} {z} is not finite and positive")
        return {GAUSSIAN_Z: z, "risk": 0.0}
    out = {k: _number(e, k) for k in ("mu_total", "l1", "l2", "risk")}
    if POPULATION_COLLUDERS in e:  # absent: written under the per-cohort rule
        c = e[POPULATION_COLLUDERS]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
            raise ValueError(f"release entry field {POPULATION_COLLUDERS!r} is not a count: {c!r}")
        out[POPULATION_COLLUDERS] = float(c)
    if not all(math.isfinite(v) and v >= 0 for v in out.values()) or out["mu_total"] <= 0:
        raise ValueError(f"entry {out} is not finite and positive")
    if out["risk"] >= 1:  # a probability (a share of delta), never 1 or more
        raise ValueError(f"entry {out}: risk {out['risk']} is not a probability below 1")
    return out


def composed_record_epsilon(entries: list[dict[str, Any]], delta: float) -> float:
    """The epsilon of a device record's release entries at ``delta`` minus their collusion
    risks (``risk``): Skellam entries (``mu_total``, ``l1``, ``l2``) and Gaussian ones
    (:data:`GAUSSIAN_Z`) composed at the RDP level, the larger of Theorem 3.5's bound and the
    numerically computed curves (as a run's statement claims; the Gaussian rounds' RDP is
    exact and the same in both). 0 for no entry; ``inf`` when the risks use up ``delta``."""
    from fedrec.shared.privacy import skellam

    if not entries:
        return 0.0
    rest = delta - sum(e["risk"] for e in entries)
    if not rest > 0:
        return math.inf
    sk = [e for e in entries if GAUSSIAN_Z not in e]
    zs = [e[GAUSSIAN_Z] for e in entries if GAUSSIAN_Z in e]
    return max(
        skellam.composed_epsilon([(e["mu_total"], e["l1"], e["l2"]) for e in sk], rest, zs),
        skellam.composed_epsilon_independent([(e["mu_total"], e["l2"]) for e in sk], rest, zs),
    )


@dataclass
class UserLevelLedger:
    """A device's record of the user-level releases it took part in, across runs: one entry per
    trusted-server round it sent an update in (the Gaussian noise multiplier the run config
    gives the server, ``gaussian_z``: RDP alpha / 2z^2 for the round, no sampling amplification),
    and one per secure round it sent a masked input in, with that round's a-priori noise (the plan's
    ``mu_total``: what a round keeps with only the minimum survivors, so the entry does not
    depend on the server's report of who survived), the integer sensitivities, and the round's
    share of its run's collusion risk. Kept in ``<state>/user-level-budget.json`` next to
    ``privacy-budget.json`` (local DP), replaced atomically.

    Its epsilon composes the entries' Skellam RDP bounds (Agarwal, Kairouz, Liu 2021, Theorem
    3.5; RDP adds up over releases) at ``delta`` minus the entries' collusion risks, and the
    entries' numerically computed RDP curves the same way, and takes the larger (as a run's
    statement does). Rounds the
    device did not join cost its user nothing under zero-out adjacency (the release does not
    depend on its data). Each entry counts the a-priori noise (the minimum survivors), so for
    the rounds it joined this is at least what the run's statement claims for them (which
    counts the survivors the rounds had), at most the run's budget for one run; and it keeps
    counting across runs, which no run's statement does. An entry is added under a lock on
    ``user-level-budget.json.lock``, with the cap checked again inside it, so two runs on one
    device at the same time neither lose an entry nor pass the cap together (Linux and macOS:
    on Windows there is no ``fcntl`` and no lock), as :meth:`FileStore.update` does for the
    local-DP budget."""

    path: Path

    def load(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text())
            if not isinstance(raw, dict):
                raise TypeError(f"the file holds a JSON {_json_type(raw)}, not an object")
            releases = raw["releases"]
            if not isinstance(releases, list):
                raise TypeError(f"'releases' is a JSON {_json_type(releases)}, not an array")
            entries = [_ledger_entry(e) for e in releases]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"user-level privacy record {self.path} is unreadable ({_why(err)}); refusing to "
                "train: a lost record would restart the device's user-level epsilon from zero. "
                "Restore it from a backup."
            ) from None
        return entries

    @staticmethod
    def per_cohort_rule(entries: list[dict[str, float]]) -> int:
        """How many ``entries`` were written before 2026-12-03, when a round's plan assumed its
        colluders were 5 % of its cohort (24 of 471) rather than 5 % of all clients, all in the
        cohort (48 of 943). Such an entry's ``mu_total`` counts the noise of more honest clients
        than today's rule does, so its epsilon is lower than today's rule gives; by how much
        needs the round's cohort and population, which the entry does not hold. Entries written
        since carry ``population_colluders``."""
        return sum(GAUSSIAN_Z not in e and POPULATION_COLLUDERS not in e for e in entries)

    @staticmethod
    def trusted(entries: list[dict[str, float]]) -> int:
        """How many ``entries`` are trusted-server rounds (Gaussian noise the server adds)."""
        return sum(GAUSSIAN_Z in e for e in entries)

    def epsilon(self, entries: list[dict[str, float]], delta: float) -> float:
        """The composed epsilon of ``entries`` at ``delta`` (minus their collusion risks)."""
        return composed_record_epsilon(entries, delta)

    def check_cap(
        self, entries: list[dict[str, float]], entry: dict[str, float], cap: float, delta: float
    ) -> None:
        """ValueError if ``entries`` plus ``entry`` compose past ``cap`` at ``delta``. The error
        (which reaches the server) says only that the cap refused; the figures go to the
        device's own log."""
        after = self.epsilon([*entries, entry], delta)
        if after > cap:
            _log.warning(
                "user-level epsilon would reach %.4g at delta %g with this round (%d earlier "
                "secure rounds in %s), above user-epsilon-max=%g: round refused",
                after,
                delta,
                len(entries),
                self.path,
                cap,
            )
            raise CapRefused

    def append(
        self, entry: dict[str, float], *, cap: float | None = None, delta: float = 0.0
    ) -> None:
        """Add ``entry``, durably. With ``cap``: under the same lock, refuse (ValueError, nothing
        written) if the record's epsilon at ``delta`` would pass it with this entry: another run
        on the device may have added entries since this round's first check."""
        with _locked(self.path):
            entries = self.load()
            if cap is not None:
                self.check_cap(entries, entry, cap, delta)
            _write_durably(self.path, {"releases": [*entries, entry]}, ".user-level-")


def trusted_round_record(
    node: Any, noise_multiplier: float
) -> tuple[UserLevelLedger, dict[str, float]] | None:
    """On a device, before it trains in a trusted-server user-level round: its user-level
    record and this round's entry (the Gaussian noise multiplier the run config gives), after
    refusing the round if the record's epsilon with it would pass ``user-epsilon-max`` (at
    ``user-delta-max``). None in simulation (no device folder). The caller appends the entry
    before the reply leaves (:meth:`UserLevelLedger.append`, the cap checked again there)."""
    state = device_state_dir(node)
    if state is None:
        return None
    entry = {GAUSSIAN_Z: float(noise_multiplier), "risk": 0.0}
    ledger = UserLevelLedger(state / "user-level-budget.json")
    with quiet_record():
        _ledger_entry(entry)  # a bad multiplier is the run config's error, never recorded
    check_round(ledger, entry, node)
    return ledger, entry


def check_round(ledger: UserLevelLedger, entry: dict[str, float], node: Any) -> None:
    """Before a device trains: refuse the round (:class:`CapRefused`) if ``ledger``'s epsilon
    with ``entry`` would pass the node's ``user-epsilon-max`` (at ``user-delta-max``); the
    device's log says when the record holds entries of the older per-cohort colluder rule,
    which the check understates. Errors as :func:`quiet_record` gives them."""
    caps = user_level_cap(node)
    if caps is None:
        return
    with quiet_record():
        entries = ledger.load()
        old = ledger.per_cohort_rule(entries)
        if old:
            _log.warning(
                "%d entries of %s were written under the per-cohort colluder rule (before "
                "2026-12-03): each counts more honest noise than today's rule, so the cap "
                "check below understates them by an amount the record cannot tell",
                old,
                ledger.path,
            )
        ledger.check_cap(entries, entry, *caps)


def append_round(ledger: UserLevelLedger, entry: dict[str, float], node: Any) -> None:
    """``entry`` added to ``ledger`` under its lock, the node's cap checked again there (another
    run on the device may have added rounds since the first check); errors as
    :func:`quiet_record` gives them."""
    caps = user_level_cap(node)
    with quiet_record():
        if caps is None:
            ledger.append(entry)
        else:
            ledger.append(entry, cap=caps[0], delta=caps[1])


def node_number(node: Any, key: str, *, below: float = math.inf) -> float | None:
    """``node[key]``, a device's cap or delta, as a finite number > 0 (and < ``below``); None
    when its node config has no ``key``. ValueError saying what to fix otherwise: a NaN cap or
    delta would never refuse."""
    if key not in node:
        return None
    raw = node[key]
    try:
        val = float(raw)
    except (TypeError, ValueError):
        val = math.nan
    if not (math.isfinite(val) and 0 < val < below):  # False for NaN
        want = "a finite number > 0" if below == math.inf else f"a number in (0, {below:g})"
        raise ValueError(f"node config {key}={raw!r} is not {want}: fix this device's node config")
    return val


def user_level_cap(node: Any) -> tuple[float, float] | None:
    """A device's user-level cap from its node config: ``(user-epsilon-max, user-delta-max)``,
    None without ``user-epsilon-max``. ValueError (saying what to fix) for a cap that is not a
    finite number > 0 (a NaN cap would never refuse) or one without ``user-delta-max`` (a cap
    read at a delta the server picks is no cap: a larger delta gives a smaller epsilon)."""
    cap = node_number(node, "user-epsilon-max")
    if cap is None:
        return None
    if "user-delta-max" not in node:
        raise ValueError(
            "node config sets user-epsilon-max without user-delta-max: the cap would be read "
            "at the delta the server asks for. Set user-delta-max too (e.g. 1e-4)"
        )
    delta = node_number(node, "user-delta-max", below=1.0)
    assert delta is not None
    return cap, delta


def local_epsilon(budget: Budget) -> float:
    """The local-DP epsilon of ``budget``'s history at its mechanism's delta (0 without one)."""
    from fedrec.shared.privacy.accounting import epsilon_spent

    mech = budget.mechanism
    if mech is None or not budget.history:
        return 0.0
    return epsilon_spent(
        history=budget.history,
        delta=float(mech["delta"]),
        accountant=str(mech["accountant"]),
        group=int(mech["group_size"]),
        adjacency=str(mech["adjacency"]),
    )


def device_budget(folder: Path, user_delta: float, delta: float | None = None) -> dict[str, Any]:
    """What a device has spent, from its own files (``fedrec deploy budget``): ``folder`` is
    its state folder, or its data folder holding ``fedrec-state/``; the per-interaction secure
    record read at ``delta`` (None: the ``delta-max`` the device last charged a round at), the
    user-level record at ``user_delta``. ValueError when there is no such folder or a file is
    unreadable."""
    state = folder / "fedrec-state" if (folder / "fedrec-state").is_dir() else folder
    if not state.is_dir():
        raise ValueError(f"{folder}: no such folder (give a device's state or data folder)")
    local_file = state / "privacy-budget.json"
    user_file = state / "user-level-budget.json"
    from fedrec.client import interaction_budget

    secure_file = state / interaction_budget.FILE
    if not local_file.exists() and not user_file.exists() and not secure_file.exists():
        raise ValueError(
            f"{state}: none of privacy-budget.json, {interaction_budget.FILE} and "
            "user-level-budget.json; a device writes them when it first trains (state-dir in "
            "its node config, default <data-dir>/fedrec-state)"
        )
    out: dict[str, Any] = {"state": str(state)}
    budget = FileStore(local_file).load()
    mech = budget.mechanism
    local: dict[str, Any] = {"steps": sum(int(n) for *_x, n in budget.history), "epsilon": 0.0}
    if mech is not None:
        local |= {
            "epsilon": local_epsilon(budget),
            "delta": float(mech["delta"]),
            "mechanism": mech,
        }
    local["epsilon_max"] = budget.epsilon_max
    secure = interaction_budget.summary(state, delta)
    if secure is not None:
        # one unit (an interaction), two records: basic composition, epsilons and deltas add
        # (the user-level rounds bound an interaction too; they are not in this sum)
        out["secure_interaction"] = secure
        out["per_interaction_total"] = {
            "epsilon": local["epsilon"] + secure["epsilon"],
            "delta": local.get("delta", 0.0) + secure["delta"],
            "epsilon_max": budget.epsilon_max,
        }
    ledger = UserLevelLedger(user_file)
    entries = ledger.load()
    out["local_dp"] = local
    trusted = ledger.trusted(entries)
    out["user_level"] = {
        "secure_rounds": len(entries) - trusted,
        "trusted_rounds": trusted,
        "delta": user_delta,
        "epsilon": ledger.epsilon(entries, user_delta),
        "per_cohort_rule_rounds": ledger.per_cohort_rule(entries),
    }
    return out
