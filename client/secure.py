"""The client's side of a secure-aggregation round (SecAgg+ with distributed Skellam noise).

Four message types, one per stage (the server's side: :mod:`fedrec.server.secure_agg`); the
protocol state between stages lives in the node's ``context.state`` (Flower keeps it per node
for the run), bound to the round number so a stale state is never reused:

- ``train.secagg_setup``: fresh key pairs; reply: the two public keys.
- ``train.secagg_share``: the group's public keys; reply: encrypted Shamir shares for each
  neighbour.
- ``train.secagg_masked``: the neighbours' encrypted shares, the global model and the round
  config. The client trains (:func:`fedrec.client.app.train_reply`: the same budget, guards and
  metrics as a plain round), then clips its whole change to ``user-clip``, encodes it as
  integers with its Skellam noise share (:func:`fedrec.shared.privacy.skellam.encode`) and masks
  it. Reply: constant metrics and client records (:data:`SECURE_METRICS`; nothing computed from
  the data) and instead of the tensors one uint64 vector: the masked, noised change. A client
  that did not train (no data, its budget) sends a zero change with its noise, so the sum keeps
  every noise share; so does a device whose training failed (see :func:`masked`).
- ``train.secagg_unmask``: which neighbours survived and which dropped; reply: the shares the
  server needs (never both kinds for one node: the client refuses such a request).

The noise comes from NumPy's PCG64 seeded with 128 bits from the OS (``secrets``); it is not a
cryptographically secure generator.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.client import interaction_budget
from fedrec.client.budget import (
    POPULATION_COLLUDERS,
    RECORD_FAILURE,  # noqa: F401 - re-exported: read here by callers and tests
    UserLevelLedger,
    append_round,
    check_round,
    device_state_dir,
)
from fedrec.client.runtime import public_name
from fedrec.shared.federation import contract
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.params import flat_keys, flatten, from_record
from fedrec.shared.federation.secagg import BelowThreshold, SecAggClient
from fedrec.shared.privacy import skellam
from fedrec.shared.privacy.distributed import check_request, plan
from fedrec.shared.privacy.secure_interaction import check_interaction_request

_log = logging.getLogger(__name__)

SECAGG = "secagg"  # same names as fedrec.server.secure_agg (the server side)
MASKED = "masked"
STATE = "fedrec-secagg"  # the context.state record holding the protocol state


def _fields(msg: Message) -> dict[str, Any]:
    rec = msg.content[SECAGG] if SECAGG in msg.content else None
    if not isinstance(rec, ConfigRecord):
        raise ValueError(f"a secure-aggregation message without its '{SECAGG}' record")
    return dict(rec)


def _simulated_dropout(f: dict[str, Any], stage: str, context: Context) -> None:
    """``secagg-test-dropout`` (simulation only): fail at ``stage`` like a device going offline."""
    spec = str(f.get("test-dropout", ""))
    if not spec:
        return
    node = context.node_config
    if "data-dir" in node:
        raise ValueError("the server asked for a simulated dropout: a device never runs one")
    every, at = FedConfig(secagg_test_dropout=spec).dropout_spec() or (0, "")
    part = node.get("partition-id")
    if at == stage and part is not None and int(part) % every == 0:
        raise RuntimeError(f"simulated dropout at stage {stage} (secagg-test-dropout={spec})")


# what the client keeps beside the protocol state: the round, and from its masked stage the
# cohort, the size of a group in the round's graph and the fewest survivors, all from its own
# calibration of the round's noise
_OWN = ("round", "cohort", "graph-group", "min-survivors")


def _record(context: Context, rnd: int, stage: str) -> ConfigRecord:
    rec = context.state[STATE] if STATE in context.state else None
    if not isinstance(rec, ConfigRecord) or rec.get("round", -1) != rnd:
        raise ValueError(
            f"secure aggregation: stage {stage} of round {rnd} without this round's earlier "
            "stages on this node (restarted, or a stale message)"
        )
    return rec


def _load(context: Context, rnd: int, stage: str) -> SecAggClient:
    rec = _record(context, rnd, stage)
    return SecAggClient.from_state({k: v for k, v in rec.items() if k not in _OWN})


def _save(context: Context, rnd: int, client: SecAggClient, **own: int) -> None:
    keys = {k.replace("_", "-"): v for k, v in own.items()}
    assert set(keys) <= set(_OWN), keys
    context.state[STATE] = ConfigRecord({"round": rnd, **keys, **client.to_state()})


def _reply(msg: Message, fields: dict[str, Any]) -> Message:
    return Message(content=RecordDict({SECAGG: ConfigRecord(fields)}), reply_to=msg)


def setup(msg: Message, context: Context) -> Message:
    f = _fields(msg)
    rnd = int(f["round"])
    client = SecAggClient(
        msg.metadata.dst_node_id, bits=int(f["bits"]), threshold=int(f["threshold"])
    )
    pk1, pk2 = client.setup()
    _save(context, rnd, client)
    return _reply(msg, {"pk1": pk1, "pk2": pk2})


def share(msg: Message, context: Context) -> Message:
    f = _fields(msg)
    rnd = int(f["round"])
    _simulated_dropout(f, "share", context)
    client = _load(context, rnd, "share")
    ids = [int(i) for i in f["ids"]]
    pk1, pk2 = list(f["pk1"]), list(f["pk2"])
    if not (len(ids) == len(pk1) == len(pk2)):
        raise ValueError("secure aggregation: the group's ids and keys differ in length")
    out = client.share_keys(
        {i: (bytes(a), bytes(b)) for i, a, b in zip(ids, pk1, pk2, strict=True)}
    )
    _save(context, rnd, client)
    return _reply(
        msg, {"dst": [d for d, _ in out], "ct": [c for _, c in out], "commit": client.commitment()}
    )


def masked(msg: Message, context: Context) -> Message:
    from fedrec.client.app import STEP64, device_guard, round_config, train_reply

    f = _fields(msg)
    rnd = int(f["round"])
    _simulated_dropout(f, "masked", context)
    client = _load(context, rnd, "masked")
    cfg, _extra = round_config(msg)
    interaction = cfg.dp and cfg.dp_noise == "secure"  # per-interaction DP (else user-level)
    if not (cfg.secure_agg and (cfg.user_dp or interaction)):
        raise ValueError(
            "train.secagg_masked in a run without secure-agg=true and user-dp=true or "
            "dp-noise=secure"
        )
    enc = skellam.SkellamConfig(
        clip=float(f["clip"]),
        scale=float(f["scale"]),
        dim=int(f["dim"]),
        bits=int(f["bits"]),
        beta=float(f["beta"]),
    )
    # user-level: the clip of the whole change; per interaction: the projection radius
    radius, name_of = (
        (cfg.update_norm_max, "update-norm-max") if interaction else (cfg.user_clip, "user-clip")
    )
    if enc.bits != client.bits:  # the modulus it masks with must be the one it encodes for
        raise ValueError(
            f"secure aggregation: the server asks encoding bits {enc.bits}, but this round's "
            f"masks were set up with {client.bits}; refused"
        )
    device_state = device_state_dir(context.node_config)
    if interaction:
        # the run config comes from the server: its silos (the clients the plan counts, which
        # set the colluders and the noise per client) is checked against the engine's count in
        # simulation, and against the federation's size the device owner states on a device
        _check_clients(
            cfg.silos,
            "the server's run config says silos =",
            context.node_config,
            device=device_state is not None,
            why="per-interaction DP, the noise counted over every client of the federation",
        )
    if interaction and rnd > cfg.num_rounds:  # the noise is calibrated for num-rounds releases
        raise ValueError(
            f"secure aggregation: round {rnd} of a run planned for num-rounds = "
            f"{cfg.num_rounds}; refused"
        )
    if enc.clip != radius:
        raise ValueError(
            f"secure aggregation: the server asks clip {enc.clip}, the run config says "
            f"{name_of}={radius}"
        )
    mu = float(f["mu"])
    # the server may not ask for less noise, another grid or a lower threshold than this
    # client's own calibration from the run config and the cohort size gives
    if interaction:
        mine = check_interaction_request(cfg, f, client.threshold)
        own = {"min_survivors": mine.min_survivors, "graph_group": mine.neighbours + 1}
    else:
        p = check_request(cfg, f, client.threshold)
        own = {"min_survivors": p.min_survivors, "graph_group": p.neighbours + 1}
    # the device's own conditions (node config against run config, not data): a visible refusal
    device_guard(cfg, context.node_config, secure=True)
    if (
        not interaction
        and device_state is not None
        and "secagg-colluders-min" in context.node_config
    ):
        # user-level: the colluders counted are secagg-colluders of the population the server
        # states; a floor on the fraction means nothing unless that population is the one the
        # device's owner knows
        _check_clients(
            int(f["clients"]),
            "the server's request counts",
            context.node_config,
            device=True,
            why="secagg-colluders-min counts the colluders over it",
        )
    ledger, entry = (None, {}) if interaction else _user_level_check(cfg, f, context.node_config)
    received = from_record(msg.content.array_records[contract.ARRAYS])
    keys = flat_keys(received)
    before = flatten(received, keys)
    if before.size != enc.dim:
        raise ValueError(
            f"secure aggregation: the global model has {before.size} travelling coordinates, "
            f"the server expects {enc.dim}"
        )
    if interaction and device_state is not None:
        # charged to the device's own record before it trains, so before anything leaves it
        # (a crash after this over-counts); refused at the cap or for a round already sent
        interaction_budget.charge_round(
            context.node_config, device_state, cfg, mine, context.run_id, rnd
        )
    name = public_name(context.node_config)  # what train_reply's client state is named
    try:
        reply = train_reply(msg, context, secure=True)
        change = np.zeros_like(before)
        if interaction and STEP64 in reply.content:
            # the step itself in float64, not a difference of float32 models
            # (shared/privacy/secure_interaction.py: the sensitivity bounds this one)
            change = flatten(from_record(reply.content.array_records[STEP64]), keys)
        elif not interaction and contract.ARRAYS in reply.content:
            state = from_record(reply.content.array_records[contract.ARRAYS])
            change = flatten(state, keys) - before
        if not np.all(np.isfinite(change)):
            raise FloatingPointError("the local update has non-finite values (nan or inf)")
    except Exception as err:  # noqa: BLE001 - on a device, the server must not learn it
        # A failure here can depend on the data (a non-finite update, data that cannot be
        # read). An error reply would tell the server so; a device sends what a client without
        # data sends instead, a zero change plus its noise share (the zero-out neighbour the
        # guarantee covers), and says why in its own log. In simulation (no device folder) the
        # error is raised: there it is a bug to see, not a user's secret, and a run whose
        # clients all sent zeros would otherwise look like a run that merely did not learn.
        if device_state_dir(context.node_config) is None:
            raise
        _log.warning(
            "secure aggregation round %d: local training failed (%s: %s); sending a zero "
            "change with this client's noise share",
            rnd,
            type(err).__name__,
            err,
        )
        change = np.zeros_like(before)
    rng = np.random.default_rng(secrets.randbits(128))
    if interaction:  # projected onto the ball, plain randomized rounding: never redrawn
        x = skellam.encode_unconditional(change, enc, mu, rng)
    else:
        x = skellam.encode(change, enc, mu, rng)
    srcs = [int(s) for s in f["src"]]
    cts = [bytes(c) for c in f["ct"]]
    y = client.masked_input(list(zip(srcs, cts, strict=True)), x)
    _save(context, rnd, client, cohort=int(f["cohort"]), **own)
    if ledger is not None:  # recorded before the masked input leaves the device
        # the cap again, under the record's lock: another run may have added rounds since
        append_round(ledger, entry, context.node_config)
    # everything but the masked vector is a constant: whether the client trained, had data,
    # or why not, would tell the server what the noise hides
    content = RecordDict()
    content[contract.METRICS] = MetricRecord(dict(SECURE_METRICS))
    content[contract.CLIENT] = ConfigRecord({"name": name, "reason": "", "history": "[]"})
    wire = np.uint32 if enc.bits <= 32 else np.uint64  # server/secure_agg.py wire_dtype
    content[contract.ARRAYS] = ArrayRecord({MASKED: Array(np.ascontiguousarray(y, dtype=wire))})
    return Message(content=content, reply_to=msg)


def _check_clients(
    stated: int, where: str, node: dict[str, Any], *, device: bool, why: str
) -> None:
    """The clients the server counts (``stated``: a per-interaction plan's ``silos``, or the
    population a user-level request states) against the node's own count: the engine's
    ``num-partitions`` in simulation, the owner's ``federation-clients`` on a device (a server
    stating more clients than there are would count more honest noise shares than the round
    has, and one stating fewer would count fewer colluders). ``where`` and ``why`` say, in the
    error, what stated the number and why it matters. ValueError saying what to fix."""
    key = "federation-clients" if device else "num-partitions"
    raw = node.get(key)
    if device and raw is None:
        raise ValueError(
            f"secure aggregation: the server asks a secure round ({why}), but this device's "
            "node config does not state the federation's size: start the SuperNode with "
            '--node-config "federation-clients=N" (N the number of clients in the federation: '
            "organisations for the run config's silos, devices with one user each); refused"
        )
    count = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    if isinstance(raw, str) and raw.strip().isdigit():  # a node config value given as text
        count = int(raw)
    if count != stated:
        raise ValueError(
            f"secure aggregation: {where} {stated}, but this node's {key} is {raw}; refused"
        )


def _user_level_check(
    cfg: FedConfig, f: dict[str, Any], node: dict[str, Any]
) -> tuple[UserLevelLedger | None, dict[str, float]]:
    """On a device: its user-level record and this round's entry (the plan's a-priori noise
    for the stated cohort), after refusing the round if the record's epsilon with it would pass
    the node config's ``user-epsilon-max`` (at its ``user-delta-max``).
    In simulation: no record (None)."""
    state = device_state_dir(node)
    if state is None:
        return None, {}
    p = plan(cfg, int(f["cohort"]), int(f["dim"]), int(f["clients"]))
    entry = {
        "mu_total": p.mu_total,
        "l1": skellam.l1_bound(p.encoding),
        "l2": skellam.l2_bound(p.encoding),
        "risk": p.collusion_risk / cfg.num_rounds,
        POPULATION_COLLUDERS: float(p.colluders),
    }
    ledger = UserLevelLedger(state / "user-level-budget.json")
    check_round(ledger, entry, node)
    return ledger, entry


def unmask(msg: Message, context: Context) -> Message:
    f = _fields(msg)
    rnd = int(f["round"])
    _simulated_dropout(f, "unmask", context)
    client = _load(context, rnd, "unmask")
    try:
        b, sk = _checked_unmask(client, f, _record(context, rnd, "unmask"), rnd)
    finally:  # answered or refused, the round is over for this client: keys are not reused
        del context.state[STATE]
    return _reply(
        msg,
        {
            "b_ids": list(b),
            "b_shares": list(b.values()),
            "sk_ids": list(sk),
            "sk_shares": list(sk.values()),
        },
    )


def _checked_unmask(
    client: SecAggClient, f: dict[str, Any], own: ConfigRecord, rnd: int
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The shares the server asks for, after checking that the survivors it names in this
    client's group are not too few for the client's own plan (``own``: the record the masked
    stage saved).

    The round's graph gives each node a group of ``graph-group`` nodes (itself included); the
    server names as survivors those of them that sent a masked input. A group member left out is
    a member of the cohort that did not survive (it missed setup, share-keys or the masked
    stage), and with at least ``min-survivors`` of the cohort surviving at most ``cohort -
    min-survivors`` did not. So at least ``graph-group - (cohort - min-survivors)`` must be
    named: a necessary condition the client checks on its own (the whole condition when the
    graph is complete). Fewer means a sum released with fewer noise shares than the client's
    calibration of the round's claim counts. A server that names different survivors to
    different clients is not caught (there is no consistency round): the trust model is honest
    but curious."""
    cohort, group, least = own["cohort"], own["graph-group"], own["min-survivors"]
    assert isinstance(cohort, int) and isinstance(group, int) and isinstance(least, int)
    survivors = [int(i) for i in f["survivors"]]
    need = group - (cohort - least)
    if len(set(survivors)) < need:
        raise BelowThreshold(
            f"secure aggregation: the server asks to unmask round {rnd} with "
            f"{len(set(survivors))} survivors named in this client's group of {group}, but "
            f"with at least {least} of the cohort of {cohort} surviving (this client's "
            f"calibration of the noise) at least {need} of them did; refused"
        )
    return client.unmask(survivors, [int(i) for i in f["dropped"]])


# A secure reply's metrics, whatever happened on the client (the keys of TRAIN_METRICS, with
# train_reply's types: counts are ints, the rest floats).
SECURE_METRICS: dict[str, int | float] = {
    "num-examples": 1, "trained": 1, "loss": 0.0, "epsilon": 0.0, "steps": 0, "total-steps": 0,
    "noise-multiplier": 0.0, "sample-rate": 0.0, "seconds": 0.0,
}  # fmt: skip
assert set(SECURE_METRICS) == set(contract.TRAIN_METRICS)


HANDLERS = {
    "secagg_setup": setup,
    "secagg_share": share,
    "secagg_masked": masked,
    "secagg_unmask": unmask,
}
