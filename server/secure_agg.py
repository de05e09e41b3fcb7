"""User-level DP without a trusted server: SecAgg+ rounds carrying distributed Skellam noise.

``user-dp=true`` with ``secure-agg=true`` runs each round as four Message-API exchanges with the
round's cohort (sampled as Flower's FedAvg samples it, a fixed number of clients):

1. ``train.secagg_setup``: each client makes two fresh key pairs and sends the public halves.
2. ``train.secagg_share``: each client receives its SecAgg+ neighbours' public keys, Shamir-shares
   its self-mask seed and its masking key among them and sends the shares, encrypted for each
   neighbour (the server only routes ciphertexts).
3. ``train.secagg_masked``: each client receives its shares, trains on its own data, clips its
   whole change to ``user-clip`` (L2), rounds it to integers, adds its share of the Skellam
   noise, masks it and sends the masked vector (:mod:`fedrec.shared.federation.secagg`,
   :mod:`fedrec.shared.privacy.skellam`).
4. ``train.secagg_unmask``: each surviving client sends the shares the server needs to remove
   the masks: self-mask seed shares of survivors, masking-key shares of clients that dropped
   after step 2. The server reconstructs the modular sum of the survivors' noisy integer
   vectors, and nothing else; below the Shamir threshold or below the minimum number of
   survivors the round is not released.

The server decodes the sum, divides it by the cohort size (fixed denominator: a client that
dropped counts as a zero change, so one user's influence is ``user-clip / cohort``) and applies
the server optimizer; the noise is already in the sum, so any server optimizer is
post-processing.

Accounting (:mod:`fedrec.shared.privacy.skellam`): the released sum carries Skellam noise with
parameter ``mu`` times the number of noise shares in it. The claim counts only the shares of
survivors that are not assumed to collude with the server (``secagg-colluders`` of all
clients, all assumed to be in the cohort) and not the protected user's own share. Each
client's share is calibrated at the start
for the worst round the run accepts (``secagg-dropout`` of the cohort gone, colluders
subtracted), so that ``num-rounds`` releases spend at most (``user-epsilon``, ``user-delta``);
no amplification by client sampling is claimed (the server knows the cohort). Each round's
released noise is written to ``RUN/privacy/secagg.jsonl``; the run's epsilon uses the smallest
round's noise for every release (an over-count).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedrec.server.strategy import FedRecStrategy
from fedrec.shared.federation import contract
from fedrec.shared.federation.params import (
    UpdateError,
    flat_keys,
    to_record,
    unflatten,
)
from fedrec.shared.federation.secagg import BelowThreshold, SecAggError, SecAggServer
from fedrec.shared.privacy import skellam
from fedrec.shared.privacy.distributed import SecurePlan, honest_shares, read_rounds
from fedrec.shared.privacy.secure_interaction import InteractionPlan

log = logging.getLogger("fedrec.server")

SECAGG = "secagg"  # the ConfigRecord carrying a stage's protocol fields, both ways
MASKED = "masked"  # the masked vector's key in a masked-input reply's ARRAYS record
STAGES = ("secagg_setup", "secagg_share", "secagg_masked", "secagg_unmask")


def masked_request(got: list[tuple[int, bytes]], p: SecurePlan | InteractionPlan) -> dict[str, Any]:
    """The masked-input stage's request to one client: the share ciphertexts routed to it
    (``got``: sender, ciphertext) and the encoding and noise the plan sets, which the client
    checks against its own calibration (client/secure.py ``masked``)."""
    enc = p.encoding
    return {
        "src": [s for s, _ in got],
        "ct": [c for _, c in got],
        "clip": enc.clip,
        "scale": enc.scale,
        "dim": enc.dim,
        "cohort": p.cohort,
        "clients": p.clients,
        "beta": enc.beta,
        "mu": p.mu_client,
    }


class SecureUserDP:
    """Runs fedrec's rounds as SecAgg+ rounds; the inner strategy keeps the rounds' records,
    the identity binding, the reply checks and the server optimizer."""

    def __init__(
        self,
        inner: FedRecStrategy,
        plan: SecurePlan | InteractionPlan,
        *,
        log_path: Path,
        divisor: int | None = None,
    ) -> None:
        """``divisor``: what the decoded sum is divided by before the server optimizer; the
        cohort (user-level DP's fixed denominator) by default, 1 for ``dp-noise=secure`` (one
        DP-SGD step over the union of the clients' examples: the sum of their changes)."""
        self.inner, self.plan, self.log_path = inner, plan, log_path
        self.divisor = plan.cohort if divisor is None else int(divisor)
        self.keys = flat_keys(inner.template)
        # a resumed run continues the log: earlier rounds' releases still count
        self.records: list[dict[str, Any]] = read_rounds(log_path)
        self.stages: dict[str, dict[str, float]] = {}  # the current round's cost per stage
        self._started = 0.0

    # --- the round ---------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        result = Result()
        arrays = initial_arrays
        if evaluate_fn:
            evaluate_fn(0, arrays)
        for current in range(1, num_rounds + 1):
            t0 = time.perf_counter()
            new = self.round(grid, current, arrays, train_config, timeout)
            if new is not None:
                arrays = result.arrays = new
            log.info(
                "round %d: secure aggregation round took %.1f s",
                current + self.inner.round_offset,
                time.perf_counter() - t0,
            )
            if evaluate_fn:
                evaluate_fn(current, arrays)
        return result

    def round(
        self, grid: Grid, current: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> ArrayRecord | None:
        inner, p = self.inner, self.plan
        rnd = current + inner.round_offset
        train_msgs = {
            m.metadata.dst_node_id: m for m in inner.configure_train(current, arrays, config, grid)
        }
        cohort = list(train_msgs)
        if len(cohort) != p.cohort:
            raise RuntimeError(
                f"secure aggregation: round {rnd} sampled {len(cohort)} clients, but the noise "
                f"was calibrated for {p.cohort}; the number of connected clients changed. Stop "
                "the run and restart it with the right fraction-train."
            )
        server = SecAggServer(
            cohort,
            k=p.neighbours,
            threshold=p.threshold,
            bits=p.encoding.bits,
            dim=p.encoding.dim,
            min_survivors=p.min_survivors,
            seed=secrets.randbits(63),
        )
        common = {
            "round": rnd,
            "bits": p.encoding.bits,
            "threshold": server.threshold,
            "test-dropout": inner.cfg.secagg_test_dropout,  # simulation only ("" = none)
        }
        record: dict[str, Any] = {"round": rnd, "cohort": len(cohort), "released": False}
        self.stages = {}
        self._started = time.perf_counter()

        # 1. setup: public keys
        replies = self._exchange(grid, "secagg_setup", {n: {} for n in cohort}, common, timeout)
        keys: dict[int, tuple[bytes, bytes]] = {}
        for node, rec in replies.items():
            try:
                keys[node] = server.check_setup_reply(node, (rec.get("pk1"), rec.get("pk2")))
            except SecAggError as err:
                log.warning("round %d: node %d dropped at setup: %s", rnd, node, err)
        for node in server.equivalent_keys(keys):  # a key re-encoded from another node's
            log.warning("round %d: node %d dropped at setup: its key is another node's", rnd, node)
            del keys[node]
        record["setup"] = len(keys)

        # 2. share keys: encrypted Shamir shares, routed by the server
        payload: dict[int, dict[str, Any]] = {}
        for node in keys:
            try:
                group = server.group_keys_for(node, keys)
            except SecAggError as err:  # e.g. two nodes sent the same public key
                log.warning("round %d: setup keys refused (%s): round not released", rnd, err)
                return self._finish(rnd, record, None, [])
            if not group:  # its group has too few members left: out of the round
                continue
            ids = sorted(group)
            payload[node] = {
                "ids": ids,
                "pk1": [group[i][0] for i in ids],
                "pk2": [group[i][1] for i in ids],
            }
        replies = self._exchange(grid, "secagg_share", payload, common, timeout)
        outgoing: dict[int, list[tuple[int, bytes]]] = {}
        commits: dict[int, bytes] = {}
        for node, rec in replies.items():
            dsts, cts, commit = rec.get("dst", []), rec.get("ct", []), rec.get("commit")
            try:
                if not isinstance(dsts, list) or not isinstance(cts, list):
                    raise SecAggError("'dst' and 'ct' are not lists")
                if len(dsts) != len(cts):
                    raise SecAggError("'dst' and 'ct' differ in length")
                if not isinstance(commit, bytes) or len(commit) != 32:
                    raise SecAggError("no 32-byte commitment to its self-mask seed")
                items = [(int(d), bytes(c)) for d, c in zip(dsts, cts, strict=True)]
                server.check_share_reply(node, items)
            except (SecAggError, TypeError, ValueError) as err:
                log.warning("round %d: node %d dropped at share-keys: %s", rnd, node, err)
                continue
            outgoing[node] = items
            commits[node] = commit
        try:
            incoming = server.route(outgoing, commits)
        except SecAggError as err:
            log.warning("round %d: share routing failed (%s): round not released", rnd, err)
            return self._finish(rnd, record, None, [])
        record["shared"] = len(outgoing)
        record["commitments"] = len(commits)  # every sharer's seed commitment, to check b with

        # 3. masked input: the client trains, encodes with its noise share and masks
        masked_payload = {node: masked_request(incoming.get(node, []), p) for node in outgoing}
        raw = self._exchange(
            grid, "secagg_masked", masked_payload, common, timeout, base=train_msgs, whole=True
        )
        masked: dict[int, np.ndarray] = {}
        metrics_replies: list[Message] = []
        for node, msg in raw.items():
            try:
                inner._check_reply(msg, contract.TRAIN_METRICS)
                vec = server.check_masked(node, self._masked_vector(msg))
            except (UpdateError, SecAggError) as err:
                log.warning("round %d: masked input from node %d rejected: %s", rnd, node, err)
                continue
            masked[node] = vec
            metrics_replies.append(msg)
        record["masked"] = len(masked)
        record["rejected"] = len(raw) - len(masked)

        # 4. unmask
        unmask_payload = {}
        try:
            for node in masked:
                survivors, dropped = server.unmask_request(node, masked)
                unmask_payload[node] = {"survivors": survivors, "dropped": dropped}
        except (BelowThreshold, SecAggError) as err:
            log.warning("round %d: secure aggregation not released: %s", rnd, err)
            return self._finish(rnd, record, None, metrics_replies)
        replies = self._exchange(grid, "secagg_unmask", unmask_payload, common, timeout)
        shares: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = {}
        for node, rec in replies.items():
            try:
                pair = (
                    _share_map(rec, "b_ids", "b_shares"),
                    _share_map(rec, "sk_ids", "sk_shares"),
                )
                server.check_unmask_reply(node, pair)
                shares[node] = pair
            except (UpdateError, SecAggError, TypeError, ValueError) as err:
                log.warning("round %d: node %d sent malformed unmask shares: %s", rnd, node, err)
        record["unmask"] = len(shares)
        try:
            total, survivors = server.aggregate(masked, shares)
        except (BelowThreshold, SecAggError) as err:
            log.warning("round %d: secure aggregation not released: %s", rnd, err)
            return self._finish(rnd, record, None, metrics_replies)
        record["survivors"] = len(survivors)
        return self._finish(rnd, record, (total, survivors), metrics_replies)

    # --- helpers -----------------------------------------------------------------------------
    def _finish(
        self,
        rnd: int,
        record: dict[str, Any],
        released: tuple[np.ndarray, list[int]] | None,
        replies: list[Message],
    ) -> ArrayRecord | None:
        """The round's record, its privacy line and, when released, the server step."""
        inner, p = self.inner, self.plan
        new = None
        if released is not None:
            honest = honest_shares(len(released[1]), p.colluders)
            record |= {
                "released": True,
                "honest_shares": honest,
                "mu_honest": p.mu_client * honest,
            }
        record["stages"] = self.stages
        record["seconds"] = round(time.perf_counter() - self._started, 3)
        # logged before the sum is used: a release the server has seen is counted even if the
        # step below fails
        self.records.append(record)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if released is not None:
            change_sum = skellam.decode(released[0], p.encoding)
            delta = unflatten(change_sum / self.divisor, inner.template, self.keys)
            new = inner.optimizer.step(inner.current, delta, rnd)
            inner.current = new
        # dp-noise=secure: every client's per-interaction epsilon so far (the claim's rule);
        # user-level DP's is in the run's summary, not per round
        eps = 0.0
        if isinstance(p, InteractionPlan):
            mus = [float(r["mu_honest"]) for r in self.records if r.get("released")]
            eps = p.epsilon(min(mus, default=p.mu_total), releases=len(mus))
        info = {
            "round": rnd,
            "sent": p.cohort,
            "replies": record.get("masked", 0),
            "accepted": record.get("survivors", 0),
            # a secure round's replies carry constants: whether a client trained is not known
            "no_reply": p.cohort - record.get("masked", 0) - record.get("rejected", 0),
            "refused": 0,
            "rejected": record.get("rejected", 0),
            "failed": 0,
            "loss": None,
            "epsilon_max": eps,
            "epsilon_median": eps,
            "client_seconds_median": None,
            "update_norm_median": None,
            "aggregated": new is not None,
            "secure_agg": {k: v for k, v in record.items() if k != "round"},
        }
        inner.rounds.append(info)
        if inner.on_round is not None:
            inner.on_round(info)
        if new is None:
            log.warning("round %d: global model unchanged", rnd)
            return None
        return to_record(new)

    def _exchange(
        self,
        grid: Grid,
        action: str,
        payload: dict[int, dict[str, Any]],
        common: dict[str, Any],
        timeout: float,
        *,
        base: dict[int, Message] | None = None,
        whole: bool = False,
    ) -> dict[int, Any]:
        """Send one stage's messages and collect the replies by node (errors and malformed
        replies are dropouts). ``base``: messages whose content (model, round config) goes
        along. Returns each node's SECAGG record, or the whole reply with ``whole``."""
        msgs = []
        for node, fields in payload.items():
            content = RecordDict()
            if base is not None:
                for key, rec in base[node].content.items():
                    content[key] = rec
            content[SECAGG] = ConfigRecord({**common, "stage": action, **fields})
            msgs.append(Message(content, dst_node_id=node, message_type=f"train.{action}"))
        out: dict[int, Any] = {}
        if not msgs:
            return out
        t0 = time.perf_counter()
        sent = sum(content_bytes(m.content) for m in msgs)
        received = 0
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = int(reply.metadata.src_node_id)
            if node not in payload or node in out:
                continue
            if not reply.has_error():
                received += content_bytes(reply.content)
            if reply.has_error():
                log.warning(
                    "round %s: node %d failed at %s: %s",
                    common["round"],
                    node,
                    action,
                    reply.error.reason,
                )
                continue
            if whole:
                out[node] = reply
            elif SECAGG in reply.content and isinstance(reply.content[SECAGG], ConfigRecord):
                out[node] = reply.content[SECAGG]
        # the round's cost, per stage: seconds, and bytes per message each way (payloads only)
        self.stages[action] = {
            "seconds": round(time.perf_counter() - t0, 3),
            "down_bytes_per_client": round(sent / len(msgs)),
            "up_bytes_per_client": round(received / max(1, len(out))),
        }
        return out

    def _masked_vector(self, msg: Message) -> np.ndarray:
        rec = msg.content.get(contract.ARRAYS) if contract.ARRAYS in msg.content else None
        if not isinstance(rec, ArrayRecord) or list(rec.keys()) != [MASKED]:
            raise UpdateError(f"no masked vector (an '{contract.ARRAYS}' record with '{MASKED}')")
        arr = rec[MASKED]
        if not isinstance(arr, Array):
            raise UpdateError("the masked vector is not an array")
        vec = arr.numpy()
        want = wire_dtype(self.plan.encoding.bits)
        if vec.dtype != want or vec.shape != (self.plan.encoding.dim,):
            raise UpdateError(
                f"masked vector has dtype {vec.dtype} and shape {vec.shape}, expected {want} "
                f"({self.plan.encoding.dim},)"
            )
        return vec.astype(np.uint64)  # server.check_masked checks the values' range


def content_bytes(content: RecordDict) -> int:
    """A message's payload size: array bytes, and bytes/strings/numbers in config and metric
    records (8 bytes a number); Flower's framing is not counted."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
            continue
        for v in rec.values():
            for x in v if isinstance(v, list) else [v]:
                total += len(x) if isinstance(x, (bytes, str)) else 8
    return total


def wire_dtype(bits: int) -> np.dtype:
    """A masked vector travels as uint32 when the modulus allows (as many bytes as the float32
    update it replaces), else uint64."""
    return np.dtype(np.uint32 if bits <= 32 else np.uint64)


def _share_map(rec: Any, ids_key: str, shares_key: str) -> dict[int, bytes]:
    ids, shares = rec.get(ids_key, []), rec.get(shares_key, [])
    if not isinstance(ids, list) or not isinstance(shares, list) or len(ids) != len(shares):
        raise UpdateError(f"'{ids_key}' and '{shares_key}' are not lists of equal length")
    return {int(i): bytes(s) for i, s in zip(ids, shares, strict=True)}
