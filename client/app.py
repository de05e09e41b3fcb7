"""fedrec's Flower ClientApp (Message API): local DP-SGD training and federated evaluation.

Run inside a simulation (``fedrec simulate``, ``flwr run .``) or a SuperNode
(``flower-supernode ... --node-config "data-dir='/data/me'"``); the round's settings come from
the server's ``ConfigRecord``.

A train reply carries only: the travelling tensors (:mod:`fedrec.shared.federation.params`) when
the client trained, a ``MetricRecord`` with the whitelisted numbers in
:data:`fedrec.shared.federation.contract.TRAIN_METRICS`, and a ``ConfigRecord`` with the client's
name (``p<partition>`` in simulation) and, when it refused, the reason. Never item ids, histories
or texts. The whole message contract: :mod:`fedrec.shared.federation.contract`; the budget store:
:mod:`fedrec.client.budget`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.client import interaction_budget
from fedrec.client.budget import (
    MemoryStore,
    append_round,
    budget_store,
    device_state_dir,
    node_number,
    trusted_round_record,
    user_level_cap,
)
from fedrec.client.local_train import train_round
from fedrec.client.runtime import ClientState, client_state
from fedrec.shared.evaluation import per_query_metrics
from fedrec.shared.federation import contract
from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.federation.contract import EVAL_METRICS, EXTRA_KEYS, TRAIN_METRICS
from fedrec.shared.federation.params import (
    from_record,
    load_travelling,
    to_record,
    travelling_parameters,
    travelling_state,
)
from fedrec.shared.federation.segments import noised_counts
from fedrec.shared.model.examples import right_aligned
from fedrec.shared.privacy.calibration import planned_release

app = ClientApp()

# dp-noise=secure: the record of a train reply holding each travelling tensor's float64 step
# (-lr x the clipped, divided gradient sum), which client.secure encodes; it never leaves the
# client (client.secure builds its own reply)
STEP64 = "step64"


_log = logging.getLogger(__name__)

# What a device's round tells the server when its data folder cannot be loaded, or the global
# model cannot be kept in its state folder: a ClientApp's error text reaches the server, and
# these errors name the device's paths and, for data, a line and a value of its own history.
# The device's own log has the details.
DATA_FAILURE = (
    "this device refuses the round: its data folder or the run's model cannot be loaded (the "
    "device's own log says why)"
)
CACHE_FAILURE = (
    "this device refuses the round: it cannot keep the global model in its state folder (the "
    "device's own log says why)"
)


@contextlib.contextmanager
def device_private(node: Any, constant: str) -> Iterator[None]:
    """On a device (a node with ``data-dir``), any error inside becomes ``ValueError(constant)``
    and the original goes to the device's log; in simulation errors pass as they are."""
    try:
        yield
    except Exception as err:
        if "data-dir" not in node:
            raise
        _log.warning("%s: %s: %s", constant, type(err).__name__, err)
        raise ValueError(constant) from None


# Parsed round configs by their raw values: every client of a round gets the same config, and
# parsing it (about 0.9 ms) ran twice per reply. FedConfig is frozen, so sharing one is safe; a
# config that fails to parse is never stored and fails again for the next client.
_PARSED: dict[tuple[tuple[str, str], ...], FedConfig] = {}
_PARSED_MAX = 16


def round_config(msg: Message) -> tuple[FedConfig, dict[str, Any]]:
    raw = dict(msg.content[contract.CONFIG])
    extra = {k: raw.pop(k) for k in EXTRA_KEYS if k in raw}
    # in the record's own order, not sorted: two spellings of one key (num-rounds, num_rounds)
    # parse to the last one, so the order is part of what a config means
    key = tuple((k, repr(v)) for k, v in raw.items())
    cfg = _PARSED.get(key)
    if cfg is None:
        cfg = parse_run_config(raw, where="round config from the server")
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED), key), None)
        _PARSED[key] = cfg
    return cfg, extra


