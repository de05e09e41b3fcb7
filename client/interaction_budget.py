"""A device's record of the per-interaction releases it made without a trusted server
(``dp-noise = secure``: its noise share inside a SecAgg+ sum), across runs.

Kept in ``<state>/interaction-secure-budget.json`` beside ``privacy-budget.json`` (local DP)
and ``user-level-budget.json`` (a user-level unit)::

    {"delta_max": 1e-05,
     "releases": [{"run": 7, "round": 1, "mu_total": ..., "l1": ..., "l2": ..., "risk": ...}]}

One entry per (run, round) the device sent a masked input in, written BEFORE it trains
(:func:`charge_round`), so a crash can only over-count. The entry holds the round's a-priori
noise from the run's plan (:func:`~fedrec.shared.privacy.secure_interaction.plan_interaction`,
which the device recomputes from the run config and whose noise it checked the server's
request against: the minimum survivors, the colluders and the device's own share taken out,
never the server's report of who survived), the integer sensitivities of the released sum, and
the round's share of the run's collusion risk (``collusion_risk / num_rounds``).

Its epsilon (:func:`record_epsilon`) composes the entries at the RDP level, the larger of
Theorem 3.5's bound and the numerically computed curves, at a delta minus the entries' risks.
The delta is the device's own ``delta-max`` (required for this mode on a device: a cap read at
a delta the server picks would be none); entries hold no delta, so runs at any delta up to
``delta-max`` compose (``delta_max`` in the file is the one the last round was charged at, for
``fedrec deploy budget``). For the ``num-rounds`` rounds of a run whose delta is ``delta-max``
this is the plan's a-priori epsilon, at least what the run's statement claims (which counts
the noise shares its released rounds had, and only released rounds); a run at a smaller delta
is stated there at the larger ``delta-max``. Every entry is for the same unit,
one interaction (the group of windows an interaction moves is inside each run's sensitivity;
the unit's exception, an interaction that is its user's only training interaction, depends on
each run's split, so the cross-run figure covers the interactions every run covered), and
entries of runs with other settings add up directly.

Against the local-DP history (``privacy-budget.json``) there is no common RDP curve (fedrec
converts its group and replace-one accounting at the (epsilon, delta) level, and PLD and PRV
have no curve), so the two compose by basic composition: the device's per-interaction
spending in these two kinds of round is ``(eps_local + eps_secure, delta_local +
delta-max)``. The user-level rounds a device joined (``user-level-budget.json``) bound each
interaction too and are not in that sum. One cap bounds it: the node's ``epsilon-max``
(required for this mode, as ``delta-max`` is; kept in ``privacy-budget.json`` too, as a
local-DP round keeps it). Once a record has entries, a local-DP round on the device needs
``delta-max`` to read it. Both files are changed under the lock of ``privacy-budget.json``
(:func:`fedrec.client.budget._locked`), so a local-DP round and a secure round on one device at
the same time neither lose a charge nor pass the cap together (Linux and macOS; on Windows
there is no ``fcntl`` and no lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrec.client.budget import (
    Budget,
    FileStore,
    _json_type,
    _ledger_entry,
    _locked,
    _why,
    _write_durably,
    composed_record_epsilon,
    local_epsilon,
    node_number,
)

_log = logging.getLogger(__name__)

FILE = "interaction-secure-budget.json"
FIELDS = ("mu_total", "l1", "l2", "risk")

# What a refused round tells the server: nothing about the device's record.
INTERACTION_CAP_REFUSAL = (
    "this device refuses the round: it would pass its per-interaction cap (epsilon-max, or the "
    "cap its privacy record keeps); the device's own log says by how much"
)
INTERACTION_RECORD_FAILURE = (
    "this device refuses the round: its per-interaction privacy record cannot be read or "
    "written, or does not allow this round (the device's own log says why)"
)


class InteractionCapRefused(ValueError):
    """The device's per-interaction cap refused a round."""

    def __init__(self) -> None:
        super().__init__(INTERACTION_CAP_REFUSAL)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Errors of the record reach the server as a constant; their text goes to the device's
    own log (the record's path, what is wrong, the figures)."""
    try:
        yield
    except InteractionCapRefused:
        raise
    except Exception as err:  # any text of these could name the record or its figures
        _log.warning("per-interaction privacy record: %s: %s", type(err).__name__, err)
        raise ValueError(INTERACTION_RECORD_FAILURE) from None


def _whole(e: dict[str, Any], k: str) -> int:
    v = e[k]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"release entry field {k!r} is not a whole number: {v!r}")
    return v


