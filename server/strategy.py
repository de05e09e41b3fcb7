"""fedrec's strategy: Flower's FedAvg with update checks, a privacy ledger and round offsets.

Subclasses ``flwr.serverapp.strategy.FedAvg`` (sampling, messages and the round loop stay
Flower's). What it adds:

- every reply is checked before aggregation: metrics only from the whitelist, tensors exactly
  the expected keys and shapes, finite (:func:`fedrec.shared.federation.params.check_update`);
  a bad reply is logged and dropped, the round goes on with the others;
- aggregation is an unweighted mean of the accepted clients' changes, applied by the server
  optimizer (:mod:`fedrec.shared.federation.server_opt`); each client weighs the same
  (weighting by example counts would make one user's influence depend on their data size).
  ``ffa``: only B travels, and averaging B with A fixed is exact;
  ``fedavg``: A and B are averaged separately (the product of the means is not the mean of the
  products; that inexactness is FedAvg-LoRA's known cost);
- fewer accepted replies than ``min-replies``: no aggregation, the global model is kept, and a
  log line says so;
- one ledger line per client per round in ``RUN/privacy/ledger.jsonl``, also for a
  client that refused because of its budget (``trained: false``);
- ``round_offset`` numbers rounds after a resumed checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrec.shared.federation import contract
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.contract import EVAL_METRICS, TRAIN_METRICS
from fedrec.shared.federation.params import (
    UpdateError,
    change_norm,
    check_update,
    decode_array,
    from_record,
    to_record,
)
from fedrec.shared.federation.segments import (
    combine_tables,
    load_segment_meta,
    load_segment_sum,
    n_segments,
    parse_fields,
    save_segment_sum,
    trimmed_count,
)
from fedrec.shared.federation.server_opt import ServerOptimizer
from fedrec.shared.privacy.calibration import planned_release

log = logging.getLogger("fedrec.server")


FAILURE_KINDS = ("out-of-memory", "timeout", "exception")
FAILURE_HINTS = {
    "out-of-memory": "lower physical-batch (examples per forward/backward pass), or give each "
    "client more memory (simulation: fewer Ray actors per core)",
    "timeout": "raise round-timeout, or lower local-steps or expected-batch",
}
_OOM = (
    "outofmemory",
    "out of memory",
    "low on memory",
    "memory usage threshold",
    "memoryerror",
    "cannot allocate memory",
    "can't allocate memory",
    "oom killer",
)


def failure_kind(reason: str) -> str:
    """Why a client's reply is an error, from Flower's error reason: ``out-of-memory`` (Ray's
    memory monitor killed the actor, the kernel's OOM killer, or an allocation failed),
    ``timeout``, or ``exception`` (anything else the ClientApp raised)."""
    text = reason.lower()
    if any(p in text for p in _OOM):
        return "out-of-memory"
    if any(p in text for p in ("timeouterror", "timed out", "deadline exceeded")):
        return "timeout"
    return "exception"


def failure_note(kinds: dict[str, int], silent: int, timeout: float) -> str:
    """One sentence for the ledger: how many sampled clients are missing from the round, why,
    and what to do."""
    parts = [f"{n} failed: {k}" for k, n in kinds.items() if n]
    if silent:
        parts.append(f"{silent} sent nothing within round-timeout={timeout}s")
    hints = [FAILURE_HINTS[k] for k, n in kinds.items() if n and k in FAILURE_HINTS]
    if silent and "timeout" not in [k for k, n in kinds.items() if n]:
        hints.append(FAILURE_HINTS["timeout"])
    return (
        f"{sum(kinds.values()) + silent} sampled client(s) are not on this round's ledger "
        f"({'; '.join(parts)}); if they trained, their own budget files have it"
        + (f". Hint: {'; '.join(hints)}" if hints else "")
    )


class FedRecStrategy(FedAvg):
    def __init__(
        self,
        cfg: FedConfig,
        *,
        template: dict[str, torch.Tensor],
        ledger: Path,
        round_offset: int = 0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_replies,
            min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=cfg.min_replies,
            weighted_by_key="num-examples",
        )
        self.cfg = cfg
        self.template = template
        self.ledger = ledger
        self._sent: dict[int, int] = {}  # round -> messages sent (to count silent clients)
        self.round_offset = round_offset
        self.on_round = on_round
        self.current: dict[str, torch.Tensor] = dict(template)
        self.optimizer = ServerOptimizer(
            cfg.server_opt, cfg.server_lr, final=cfg.server_lr_final, rounds=cfg.num_rounds
        )
        self.rounds: list[dict[str, Any]] = []
        # user-level DP (fedrec.server.user_dp): divide the sum of changes by the round's sample
        # size instead of the number accepted; failures the wrapper took out; pre-clip norms
        self.fixed_denominator: int | None = None
        self.extra_failures: list[str] = []  # error reasons of failed replies the wrapper removed
        # user-level DP with a trusted server: the Gaussian mechanism applied to the mean change
        # (clipped sum / fixed denominator) before the server optimizer sees it
        self.mean_noise: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
        # per-interaction DP with the noise at the server (fedrec.server.interaction_dp): an
        # over-norm update is always scaled down, and the std of the noise each round received
        self.clip_only = False
        self.round_noise_std: float | None = None
        self._names: dict[str, int] = {}  # client name -> the node id that first used it
        # the most test queries a federated evaluation reply may count (set by the ServerApp
        # from the split it holds; None = not known, e.g. a deployment)
        self.max_queries: int | None = None
        self.federated_eval: dict[int, dict[str, float]] = {}
        # segment-prior: the combination of the segment-count tables accepted (None before
        # any: their sum, or under robust aggregation their cell-by-cell trimmed mean or median
        # times their number), how many, and where it is kept (RUN/segment_counts.npz, so a
        # resumed run has it); n_items is the catalog's size (set by the ServerApp; None: not
        # checked)
        self.segment_sum: np.ndarray | None = None
        self.segment_tables = 0
        # the combination's DP noise variance in units of one table's (None: the number of
        # tables, a sum; more for a robust combination: segments.combine_variance), how it was
        # combined and how many values of each cell it dropped at each end (0: a sum)
        self.segment_noise_tables: float | None = None
        self.segment_combined = "none"
        self.segment_trimmed = 0
        self.n_items: int | None = None
        # the most interactions a cell of a client's table can count (segment-cell-max; None:
        # only SEGMENT_CELL_MAX); under DP the noise's margin is added (segment_table)
        self.segment_cell_max = cfg.segment_cell_max if cfg.segment_cell_max > 0 else None
        self.segment_file = ledger.parent.parent / "segment_counts.npz"
        if cfg.segment_prior and round_offset > 0 and self.segment_file.is_file():
            # a resumed run: round 1's combined table was kept (a fresh run never reads an old
            # file); a file from before the combination was recorded holds a sum
            self.segment_sum, self.segment_tables = load_segment_sum(self.segment_file)
            meta = load_segment_meta(self.segment_file)
            self.segment_noise_tables = meta.noise_tables
            self.segment_combined, self.segment_trimmed = meta.combined, meta.trimmed
        elif round_offset == 0:
            self.segment_file.unlink(missing_ok=True)

    def summary(self) -> None:
        log.info(
            "fedrec strategy: aggregator=%s, fraction-train=%s, min-replies=%d, dp=%s",
            self.cfg.aggregator,
            self.cfg.fraction_train,
            self.cfg.min_replies,
            self.cfg.dp,
        )

    # --- train -----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = from_record(arrays)
        messages = list(
            super().configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        self._sent[server_round + self.round_offset] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        replies = list(replies)
        accepted: list[dict[str, torch.Tensor]] = []
        losses, eps, refused, rejected, seconds = [], [], 0, 0, []
        # failures the user-level DP wrapper took out before this call (not silent ones)
        removed = len(self.extra_failures)
        failures = [failure_kind(r) for r in self.extra_failures]
        self.extra_failures = []
        lines: list[dict[str, Any]] = []
        # the accepted replies' segment-count tables: kept for a robust combination, else summed
        tables: list[np.ndarray] = []
        summed: np.ndarray | None = None
        n_tables = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                kind = failure_kind(msg.error.reason or "")
                failures.append(kind)
                log.warning(
                    "round %d: client node %d failed (%s): %s%s",
                    rnd,
                    node,
                    kind,
                    msg.error.reason,
                    f". Hint: {FAILURE_HINTS[kind]}" if kind in FAILURE_HINTS else "",
                )
                continue
            try:
                name, metrics = self._check_reply(msg, TRAIN_METRICS)
            except UpdateError as err:
                rejected += 1
                log.warning("round %d: reply from node %d rejected: %s", rnd, node, err)
                # A rejected reply may still report spent budget: the ledger must show it.
                salvaged = self._salvage(msg, rnd)
                if salvaged is not None:
                    lines.append(salvaged)
                continue
            trained = bool(metrics.get("trained", 0))
            line = (
                self._ledger_line(name, rnd, metrics, trained)
                | _history_field(msg)
                | self._release_field(msg)
                if self.cfg.dp
                else None
            )
            # the reply's segment counts are checked now; the table and the update stand or
            # fall together (a bad table, e.g. beyond segment-cell-max, is not an honest
            # release: the whole reply is rejected; a rejected update adds no counts)
            table = (
                self._segment_table(msg, rnd, trained) if contract.SEGMENTS in msg.content else None
            )
            if isinstance(table, str):
                rejected += 1
                log.warning(
                    "round %d: reply from %s (node %d) rejected, its segment counts: %s",
                    rnd,
                    name,
                    node,
                    table,
                )
                if line is not None:  # it trained and released, so it spent budget
                    lines.append(line | {"accepted": False})
                continue
            if trained:
                try:
                    arrays = _record(msg, contract.ARRAYS, ArrayRecord)
                    if arrays is None:
                        raise UpdateError("trained=1 but no 'arrays' record")
                    update = self._bounded(check_update(from_record(arrays), self.template))
                except UpdateError as err:
                    rejected += 1
                    log.warning(
                        "round %d: update from %s (node %d) rejected: %s", rnd, name, node, err
                    )
                    if line is not None:  # it trained, so it spent budget: on the ledger
                        lines.append(line | {"accepted": False})
                    continue
                accepted.append(update)
                if table is not None:
                    if self.cfg.robust == "none":  # a sum keeps only its running total
                        summed = table if summed is None else summed + table
                        n_tables += 1
                    else:
                        tables.append(table)
                if not (self.cfg.dp or self.cfg.user_dp):  # under DP clients send constants
                    losses.append(float(metrics["loss"]))
                    seconds.append(float(metrics.get("seconds", 0.0)))
            else:
                refused += 1
                client = _record(msg, contract.CLIENT, ConfigRecord)
                reason = str(client.get("reason", "")) if client is not None else ""
                log.info("round %d: %s did not train: %s", rnd, name, reason)
            if line is not None:
                eps.append(float(metrics["epsilon"]))
                lines.append(line)
        silent = max(0, self._sent.get(rnd, len(replies)) - len(replies) - removed)
        failed = len(failures)
        kinds = {k: failures.count(k) for k in FAILURE_KINDS}
        if self.cfg.dp and (failed or silent):
            # the ledger says which clients it cannot show: failed and silent ones are not on it
            note = failure_note(kinds, silent, self.cfg.round_timeout)
            lines.append({"round": rnd, "note": note})
        self._append_ledger(lines)
        if tables or summed is not None:  # only in round 1 (_segment_table refuses any other)
            self._combine_segments(rnd, tables, summed, n_tables)
        if silent:
            log.warning(
                "round %d: %d sampled client(s) did not reply within round-timeout=%ss: their "
                "updates are lost and, if they trained, their spending is not on this round's "
                "ledger (their own budget files have it; `fedrec audit` reports the gap at their "
                "next reply)",
                rnd,
                silent,
                self.cfg.round_timeout,
            )
        info: dict[str, Any] = {
            "round": rnd,
            "sent": self._sent.get(rnd, len(replies)),
            "no_reply": silent,
            "replies": len(replies),
            "accepted": len(accepted),
            "refused": refused,
            "rejected": rejected,
            "failed": failed,
            # why replies were errors (they sum to "failed"; "no_reply" are the clients that
            # sent nothing within round-timeout)
            **{f"failed_{k.replace('-', '_')}": n for k, n in kinds.items()},
            "loss": statistics.fmean(losses) if losses else None,
            "epsilon_max": max(eps) if eps else 0.0,
            "epsilon_median": statistics.median(eps) if eps else 0.0,
            "client_seconds_median": statistics.median(seconds) if seconds else None,
        }
        # every accepted client's change, stacked once per tensor: (n_accepted, *shape)
        changes = (
            {k: torch.stack([u[k] for u in accepted]) - g for k, g in self.current.items()}
            if accepted
            else {}
        )
        # the clients' update norms are not released under DP (they are not noised)
        private = self.cfg.dp or self.cfg.user_dp
        info["update_norm_median"] = None if private else _median_norm(changes)
        new = None
        if len(accepted) < self.cfg.min_replies:
            log.warning(
                "round %d: %d accepted update(s) < min-replies=%d: aggregation skipped, "
                "global model unchanged",
                rnd,
                len(accepted),
                self.cfg.min_replies,
            )
            info["aggregated"] = False
        else:
            self.round_noise_std = None
            new = self._mean_step(changes, rnd)
            if self.cfg.dp_noise == "server":
                if self.round_noise_std is None:  # never release an un-noised sum
                    raise RuntimeError(
                        f"round {rnd}: dp-noise=server but the server added no noise to the sum "
                        "of the changes; nothing is released"
                    )
                info["server_noise_std"] = self.round_noise_std
            self.current = new
            info["aggregated"] = True
        self.rounds.append(info)
        if self.on_round is not None:
            self.on_round(info)
        metrics_out = MetricRecord(
            {
                k: float(v)
                for k, v in info.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        return (to_record(new) if new is not None else None), metrics_out

    def _check_reply(self, msg: Message, allowed: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        content = msg.content
        record = _record(msg, contract.METRICS, MetricRecord)
        if record is None:
            raise UpdateError("no 'metrics' record")
        metrics = dict(record)
        extra = set(metrics) - set(allowed)
        if extra:
            raise UpdateError(f"metrics outside the whitelist: {sorted(extra)}")
        missing = set(allowed) - set(metrics)
        if missing:
            raise UpdateError(f"required metric(s) missing: {sorted(missing)}")
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UpdateError(f"metric '{k}' = {v!r} is not a finite number")
            problem = self._metric_range(k, float(v), metrics)
            if problem:
                raise UpdateError(f"metric '{k}' = {v!r} {problem}")
        unknown = set(content.keys()) - contract.REPLY_RECORDS
        if unknown:
            raise UpdateError(f"unexpected record(s) {sorted(unknown)}")
        return self._identity(msg), metrics

    def _metric_range(self, key: str, v: float, metrics: dict[str, Any]) -> str | None:
        """What is wrong with a finite metric value for what the server knows, or None."""
        whole = v == int(v)
        if key in ("trained",) and v not in (0, 1):
            return "is not 0 or 1"
        if key == "steps" and not (whole and 0 <= v <= self.cfg.local_steps):
            return f"is not a whole number of steps in [0, local-steps={self.cfg.local_steps}]"
        if key == "total-steps" and not (whole and v >= 0):
            return "is not a whole number >= 0"
        if key == "total-steps" and self.cfg.dp and v < float(metrics.get("steps", 0)):
            return "is below this round's steps (a DP client's history holds them)"
        if key in ("num-examples", "num-queries") and not (whole and 0 <= v <= 1e9):
            return "is not a whole count in [0, 1e9]"
        if key == "num-queries" and self.max_queries is not None and v > self.max_queries:
            return f"exceeds the {self.max_queries} test queries this run has"
        if key == "sample-rate" and not 0 <= v <= 1:
            return "is not in [0, 1]"
        if key in ("epsilon", "noise-multiplier", "seconds") and v < 0:
            return "is negative"
        if key in ("HR@10", "NDCG@10") and not 0 <= v <= 1:
            return "is not in [0, 1]"
        return None

    def _identity(self, msg: Message) -> str:
        """The reply's client name, bound to the Flower node that first used it in this run.

        The name is what the client reports (``p<partition>`` in simulation, ``client-id`` or
        the data folder's name on a device); a name already bound to another node id is a
        forgery (or a misconfigured device) and the reply is rejected: one client cannot write
        ledger lines under another's name."""
        node = int(msg.metadata.src_node_id)
        name = _client_name(msg)
        if len(name) > 128 or not name.isprintable():
            raise UpdateError(
                f"client name {name[:40]!r}... is not a printable name of <= 128 chars"
            )
        bound = self._names.setdefault(name, node)
        if bound != node:
            raise UpdateError(
                f"client name {name!r} belongs to node {bound} in this run, not node {node}: "
                "two nodes cannot share a name (set a distinct client-id in each node config)"
            )
        return name

    def _bounded(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``update`` whose change to the current global tensors has L2 norm at most
        ``update-norm-max``: larger ones are refused, or scaled down with
        ``update-norm-action=clip``."""
        norm = change_norm(update, self.current)
        limit = self.cfg.update_norm_max
        if norm <= limit:
            return update
        if self.cfg.update_norm_action == "reject" and not self.clip_only:
            raise UpdateError(
                f"its change has L2 norm {norm:.4g} > update-norm-max={limit:g} (raise it, or "
                "set update-norm-action=clip to scale such changes down)"
            )
        if self.clip_only:  # dp-noise=server: the change is un-noised, its norm is not logged
            log.warning("an update's change scaled down to update-norm-max=%g", limit)
        else:
            log.warning(
                "an update's change of L2 norm %.4g clipped to update-norm-max=%g", norm, limit
            )
        scale = limit / norm
        return {k: self.current[k] + (u - self.current[k]) * scale for k, u in update.items()}

    def _mean_step(self, changes: dict[str, torch.Tensor], rnd: int) -> dict[str, torch.Tensor]:
        """The server optimizer applied to mean_k(update_k - global), per tensor; ``changes``
        holds each tensor's stacked client changes, shape ``(n_accepted, *shape)``.

        With a fixed denominator (user-level DP) the sum of changes is divided by the round's
        sample size: clients that sent no accepted update count as a zero change; with
        ``mean_noise`` set (user-level DP, trusted server) that mean is noised before the
        optimizer, so any server optimizer is post-processing of the released noisy mean."""
        n = self.fixed_denominator or next(iter(changes.values())).shape[0]
        if self.cfg.robust == "none" or self.fixed_denominator:
            delta = {k: c.sum(0) / n for k, c in changes.items()}
        else:
            delta = {k: robust_mean(c, self.cfg.robust, self.cfg.trim_fraction)
                     for k, c in changes.items()}  # fmt: skip
        if self.mean_noise is not None:
            delta = self.mean_noise(delta)
        return self.optimizer.step(self.current, delta, rnd)

    def _salvage(self, msg: Message, rnd: int) -> dict[str, Any] | None:
        """The ledger line of a rejected reply whose privacy fields are still readable."""
        record = _record(msg, contract.METRICS, MetricRecord)
        if not self.cfg.dp or record is None:
            return None
        m = dict(record)
        keys = ("epsilon", "steps", "noise-multiplier", "sample-rate", "trained")
        if not all(isinstance(m.get(k), (int, float)) and m[k] == m[k] for k in keys):
            return None
        if not all(math.isfinite(float(m[k])) for k in keys):
            return None
        try:
            name = self._identity(msg)
        except UpdateError:
            name = f"n{msg.metadata.src_node_id}"  # never under another client's name
        line = self._ledger_line(name, rnd, m, bool(m["trained"]))
        return line | _history_field(msg) | self._release_field(msg) | {"accepted": False}

    def _release_field(self, msg: Message) -> dict[str, Any]:
        """``{"release": [sigma, 1.0, 1]}`` when the reply carries segment counts under local DP:
        the run the client charged for them (the config's, :func:`planned_release`), whatever
        the server then does with the table."""
        release = planned_release(self.cfg)
        if release is None or contract.SEGMENTS not in msg.content:
            return {}
        return {"release": [float(release[0]), float(release[1]), int(release[2])]}

    def _combine_segments(
        self, rnd: int, tables: list[np.ndarray], summed: np.ndarray | None, n_summed: int
    ) -> None:
        """Round 1's accepted tables combined and kept in RUN/segment_counts.npz: ``summed``
        (their running sum, ``n_summed`` of them) with robust=none, else ``tables`` combined
        cell by cell as the model's changes are."""
        how = self.cfg.robust
        n = n_summed if how == "none" else len(tables)
        k = trimmed_count(n, how, self.cfg.trim_fraction)
        if how == "none":
            assert summed is not None
            total, var = summed, float(n)
        else:
            total, var = combine_tables(tables, how, self.cfg.trim_fraction)
            if k == 0:
                log.warning(
                    "round %d: robust=%s over %d segment tables drops nothing (trim-fraction "
                    "%s): the tables are summed, and one client can move every cell",
                    rnd,
                    how,
                    n,
                    self.cfg.trim_fraction,
                )
        self.segment_sum, self.segment_noise_tables = total, var
        self.segment_tables, self.segment_combined, self.segment_trimmed = n, how, k
        save_segment_sum(self.segment_file, total, n, noise_tables=var, combined=how, trimmed=k)

    def _segment_table(self, msg: Message, rnd: int, trained: bool) -> np.ndarray | str:
        """The reply's segment-count table, or what is wrong with it."""
        if not self.cfg.segment_prior:
            return "this run has no segment-prior"
        if rnd != contract.SEGMENT_ROUND or not trained:
            return f"sent in round {rnd} (trained={trained}); only round {contract.SEGMENT_ROUND}'s"
        return segment_table(
            _record(msg, contract.SEGMENTS, ArrayRecord),
            self.cfg,
            self.n_items,
            cell_max=self.segment_cell_max,
        )

    def _ledger_line(
        self, name: str, rnd: int, metrics: dict[str, Any], trained: bool
    ) -> dict[str, Any]:
        return {
            "client": name,
            "round": rnd,
            "trained": trained,
            "steps": int(metrics.get("steps", 0)),
            # the client's whole-history step count: lets `fedrec audit` find missing rounds
            "total_steps": int(metrics.get("total-steps", -1)),
            "sample_rate": float(metrics["sample-rate"]),
            "noise_multiplier": float(metrics["noise-multiplier"]),
            # who added that noise: the client ("client") or the trusted server ("server")
            "noise_at": self.cfg.dp_noise,
            "max_grad_norm": self.cfg.max_grad_norm,
            "delta": self.cfg.delta,
            "accountant": self.cfg.accountant,
            # what one interaction does to the examples: epsilon_after is for this adjacency
            "adjacency": self.cfg.dp_adjacency(),
            "group_size": self.cfg.dp_group(),
            "epsilon_after": float(metrics["epsilon"]),
            "epsilon_max": self.cfg.epsilon,
            "accepted": trained,
        }

    def _append_ledger(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a") as f:
            for line in sorted(lines, key=lambda x: (x.get("client") is None, x.get("client", ""))):
                f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()

    # --- evaluate --------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        last = server_round + self.round_offset >= self.cfg.num_rounds
        if self.cfg.fraction_evaluate <= 0 or not last:
            return []
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        total: dict[str, float] = {"HR@10": 0.0, "NDCG@10": 0.0}
        n = 0
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "federated evaluation: node %d failed: %s",
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            try:
                _, m = self._check_reply(msg, EVAL_METRICS)
            except UpdateError as err:
                log.warning("federated evaluation: reply rejected: %s", err)
                continue
            k = int(m.get("num-queries", 0))
            n += k
            for key in total:
                total[key] += k * float(m.get(key, 0.0))
        if n == 0:
            return None
        result: dict[str, int | float] = {key: v / n for key, v in total.items()}
        result["num-queries"] = float(n)
        self.federated_eval[server_round + self.round_offset] = dict(result)
        return MetricRecord(dict(result.items()))


def robust_mean(stacked: torch.Tensor, how: str, trim: float) -> torch.Tensor:
    """Per-coordinate combination of ``stacked`` changes ``(n, *shape)``: the median, or the
    mean after dropping the ``floor(trim * n)`` largest and smallest values (the median when
    that would drop everything)."""
    n = stacked.shape[0]
    k = int(trim * n)
    if how == "median" or n - 2 * k < 1:
        return (
            stacked.median(0).values
            if n % 2
            else stacked.sort(0).values[n // 2 - 1 : n // 2 + 1].mean(0)
        )
    ordered = stacked.sort(0).values
    return ordered[k : n - k].mean(0)


def _median_norm(changes: dict[str, torch.Tensor]) -> float | None:
    """Median L2 norm of the clients' whole changes (what user-level DP's ``user-clip`` would
    clip); ``changes`` as in :meth:`FedRecStrategy._mean_step`. Runs without DP only."""
    if not changes:
        return None
    per_tensor = [c.double().pow(2).reshape(len(c), -1).sum(1) for c in changes.values()]
    sq = torch.stack(per_tensor).sum(0)  # (n_accepted,): squared norm of each whole change
    return statistics.median(sq.sqrt().tolist())


SEGMENT_CELL_MAX = 1e12  # a count table's cell beyond this is not a count (and could overflow)


# an honest table's cell is its count plus Gaussian noise of std segment-noise: beyond this many
# standard deviations (probability about 1.5e-23 a cell) it is not an honest release
SEGMENT_NOISE_MARGIN = 10.0


def segment_table(
    record: Any, cfg: FedConfig, n_items: int | None, *, cell_max: float | None = None
) -> np.ndarray | str:
    """A reply's segment-count record as a table, or what is wrong with it: one float64 array
    ``counts`` of shape (segments, catalog items) holding whole numbers (noised and rounded
    under DP, exact and >= 0 without), each within :data:`SEGMENT_CELL_MAX` and, with
    ``cell_max`` (the most interactions one cell can count), within ``cell_max`` plus, under
    DP, :data:`SEGMENT_NOISE_MARGIN` noise standard deviations (and above minus that margin)."""
    if not isinstance(record, ArrayRecord) or set(record.keys()) != {"counts"}:
        return "not an array record holding exactly 'counts'"
    try:
        table = decode_array("counts", record["counts"])
    except Exception as err:  # noqa: BLE001 - a client's bytes: any failure is a rejection
        return f"unreadable: {type(err).__name__}: {err}"
    if table.dtype != np.float64:
        return f"dtype {table.dtype}, expected float64"
    want = n_segments(parse_fields(cfg.segment_prior))
    if (
        table.ndim != 2
        or table.shape[0] != want
        or (n_items is not None and table.shape[1] != n_items)
    ):
        return f"shape {table.shape}, expected ({want}, {n_items or 'catalog items'})"
    if not np.isfinite(table).all() or (np.abs(table) > SEGMENT_CELL_MAX).any():
        return f"not every count is finite and within {SEGMENT_CELL_MAX:g}"
    if (table != np.round(table)).any():
        return "not every count is a whole number (counts are released rounded)"
    if not cfg.dp and (table < 0).any():
        return "without DP the counts must be >= 0"
    if cell_max is not None:
        margin = SEGMENT_NOISE_MARGIN * cfg.segment_noise if cfg.dp else 0.0
        high, low = float(table.max()), float(table.min())
        plus = f", plus {SEGMENT_NOISE_MARGIN:g} noise std" if margin else ""
        if high > cell_max + margin or low < -margin:
            return (
                f"a cell holds {high if high > cell_max + margin else low:g}, outside "
                f"[{-margin:g}, {cell_max + margin:g}] (segment-cell-max {cell_max:g} "
                f"interactions per cell{plus})"
            )
    return table


def _history_field(msg: Message) -> dict[str, Any]:
    """``{"history": [[sigma, q, steps], ...]}`` from a reply's client record, when well formed
    (the client's whole accountant history; the audit uses it for budget carried over from
    earlier runs on the same device). Malformed or absent: nothing."""
    client = _record(msg, contract.CLIENT, ConfigRecord)
    if client is None:
        return {}
    try:
        runs = json.loads(str(client.get("history", "")))
        hist = [[float(s), float(q), int(n)] for s, q, n in runs]
    except (ValueError, TypeError):
        return {}
    return {"history": hist}


def _client_name(msg: Message) -> str:
    """The client's self-reported name (``p<partition>`` in simulation), else its node id."""
    name = f"n{msg.metadata.src_node_id}"
    client = _record(msg, contract.CLIENT, ConfigRecord)
    if client is not None:
        name = str(client.get("name", name))
    return name


def _record(msg: Message, key: str, kind: type[Any]) -> Any:
    """The reply's record ``key`` if it is there and of type ``kind``, else None. (Reads the one
    record directly: ``RecordDict.config_records`` and friends rebuild a dict on every access,
    which was a third of the server's aggregation time with 1,000 replies.)"""
    content = msg.content
    if key not in content:
        return None
    record = content[key]
    return record if isinstance(record, kind) else None