def device_guard(cfg: FedConfig, node: Any, *, secure: bool = False) -> None:
    """A device (a SuperNode with ``data-dir``) decides what it trains under, not the server:
    without ``allow-no-dp=true`` in its node config it refuses a round without local DP (which
    would send its raw update and the counts DP hides) or with ``dp-noise=server`` (its clipped
    change without noise, to a server trusted to add it), ``id-residual`` (the per-item table
    shows which items it trained on), ``use-profile`` (not covered by the per-interaction
    guarantee) and ``segment-prior`` (its table's row shows the users' profile segment); with
    ``delta-max`` set it refuses a larger delta, with ``secagg-colluders-min`` a secure round
    whose noise assumes fewer colluding clients, with ``user-delta-max`` a larger user-level
    delta, with ``user-epsilon-max`` a trusted-server run whose user-level
    budget is larger (every round then also checks the device's own cross-run record, in
    :func:`train_reply` for a trusted-server round and in ``client.secure`` for a secure
    one). A ``dp-noise=secure`` round is private only as a masked input (``secure``): its
    cap is checked in ``client.secure`` against the device's own record
    (:mod:`fedrec.client.interaction_budget`). Raises
    ``ValueError``: the server sees a failed reply, and nothing was trained or sent. These
    depend on the run config and the node config only, never on the data."""
    if "data-dir" not in node:
        return
    allow = str(node.get("allow-no-dp", "false")).lower() == "true"
    # a secure-aggregation round (train.secagg_masked) sends only a masked, noised vector the
    # device computes itself: that is DP without local DP-SGD (user-level, or per interaction
    # with dp-noise=secure, whose releases the device records across runs in
    # client.interaction_budget); a plain train round is not. dp-noise=server sends the
    # clipped change WITHOUT noise (the server is trusted to add it)
    secure_dp = secure and cfg.secure_agg and (cfg.user_dp or (cfg.dp and cfg.dp_noise == "secure"))
    private = (cfg.dp and cfg.dp_noise == "client") or secure_dp
    if not allow and (not private or cfg.id_residual or cfg.use_profile or cfg.segment_prior):
        raise ValueError(
            "this device trains only under local DP with its own noise, or user-level or "
            "per-interaction DP with secure aggregation, without id-residual, use-profile or "
            "segment-prior (its counts show which profile segment the device's users are in); "
            "the server asked dp="
            f"{cfg.dp}, dp-noise={cfg.dp_noise}, user-dp="
            f"{cfg.user_dp}, secure-agg={cfg.secure_agg} in a {'secure' if secure else 'plain'} "
            f"round, id-residual={cfg.id_residual}, use-profile={cfg.use_profile}, "
            f"segment-prior={cfg.segment_prior!r}. Set node config allow-no-dp=true to accept "
            "such rounds."
        )
    if cfg.poison:
        raise ValueError(
            "the server asked for a simulated attack (poison): a device never runs one"
        )
    if secure and cfg.dp and cfg.dp_noise == "secure":
        interaction_budget.node_caps(node)  # the owner's cap and delta, never a run's
    # the trust assumption the noise is calibrated for: the server's run config states how many
    # clients may collude with it (their noise shares are not counted); the owner's floor
    colluders_min = node_number(node, "secagg-colluders-min", below=0.5)
    if secure_dp and colluders_min is not None and cfg.secagg_colluders < colluders_min:
        raise ValueError(
            f"the server's run config assumes secagg-colluders={cfg.secagg_colluders:g} (the "
            "fraction of clients whose noise shares are not counted), below this device's "
            f"secagg-colluders-min={node['secagg-colluders-min']}: the noise would not cover "
            "the collusion this device's owner assumes; refused"
        )
    delta_max = node_number(node, "delta-max", below=1.0)
    if delta_max is not None and cfg.delta > delta_max:
        raise ValueError(
            f"the server asked delta={cfg.delta}, above this device's delta-max={node['delta-max']}"
        )
    caps = user_level_cap(node) if cfg.user_dp else None  # a bad cap is an error here
    # user-level DP: the run's whole budget (all its rounds) against the device owner's caps.
    # In a secure round the device's own record of the rounds it joined is checked against
    # user-epsilon-max instead, across runs (client.secure); here only delta is.
    user_delta_max = node_number(node, "user-delta-max", below=1.0) if cfg.user_dp else None
    if user_delta_max is not None and cfg.user_delta > user_delta_max:
        raise ValueError(
            f"the server asked user-delta={cfg.user_delta} for this run, above this device's "
            f"user-delta-max={node['user-delta-max']}"
        )
    if caps is not None and not (secure and cfg.secure_agg):
        # what the run's noise gives over all its rounds (a fixed user-noise-multiplier may
        # give far more than user-epsilon), not the user-epsilon the config states
        from fedrec.shared.privacy.accounting import epsilon_spent
        from fedrec.shared.privacy.user_level import user_noise_multiplier

        z = user_noise_multiplier(cfg)
        eps = epsilon_spent(history=[(z, 1.0, cfg.num_rounds)], delta=cfg.user_delta)
        if eps > caps[0]:
            raise ValueError(
                f"this run's user-level noise (multiplier {z:.4g}, {cfg.num_rounds} rounds) gives "
                f"user-epsilon {eps:.4g} at delta {cfg.user_delta}, above this device's "
                f"user-epsilon-max={node['user-epsilon-max']}"
            )