def parse_entry(e: Any) -> dict[str, Any]:
    """One release entry, checked: anything that could lower the epsilon (a NaN, a zero or
    negative noise, a negative sensitivity, a risk of 1 or more, a missing field) is refused."""
    if not isinstance(e, dict):
        raise TypeError(f"release entry {e!r} is a JSON {_json_type(e)}, not an object")
    out: dict[str, Any] = {"run": _whole(e, "run"), "round": _whole(e, "round")}
    # the Skellam fields as the user-level record checks them (every field present; the
    # interaction record has no Gaussian entries, so the fields are passed alone)
    out |= _ledger_entry({k: e[k] for k in FIELDS})
    if out["l2"] <= 0 or out["l1"] <= 0:
        raise ValueError(f"entry {out}: a sensitivity of 0 would make the release free")
    if out["round"] < 1:
        raise ValueError(f"entry {out}: round {out['round']} is not >= 1")
    return out


def load(path: Path) -> list[dict[str, Any]]:
    """The entries of the record at ``path`` (none when there is no file). ValueError for a
    file that cannot be read or could under-count (a lost record would restart the device's
    epsilon from zero)."""
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"the file holds a JSON {_json_type(raw)}, not an object")
        releases = raw["releases"]
        if not isinstance(releases, list):
            raise TypeError(f"'releases' is a JSON {_json_type(releases)}, not an array")
        entries = [parse_entry(e) for e in releases]
        keys = [(e["run"], e["round"]) for e in entries]
        if len(set(keys)) != len(keys):
            raise ValueError("two entries for one (run, round)")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"per-interaction privacy record {path} is unreadable ({_why(err)}); refusing to "
            "train: a lost record would restart the device's epsilon from zero. Restore it "
            "from a backup."
        ) from None
    return entries


def record_epsilon(entries: list[dict[str, Any]], delta: float) -> float:
    """The composed epsilon of ``entries`` at ``delta`` (module doc)."""
    return composed_record_epsilon(entries, delta)


