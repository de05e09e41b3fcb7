"""A no-op Flower ServerApp and ClientApp: the ceiling of the simulation runtime, for
:mod:`fedrec.simulations.bench_round`.

The ServerApp runs ``num-rounds`` rounds; each round it samples ``clients-per-round`` nodes as
Flower's FedAvg does (``sample_nodes``: uniform, without replacement) and sends each of them
``messages`` messages in sequence (one ``send_and_receive`` per exchange, all sampled nodes at
once, as :mod:`fedrec.server.secure_agg` runs its four stages). Every message carries a small
``ConfigRecord``; the last one also carries an ``ArrayRecord`` of float32 arrays of
``array-sizes`` elements (fedrec's travelling update: 4,774 values, 19 KB). The ClientApp
replies at once: a ``MetricRecord`` with its own timing and, to the last message, zero arrays of
the same sizes.

Each round is timed on the server (``time.perf_counter``: the whole round, sampling and message
construction included, and the ``send_and_receive`` calls alone); with the clients' start and
end times (``time.time``, same machine) the round splits into the time until the last client
started (dispatch), the clients' own bodies and the time after the last reply (collection). The
per-round records go to the JSON file named by the run-config key ``bench-file`` after every
round. Run config keys: ``bench-file``, ``num-rounds``, ``clients-per-round``, ``messages``,
``array-sizes`` (comma list), ``round-timeout``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedrec.shared.rundir import write_json

CONFIG, ARRAYS, METRICS = "config", "arrays", "metrics"  # FedAvg's / fedrec's record names

server = ServerApp()
client = ClientApp()


def patch_polling() -> None:
    """fedrec's per-node message index for Flower's in-memory link state
    (:func:`fedrec.server.sim_runtime.install`), in the process this runs in: the
    ``flwr-simulation`` process, where the ServerApp thread and the runtime's polling thread
    both live. fedrec's own ServerApp installs it in every simulation; the no-op ServerApp only
    with ``patch-polling`` (the ``+poll`` variants), so that the plain no-op variants measure
    Flower as shipped."""
    from fedrec.server import sim_runtime

    if not sim_runtime.install():
        raise RuntimeError("patch-polling: fedrec's link-state index could not be installed")


def _arrays(sizes: list[int]) -> ArrayRecord:
    return ArrayRecord({f"a{i}": Array(np.zeros(n, dtype=np.float32)) for i, n in enumerate(sizes)})


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["bench-file"]))
    rounds = int(rc["num-rounds"])
    per_round = int(rc["clients-per-round"])
    messages = int(rc["messages"])
    sizes = [int(x) for x in str(rc["array-sizes"]).split(",") if x.strip()]
    timeout = float(rc.get("round-timeout", 3600.0))
    if str(rc.get("patch-polling", "false")).lower() == "true":
        patch_polling()
    arrays = _arrays(sizes)
    doc: dict[str, Any] = {
        "clients_per_round": per_round,
        "messages": messages,
        "array_sizes": sizes,
        "rounds": [],
    }
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    # which implementation this process polls with (the patched one says patch_polling)
    doc["get_message_ins"] = InMemoryLinkState.get_message_ins.__qualname__
    t_run = time.perf_counter()
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        nodes, all_nodes = sample_nodes(grid, per_round, per_round)
        exchange, ok, errors = 0.0, 0, 0
        bodies: list[float] = []
        dispatch, collect = 0.0, 0.0
        for step in range(1, messages + 1):
            last = step == messages
            content_fields = {"server-round": rnd, "step": step, "steps": messages}
            msgs = []
            for node in nodes:
                content = RecordDict({CONFIG: ConfigRecord(dict(content_fields))})
                if last:
                    content[ARRAYS] = arrays
                msgs.append(Message(content, dst_node_id=node, message_type="train"))
            w0, t1 = time.time(), time.perf_counter()
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
            exchange += time.perf_counter() - t1
            w1 = time.time()
            starts, ends = [], []
            for reply in replies:
                if reply.has_error():
                    errors += 1
                    continue
                m = reply.content[METRICS]
                if not isinstance(m, MetricRecord) or (
                    last
                    and (ARRAYS not in reply.content or len(reply.content[ARRAYS]) != len(sizes))
                ):
                    errors += 1
                    continue
                ok += 1
                starts.append(_num(m["t-start"]))
                ends.append(_num(m["t-end"]))
                bodies.append(_num(m["body-seconds"]))
            if starts:
                dispatch += max(starts) - w0
                collect += w1 - max(ends)
        seconds = time.perf_counter() - t0
        doc["rounds"].append(
            {
                "round": rnd,
                "seconds": seconds,
                "send_and_receive_seconds": exchange,
                "sampled": len(nodes),
                "connected": len(all_nodes),
                "replies_ok": ok,
                "errors": errors,
                "expected_replies": len(nodes) * messages,
                # summed over the round's exchanges: send -> the last client's start, and the
                # last client's end -> send_and_receive returned
                "dispatch_seconds": dispatch,
                "collect_seconds": collect,
                "client_body_seconds_median": statistics.median(bodies) if bodies else None,
                "client_body_seconds_sum": sum(bodies),
            }
        )
        doc["seconds_total"] = time.perf_counter() - t_run
        write_json(out, doc)


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Reply at once: timing metrics, and zero arrays of the sizes received (if any)."""
    t_start, p0 = time.time(), time.perf_counter()
    content = RecordDict()
    if ARRAYS in msg.content:
        received = msg.content[ARRAYS]
        assert isinstance(received, ArrayRecord)
        content[ARRAYS] = ArrayRecord(
            {k: Array(np.zeros(a.shape, dtype=np.float32)) for k, a in received.items()}
        )
    body = time.perf_counter() - p0
    content[METRICS] = MetricRecord(
        {"t-start": t_start, "t-end": time.time(), "body-seconds": body}
    )
    return Message(content=content, reply_to=msg)