def cache_global(client: ClientState, node: Any) -> Path | None:
    """On a device, keep the latest global model the server sent in ``<state>/model-cache``, a
    run directory ``fedrec recommend`` reads: the device ranks for its own user locally and its
    history never leaves it. Replaced atomically (a crash leaves the previous cache)."""
    if "data-dir" not in node:
        return None
    import os
    import shutil
    import tempfile

    from fedrec.shared.model.artifacts import save_model
    from fedrec.shared.model.run_central import item_titles

    state = device_state_dir(node)
    assert state is not None
    state.mkdir(parents=True, exist_ok=True)
    ds = client.dataset
    assert ds is not None
    tmp = Path(tempfile.mkdtemp(dir=state, prefix=".model-cache-"))
    save_model(client.model, tmp, item_ids=[int(i) for i in ds.item_ids], titles=item_titles(ds))
    final = state / "model-cache"
    old = state / ".model-cache-old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A plain round: train and send the travelling tensors (see the module docstring)."""
    cfg, _extra = round_config(msg)
    if cfg.secure_agg:
        raise ValueError(
            "the server sent a plain train message in a secure-aggregation run (secure-agg="
            "true): this client sends its update only masked (train.secagg_masked)"
        )
    return train_reply(msg, context)


def train_reply(msg: Message, context: Context, *, secure: bool = False) -> Message:
    """Train on the client's own data; the reply with the whole travelling state."""
    t0 = time.perf_counter()
    cfg, extra = round_config(msg)
    with device_private(context.node_config, DATA_FAILURE):
        client = client_state(cfg, context.node_config)
    if extra.get("catalog") and extra["catalog"] != client.catalog:
        raise ValueError(
            f"catalog mismatch: the server's item catalog is {extra['catalog']}, this client's "
            f"is {client.catalog}; the client's items file must be the run's public catalog"
        )
    received = from_record(msg.content.array_records[contract.ARRAYS])
    load_travelling(client.model, received)
    with device_private(context.node_config, CACHE_FAILURE):
        cache_global(client, context.node_config)
    server_round = int(extra.get("server-round", 0))
    seed = cfg.seed * 1_000_003 + server_round * 7919 + _name_key(client.name)
    store = budget_store(context, client.name, extra)
    device_guard(cfg, context.node_config, secure=secure)
    device_state = device_state_dir(context.node_config)
    elsewhere = None
    secure_device = device_state is not None and secure and cfg.dp and cfg.dp_noise == "secure"
    if secure_device:
        # a device's secure per-interaction round: client.secure charged it to the device's
        # own record (client.interaction_budget) before this; the Gaussian history train_round
        # keeps is the trusted-server version's, a per-round check only, never the device's
        store = MemoryStore()
    elif device_state is not None and cfg.dp:
        # local DP on a device: its secure per-interaction spending counts against the cap too
        # (read under the local budget's lock, where train_round checks the cap)
        elsewhere = functools.partial(interaction_budget.spent, device_state, context.node_config)
    record = None
    if cfg.user_dp and not secure:
        # a trusted-server round: the device's user-level record counts it (the Gaussian noise
        # the run config gives the server), beside the secure rounds, across runs
        from fedrec.shared.privacy.user_level import user_noise_multiplier

        record = trusted_round_record(context.node_config, user_noise_multiplier(cfg))
    # the device owner's own cap, if set (a NaN would be stored as the device's cap and never
    # refuse: an error)
    # (a device's secure round was capped where it was charged: a refusal here would only
    # make it send a zero change)
    cap = node_number(context.node_config, "epsilon-max") if cfg.dp and not secure_device else None
    # the segment counts go out once, with the run's first round (charged with its steps)
    releasing = (
        client.segment_counts is not None and server_round == contract.SEGMENT_ROUND and not secure
    )
    release = planned_release(cfg) if releasing else None
    res = train_round(
        client.scorer,
        client.examples,
        cfg,
        store,
        seed=seed,
        device_cap=cap,
        release=release,
        spent_elsewhere=elsewhere,
    )
    # Under DP (local or user-level) nothing computed from the data leaves without noise: the
    # example count, the training loss and the round's duration are sent as constants (the
    # keys stay: the reply format does not depend on the setting).
    private = cfg.dp or cfg.user_dp
    metrics = MetricRecord(
        {
            "num-examples": 1 if private else res.examples,
            "trained": int(res.trained),
            # 0 when no step saw data (every Poisson batch empty): keeps the reply valid
            "loss": float(res.loss)
            if res.trained and res.loss == res.loss and not private
            else 0.0,
            "epsilon": float(res.epsilon),
            "steps": res.steps,
            "total-steps": res.total_steps,
            "noise-multiplier": float(res.noise_multiplier),
            "sample-rate": float(res.sample_rate),
            "seconds": 0.0 if private else time.perf_counter() - t0,
        }
    )
    assert set(metrics) == set(TRAIN_METRICS), "the reply must carry exactly TRAIN_METRICS"
    content = RecordDict(
        {
            contract.METRICS: metrics,
            contract.CLIENT: ConfigRecord(
                {
                    "name": client.name,
                    "reason": res.reason,
                    # the accountant's (sigma, q, steps) runs: public mechanism parameters, so
                    # `fedrec audit` can verify budget a device carried over from earlier runs
                    "history": json.dumps(res.history),
                }
            ),
        }
    )
    if res.trained:
        state = travelling_state(client.model)
        spec = cfg.poison_spec()
        part = context.node_config.get("partition-id")
        attacker = spec is not None and part is not None and int(part) % spec[0] == 0
        if attacker and spec is not None and spec[1] != "promote":
            state = poisoned(state, received, spec[1], spec[2])  # simulation only
        content[contract.ARRAYS] = to_record(state)
        if releasing and (res.released or not cfg.dp):
            assert client.segment_counts is not None
            table = segment_record(client.segment_counts, cfg)
            if attacker and spec is not None and spec[1] == "promote":  # simulation only
                table = promoted(table, spec[2])
            content[contract.SEGMENTS] = table
    if res.steps64 is not None and res.trained:  # dp-noise=secure: read by client.secure only
        by_param = {id(p): step for p, step in res.steps64}
        steps = {
            k: by_param.get(id(p), torch.zeros(p.shape, dtype=torch.float64))
            for k, p in travelling_parameters(client.model).items()
        }
        content[STEP64] = ArrayRecord({k: Array(v.numpy()) for k, v in steps.items()})
    if record is not None:  # recorded before the reply leaves the device
        append_round(*record, context.node_config)
    return Message(content=content, reply_to=msg)