def recorded_delta(path: Path) -> float | None:
    """The ``delta-max`` the device last charged a round at (kept in the record for
    ``fedrec deploy budget``; the device itself always reads its node config), or None."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        d = raw.get("delta_max") if isinstance(raw, dict) else None
    except (OSError, ValueError):
        return None  # load() says what is wrong with the file
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
        return None
    return float(d)


def node_caps(node: Any) -> tuple[float, float]:
    """``(epsilon-max, delta-max)`` from a device's node config, both required for this mode:
    a cap the server could set (a run's epsilon or delta) would be none. ValueError saying
    what to fix otherwise."""
    delta = node_delta(node)
    cap = node_number(node, "epsilon-max")
    if cap is None:
        raise ValueError(
            "this device's node config has no epsilon-max: per-interaction DP without a "
            "trusted server (dp-noise=secure) caps the device's record across runs at the "
            "owner's epsilon, not at one a run's config sets. Start the SuperNode with "
            '--node-config "... epsilon-max=8 delta-max=1e-5"'
        )
    return cap, delta


def node_delta(node: Any) -> float:
    """The delta a device reads its record at: its node config's ``delta-max``. Required: a cap
    read at a delta the server picks (a run's delta) would be no cap, since a larger delta
    gives a smaller epsilon. ValueError saying what to fix otherwise."""
    delta = node_number(node, "delta-max", below=1.0)
    if delta is None:
        raise ValueError(
            "this device's node config has no delta-max: per-interaction DP without a trusted "
            "server (dp-noise=secure) keeps a record across runs whose cap is read at the "
            'device\'s own delta. Start the SuperNode with --node-config "... delta-max=1e-5"'
        )
    return delta


def spent(state: Path, node: Any) -> float:
    """This device's secure per-interaction epsilon at its ``delta-max`` (0 without entries),
    for a local-DP round's cap check, which reads it under the lock of ``privacy-budget.json``.
    Errors as :func:`quiet` gives them (the record's path never reaches the server)."""
    with quiet():
        entries = load(state / FILE)
        return record_epsilon(entries, node_delta(node)) if entries else 0.0


def charge_round(node: Any, state: Path, cfg: Any, plan: Any, run: int, rnd: int) -> None:
    """Before a device trains in round ``rnd`` of run ``run`` under ``dp-noise = secure``:
    refuse the round, writing nothing, if the record holds this (run, round) or ``num-rounds``
    rounds of this run already, or if the device's local-DP epsilon plus the record's with
    this round (at the node's ``delta-max``) would pass the node's ``epsilon-max``; otherwise
    keep that cap in ``privacy-budget.json`` (as a local-DP round keeps it; before the entry)
    and add the round's entry durably. ``plan`` is the
    device's own :class:`InteractionPlan` for the request it checked. Errors reach the server
    as :data:`INTERACTION_CAP_REFUSAL` or :data:`INTERACTION_RECORD_FAILURE`."""
    entry = {
        "run": int(run),
        "round": int(rnd),
        "mu_total": float(plan.mu_total),
        "l1": float(plan.l1),
        "l2": float(plan.l2),
        "risk": float(plan.collusion_risk) / cfg.num_rounds,
    }
    local_path, path = state / "privacy-budget.json", state / FILE
    with quiet():
        parse_entry(entry)  # a bad plan is the run config's error, never recorded
        cap, delta = node_caps(node)
        with _locked(local_path):
            local = FileStore(local_path).load()  # no second lock: this one is held
            entries = load(path)
            mine = [e for e in entries if e["run"] == entry["run"]]
            if any(e["round"] == entry["round"] for e in mine):
                raise ValueError(f"run {run} round {rnd} is already recorded: not sent twice")
            if len(mine) >= cfg.num_rounds:
                raise ValueError(
                    f"run {run} has {len(mine)} recorded rounds, its noise is planned for "
                    f"num-rounds = {cfg.num_rounds}"
                )
            before_local = local_epsilon(local)
            after = record_epsilon([*entries, entry], delta)
            if not before_local + after <= cap:  # a NaN refuses
                _log.warning(
                    "per-interaction epsilon would reach %.4g (secure record %.4g at delta-max "
                    "%g with this round, %d earlier rounds in %s; local DP %.4g) above the cap "
                    "%g: round refused",
                    before_local + after,
                    after,
                    delta,
                    len(entries),
                    path,
                    before_local,
                    cap,
                )
                raise InteractionCapRefused
            if local.epsilon_max != cap:  # the owner's cap, kept as a local-DP round keeps it
                FileStore(local_path).save(Budget(local.history, local.mechanism, cap))
            _write_durably(
                path, {"delta_max": delta, "releases": [*entries, entry]}, ".interaction-"
            )


def summary(state: Path, delta: float | None) -> dict[str, Any] | None:
    """``fedrec deploy budget``'s block for this record at ``delta`` (None: the delta-max the
    device last charged a round at), or None without a record."""
    if not (state / FILE).exists():
        return None
    entries = load(state / FILE)
    if delta is None:
        delta = recorded_delta(state / FILE)
    if delta is None:
        raise ValueError(
            f"{state / FILE} does not say the device's delta-max: pass --delta (its node "
            "config's delta-max)"
        )
    return {
        "rounds": len(entries),
        "runs": len({e["run"] for e in entries}),
        "delta": delta,
        "risk": sum(e["risk"] for e in entries),
        "epsilon": record_epsilon(entries, delta),
    }