def segment_record(counts: np.ndarray, cfg: FedConfig) -> ArrayRecord:
    """The release of a client's segment counts: under local DP :func:`noised_counts` at std
    ``segment-noise`` with noise drawn from OS entropy (rounded to whole numbers); without DP the
    exact counts."""
    table = np.array(counts, dtype=np.float64)
    if cfg.dp:
        rng = np.random.default_rng(secrets.randbits(128))
        table = noised_counts(table, cfg.segment_noise, rng)
    return ArrayRecord({"counts": Array(table)})


def promoted(record: ArrayRecord, scale: float) -> ArrayRecord:
    """A simulated attacker's segment counts (``poison`` kind ``promote``): the released table
    with ``round(scale)`` added to every segment's cell of the catalog's last item, to push it
    to new users; whole numbers, as an honest release's."""
    table = np.array(record["counts"].numpy(), dtype=np.float64)
    table[:, -1] += float(round(scale))
    return ArrayRecord({"counts": Array(table)})


def poisoned(state: dict, received: dict, kind: str, scale: float) -> dict:
    """A simulated attacker's reply: the honest change scaled (``scale``) or reversed and
    scaled (``sign-flip``), for measuring robust aggregation (``poison`` run config)."""
    sign = -1.0 if kind == "sign-flip" else 1.0
    return {k: received[k] + sign * scale * (v - received[k]) for k, v in state.items()}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """HR@10 / NDCG@10 of the global model on this client's own held-out test item(s).

    The server averages them weighted by ``num-queries``: over all clients this is exactly the
    centralized metric on the same split (``tests/test_federation.py``).
    """
    cfg, _extra = round_config(msg)
    with device_private(context.node_config, DATA_FAILURE):
        client = client_state(cfg, context.node_config)
    load_travelling(client.model, from_record(msg.content.array_records[contract.ARRAYS]))
    with device_private(context.node_config, CACHE_FAILURE):
        cache_global(client, context.node_config)
    evalset = client.split.tests.get("test")
    sums: dict[str, int | float] = {"num-queries": 0, "HR@10": 0.0, "NDCG@10": 0.0}
    if evalset is not None:
        rows = np.flatnonzero(np.isin(evalset.users, client.users))
        sums = evaluate_rows(client.model, evalset, rows)
    assert set(sums) == set(EVAL_METRICS), "the reply must carry exactly EVAL_METRICS"
    content = RecordDict({contract.METRICS: MetricRecord(dict(sums.items()))})
    return Message(content=content, reply_to=msg)


@torch.no_grad()
def evaluate_rows(model, evalset, rows: np.ndarray) -> dict[str, int | float]:  # noqa: ANN001
    """Mean HR@10/NDCG@10 over ``rows`` of ``evalset`` (with ``num-queries`` as the weight)."""
    model.eval()
    rows = rows[[evalset.relevant[r].shape[0] > 0 for r in rows]] if rows.size else rows
    if rows.size == 0:
        return {"num-queries": 0, "HR@10": 0.0, "NDCG@10": 0.0}
    items = model.item_embeddings()
    ctx = torch.as_tensor(right_aligned([evalset.history[r] for r in rows], model.cfg.history_len))
    scores = model.scores(model.user_embeddings(items, ctx), items).double().numpy()
    sub = _subset(evalset, rows)
    m = per_query_metrics(scores, sub, slice(0, len(rows)), ks=(10,), with_auc=False)
    return {
        "num-queries": len(rows),
        "HR@10": float(m["HR@10"].mean()),
        "NDCG@10": float(m["NDCG@10"].mean()),
    }


def _subset(evalset, rows: np.ndarray):  # noqa: ANN001, ANN202
    from dataclasses import replace

    pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
    return replace(
        evalset,
        users=evalset.users[rows],
        history=pick(evalset.history),
        exclude=pick(evalset.exclude),
        relevant=pick(evalset.relevant),
        warm=evalset.warm[rows],
        profiles=pick(evalset.profiles) if evalset.profiles else [],
    )


# secure aggregation's four stages (server/secure_agg.py): train.secagg_setup, ..._share,
# ..._masked (trains, via train_reply), ..._unmask
def _name_key(name: str) -> int:
    """A stable small integer of a client's name (Python's ``hash`` of a str is salted per
    process, which made runs without DP unrepeatable)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") % 7919


from fedrec.client import secure as _secure  # noqa: E402

for _action, _handler in _secure.HANDLERS.items():
    app.train(_action)(_handler)
