"""Round cost of fedrec against a no-op ClientApp on the same runtime, on this machine.

Run: ``python -m fedrec.simulations.bench_round --out FILE [--variants noop-1,noop-4,fedrec-dp,
fedrec-secagg] [--clients-per-round 94,943] [--rounds 3] [--rounds-at VARIANT@C=R ...]
[--supernodes 943] [--body-clients 6] [--keep DIR]``

Every variant is one real ``flwr run`` against a private local SuperLink in simulation mode
(Ray backend, one actor per CPU core, nice 15), started exactly as ``fedrec simulate`` starts it
(:func:`fedrec.simulations.launch.simulate`), with ``--supernodes`` N virtual SuperNodes (943:
fedrec's ``partition=user`` on ML-100K) and C clients sampled per round:

- ``noop-1``: :mod:`fedrec.simulations.noop_app`, one message per client per round (a small
  ConfigRecord and fedrec's 4,774 float32 values, 19 KB) answered at once with as many values;
  the ceiling of the runtime for fedrec's plain rounds.
- ``noop-4``: the same with four messages per client per round in sequence (the exchanges
  secure aggregation needs), the last one carrying the arrays.
- ``fedrec-dp``: ``fedrec simulate --preset central-dp --set fraction-train=F --set
  num-rounds=R --set evaluate-every=0 --baselines none`` (user-level DP with a trusted server,
  one message per client per round; since bc26920 the preset is the default ``secure``
  federation's training with ``secure-agg=false``, before it an older setting of 8 local steps
  on disjoint examples, which the results files of earlier commits ran with their ``--set``
  values on top; results files record the resolved settings as ``fedrec_config``), called
  in-process through :func:`~fedrec.simulations.launch.simulate`; ``F = (C + 0.5) / N`` so
  that Flower's FedAvg samples exactly C (``int(N * F)``), 1.0 for C = N.
- ``fedrec-secagg``: the same with ``--set secure-agg=true`` (SecAgg+ with distributed Skellam
  noise, four exchanges per round).

The no-op ServerApp is launched by :func:`run_app`, a copy of ``simulate()``'s steps (same
SuperLink flags, federation config, nice level and process-tree shutdown, its project written
by ``launch.app_project`` with the two components swapped); ``simulate()`` itself has no hook
for other components.

``VARIANT+poll``: the same run with fedrec's per-node message index for Flower's in-memory link
state (:mod:`fedrec.server.sim_runtime`, which fedrec's ServerApp installs in every simulation)
in the ``flwr-simulation`` process; the plain variants run Flower's link state as shipped (the
fedrec ones with ``FEDREC_FLOWER_LINKSTATE_INDEX=0``). Ratios to the plain variant measured in
the same invocation are reported when that one is listed first.

Round seconds. No-op: measured by the ServerApp (``time.perf_counter`` around the whole round:
sampling, message construction and the ``send_and_receive`` calls). fedrec: the ServerApp
appends one line per finished round to ``RUN/progress.jsonl`` (at the end of its aggregation);
a thread here polls the file every 50 ms and takes each line's time from the file's mtime, so
round r (r >= 2) lasts from line r-1 to line r (the checkpoint save, sampling, the exchanges and
the aggregation: the same span as the no-op's). Round 1 has no earlier line: its start is
Flower's ``configure_train: Sampled ...`` log line in ``RUN/flower.log`` (1 s resolution), so it
is approximate; it includes warm-up anyway. Reported: the MEDIAN round seconds over rounds
2..R, the per-client cost (median / C), the ratio fedrec / no-op at the same C (``fedrec-dp``
to ``noop-1``, ``fedrec-secagg`` to ``noop-4``), measured in the same invocation, and each
variant's total wall time (start-up, rounds and, for fedrec, the final test evaluation).

In-process measurements (this process, one thread as in a Ray actor with one CPU): the
ClientApp body of fedrec's plain train round (``fedrec.client.app.train`` on ``--body-clients``
distinct partitions, the first call, which builds the data and the model, left out) and of the
secure stages for a group of k + 1 in-process nodes (k the SecAgg+ neighbours at that C;
``fedrec.client.secure``'s handlers: setup and share-keys on all of them, masked input and
unmask on up to ``--body-clients`` of them), and the bytes of each message as one node sees
them: payload bytes (array values and ``bytes`` fields) and the Flower wire bytes (the sum of
``deflate()`` over the message content's object tree, what a deployment pushes). Upload per
client per round: plain, the float32 update (4 x dim) with its metrics; secure, two public
keys, k ciphertexts (Fernet-encrypted Shamir shares of the 32-byte self-mask seed and of the
masking key), the masked uint32 vector (4 x dim) and the unmask shares. The server's own
per-stage seconds and payload bytes (``RUN/privacy/secagg.jsonl``) are copied into the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrec.shared.rundir import versions, write_json

VARIANTS = ("noop-1", "noop-4", "fedrec-dp", "fedrec-secagg")
# ``+poll``: the same run with noop_app.patch_polling applied in the flwr-simulation process (an
# experiment on Flower's per-node polling; not in the defaults)
PATCHED = tuple(f"{v}+poll" for v in VARIANTS)
BASELINE = {"fedrec-dp": "noop-1", "fedrec-secagg": "noop-4"} | {
    "fedrec-dp+poll": "noop-1+poll",
    "fedrec-secagg+poll": "noop-4+poll",
}
NOOP_MESSAGES = {"noop-1": 1, "noop-4": 4}
# fedrec's travelling update with the defaults (aggregator=ffa, lora-r=8, MiniLM, ML-100K):
# lora_B (384 x 8), the item bias (1,682 items) and the recency logits (history-len 20)
ARRAY_SIZES = (3072, 1682, 20)
SERVER_APP = "fedrec.simulations.noop_app:server"
CLIENT_APP = "fedrec.simulations.noop_app:client"
FULL = 943  # ML-100K's users: partition=user gives one SuperNode each
ROUND_TIMEOUT = 3600.0
_SAMPLED = re.compile(r"(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d):INFO:configure_train: Sampled (\d+) nodes")


# --- the runtime ----------------------------------------------------------------------------


def run_app(
    server: str,
    client: str,
    run_config: dict[str, Any],
    supernodes: int,
    workdir: Path,
    *,
    startup_timeout: float = 120.0,
) -> float:
    """``flwr run`` of ``server`` and ``client`` (``module:attribute``) on a private local
    SuperLink in simulation mode with ``supernodes`` virtual SuperNodes; the steps of
    :func:`fedrec.simulations.launch.simulate` with other components. Returns wall seconds;
    the run's log goes to ``workdir/flower.log``."""
    from fedrec.simulations import launch

    bindir = Path(sys.executable).parent
    cpus = os.cpu_count() or 1
    sim = [
        f"num-supernodes={supernodes}",
        "client-resources-num-cpus=1",
        "client-resources-num-gpus=0",
        "init-args-logging-level='error'",
        "init-args-log-to-driver=true",
        f"init-args-num-cpus={cpus}",
        "init-args-num-gpus=0",
    ]
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.pop("RAY_ADDRESS", None)
    workdir.mkdir(parents=True, exist_ok=True)
    flower_log = workdir / "flower.log"
    t0 = time.perf_counter()
    with launch._term_as_exit(), tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        home = Path(tmp)
        project = launch.app_project(home / "app", run_config)
        pyproject = project / "pyproject.toml"
        text = pyproject.read_text()
        for old, new in (
            ('serverapp = "fedrec.server.app:app"', f'serverapp = "{server}"'),
            ('clientapp = "fedrec.client.app:app"', f'clientapp = "{client}"'),
        ):
            if old not in text:
                raise RuntimeError(f"launch.app_project no longer writes {old!r}")
            text = text.replace(old, new)
        pyproject.write_text(text)
        link, _ = launch.start_local_superlink(home, env, bindir, startup_timeout)
        try:
            with flower_log.open("ab") as f:
                run = subprocess.Popen(
                    [
                        sys.executable, str(bindir / "flwr"), "run", str(project), "fedrec-sim",
                        "--federation-config", " ".join(sim), "--stream",
                    ],
                    stdout=f, stderr=subprocess.STDOUT, env=env, cwd=home,
                )  # fmt: skip
                try:
                    run.wait()
                finally:
                    if run.poll() is None:
                        run.terminate()
                        run.wait(timeout=30)
        finally:
            launch._stop(link)
    if run.returncode != 0:
        raise RuntimeError(
            f"flwr run of {server} exited with {run.returncode}; the end of {flower_log}:\n"
            + launch._tail(flower_log)
        )
    return time.perf_counter() - t0


class RoundClock(threading.Thread):
    """Times the lines the ServerApp appends to ``RUN/progress.jsonl``: each round line gets
    the file's mtime when it is the only new line of a poll (else the poll's time)."""

    def __init__(self, progress: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path, self.interval = progress, interval
        self.offset = 0
        self.times: dict[int, float] = {}
        self.exact: dict[int, bool] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.poll()
            self.halt.wait(self.interval)
        self.poll()

    def poll(self) -> None:
        import json

        try:
            st = self.path.stat()
        except OSError:
            return
        if st.st_size <= self.offset:
            return
        seen = time.time()
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        lines = [json.loads(x) for x in chunk[:end].splitlines() if x.strip()]
        rounds = [x for x in lines if "accepted" in x]  # not the central validation lines
        for info in rounds:
            exact = len(lines) == 1
            self.times[int(info["round"])] = st.st_mtime if exact else seen
            self.exact[int(info["round"])] = exact


def _round_starts(flower_log: Path) -> dict[int, float]:
    """Round -> time of Flower's ``configure_train: Sampled`` log line (1 s resolution)."""
    out: dict[int, float] = {}
    try:
        text = flower_log.read_text(errors="replace")
    except OSError:
        return out
    for i, m in enumerate(_SAMPLED.finditer(text), start=1):
        out[i] = datetime.strptime(m.group(1), "%m/%d/%Y %H:%M:%S").timestamp()
    return out


def fraction_for(clients: int, supernodes: int) -> float:
    """``fraction-train`` for which Flower's FedAvg samples exactly ``clients`` of
    ``supernodes`` (it takes ``int(supernodes * fraction)``)."""
    frac = 1.0 if clients >= supernodes else (clients + 0.5) / supernodes
    if max(int(supernodes * frac), 2) != clients:
        raise ValueError(f"no fraction-train samples {clients} of {supernodes}")
    return frac


# ``--set KEY=VALUE`` for the fedrec variants (and the in-process bodies), on top of the preset
EXTRA_SETS: dict[str, str] = {}


def fedrec_sets(secure: bool, clients: int, supernodes: int, rounds: int) -> dict[str, str]:
    sets = dict(EXTRA_SETS) | {
        "fraction-train": repr(fraction_for(clients, supernodes)),
        "num-rounds": str(rounds),
        "evaluate-every": "0",
    }
    if supernodes != FULL:  # a smaller federation (smoke tests): N silos of whole users
        sets |= {"partition": "silo", "silos": str(supernodes)}
    if secure:
        sets["secure-agg"] = "true"
    return sets


# --- the variants ---------------------------------------------------------------------------


def run_noop(
    variant: str, supernodes: int, clients: int, rounds: int, workdir: Path
) -> dict[str, Any]:
    import json

    bench_file = workdir / "noop.json"
    run_config = {
        "bench-file": str(bench_file),
        "num-rounds": rounds,
        "clients-per-round": clients,
        "messages": NOOP_MESSAGES[variant.removesuffix("+poll")],
        "patch-polling": variant.endswith("+poll"),
        "array-sizes": ",".join(str(s) for s in ARRAY_SIZES),
        "round-timeout": ROUND_TIMEOUT,
    }
    wall = run_app(SERVER_APP, CLIENT_APP, run_config, supernodes, workdir)
    doc = json.loads(bench_file.read_text())
    recs = doc["rounds"]
    bad = [r for r in recs if r["replies_ok"] != r["expected_replies"]]
    if len(recs) != rounds or bad:
        raise RuntimeError(f"{variant}: {len(recs)} rounds, incomplete ones: {bad}")
    return {
        "round_seconds": [r["seconds"] for r in recs],
        "wall_seconds": wall,
        "rounds_detail": recs,
        "get_message_ins": doc.get("get_message_ins"),
    }


def run_fedrec(
    variant: str, supernodes: int, clients: int, rounds: int, workdir: Path
) -> dict[str, Any]:
    import json

    from fedrec.server.user_dp import sample_size
    from fedrec.simulations.launch import n_clients, resolve, simulate

    secure = variant.removesuffix("+poll") == "fedrec-secagg"
    sets = fedrec_sets(secure, clients, supernodes, rounds)
    cfg, _ = resolve(None, sets, preset="central-dp")
    if n_clients(cfg) != supernodes or sample_size(cfg, supernodes) != clients:
        raise ValueError(f"{variant}: {sets} does not give {clients} of {supernodes} clients")
    out = workdir / "run"
    clock = RoundClock(out / "progress.jsonl")
    clock.start()
    t0 = time.perf_counter()
    try:
        # fedrec's ServerApp installs the link-state index itself (+poll); the plain variant
        # runs Flower's link state as shipped
        from fedrec.server import sim_runtime

        before = os.environ.get(sim_runtime.ENV)
        os.environ[sim_runtime.ENV] = "1" if variant.endswith("+poll") else "0"
        try:
            metrics = simulate(cfg, out, baselines="none")
        finally:
            if before is None:
                os.environ.pop(sim_runtime.ENV, None)
            else:
                os.environ[sim_runtime.ENV] = before
    finally:
        clock.halt.set()
        clock.join()
    wall = time.perf_counter() - t0
    ends = clock.times
    if sorted(ends) != list(range(1, rounds + 1)):
        raise RuntimeError(f"{variant}: progress lines for rounds {sorted(ends)}, not 1..{rounds}")
    starts = _round_starts(out / "flower.log")
    secs = [ends[r] - ends[r - 1] for r in range(2, rounds + 1)]
    first = ends[1] - starts[1] if 1 in starts else None
    progress = [
        json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines() if x.strip()
    ]
    result: dict[str, Any] = {
        "round_seconds": [first, *secs],
        "round_1_approximate": True,
        "round_end_times_exact": all(clock.exact.values()),
        "round_seconds_from_log": [
            ends[r] - starts[r] for r in range(1, rounds + 1) if r in starts
        ],
        "wall_seconds": wall,
        "sets": sets,
        "progress": [x for x in progress if "accepted" in x],
        "upload_bytes_per_client_round": metrics.get("model", {}).get(
            "upload_bytes_per_client_round"
        ),
        "metrics_seconds": metrics.get("seconds"),
    }
    secagg_log = out / "privacy" / "secagg.jsonl"
    if secagg_log.is_file():
        recs = [json.loads(x) for x in secagg_log.read_text().splitlines() if x.strip()]
        result["secagg_records"] = recs
        later = [r for r in recs if r.get("round", 0) >= 2] or recs
        # the server's own per-stage timings and payload bytes (RUN/privacy/secagg.jsonl)
        stages = sorted({s for r in later for s in r.get("stages", {})})
        result["secagg_stage_seconds_median"] = {
            s: statistics.median(r["stages"][s]["seconds"] for r in later if s in r["stages"])
            for s in stages
        }
        result["secagg_stage_bytes"] = {
            s: {k: v for k, v in later[-1]["stages"][s].items() if "bytes" in k}
            for s in stages
            if s in later[-1].get("stages", {})
        }
        if all("seconds" in r for r in later):
            result["secagg_round_seconds_median"] = statistics.median(r["seconds"] for r in later)
    return result


# --- in-process: the ClientApp bodies and the bytes -----------------------------------------


def _wire(content: Any) -> int:
    """Flower's serialized size of a RecordDict: every object of its tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())


def _payload(rec: Any) -> int:
    """Raw bytes of a record's array values and ``bytes`` values (no names, no numbers, no
    framing, no .npy headers)."""
    from flwr.app import ArrayRecord, ConfigRecord

    if isinstance(rec, ArrayRecord):
        return sum(int(a.numpy().nbytes) for a in rec.values())
    if isinstance(rec, ConfigRecord):
        total = 0
        for v in rec.values():
            vals = v if isinstance(v, list) else [v]
            total += sum(len(x) for x in vals if isinstance(x, bytes))
        return total
    return 0


class InProcessClients:
    """fedrec's ClientApp body called in this process as a simulation actor calls it: one
    thread, a task identity, the global arrays of ``cfg``'s initial model, ML-100K's catalog
    digest and ``run_dir`` in every train message. Shared by the in-process benchmarks."""

    def __init__(self, cfg: Any, supernodes: int, run_dir: Path) -> None:
        import torch
        from flwr.supercore.task_identity import TaskIdentity

        from fedrec.shared.federation.data_and_model import (
            catalog_digest,
            dataset_and_split,
            model_for,
            resolve_data_dir,
        )
        from fedrec.shared.federation.params import travelling_state

        torch.set_num_threads(1)  # a Ray actor with num_cpus=1 runs one thread
        # Flower builds messages inside a task; give this process one, as the runtime does
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        ds, split = dataset_and_split(resolve_data_dir(cfg.data), cfg.protocol, cfg.seed)
        self.state = travelling_state(model_for(cfg, ds, split))
        self.catalog = catalog_digest(ds.item_texts())
        self.supernodes, self.run_dir = supernodes, run_dir

    def train_msg(self, c: Any, node: int, extra: dict[str, Any] | None = None) -> Any:
        """A round-1 train message to ``node`` under the settings ``c`` (``extra``: a SecAgg+
        stage's config record)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedrec.server.secure_agg import SECAGG
        from fedrec.shared.federation import contract
        from fedrec.shared.federation.params import to_record

        config = ConfigRecord(
            {
                **c.to_flat(),
                "catalog": self.catalog,
                "run-dir": str(self.run_dir),
                "server-round": 1,
            }
        )
        content = RecordDict({contract.ARRAYS: to_record(self.state), contract.CONFIG: config})
        if extra is not None:
            content[SECAGG] = ConfigRecord(extra)
        return Message(content, dst_node_id=node, message_type="train")

    def context(self, node: int, part: int) -> Any:
        """The node's context: partition ``part`` of ``supernodes``."""
        from flwr.app import Context, RecordDict

        return Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": part, "num-partitions": self.supernodes},
            state=RecordDict(),
            run_config={},
        )


def client_costs(
    supernodes: int, per_round: list[int], samples: int, workdir: Path
) -> dict[str, Any]:
    """fedrec's ClientApp bodies and message sizes, measured in this process."""
    from fedrec.client import app as client_app
    from fedrec.shared.federation import contract
    from fedrec.simulations.launch import resolve

    c0 = per_round[0]
    cfg, _ = resolve(None, fedrec_sets(False, c0, supernodes, 3), preset="central-dp")
    clients = InProcessClients(cfg, supernodes, workdir / "inproc")
    state, run_dir = clients.state, clients.run_dir
    dim = sum(t.numel() for t in state.values())
    shapes = {k: list(t.shape) for k, t in state.items()}
    train_msg, context = clients.train_msg, clients.context

    # the plain round (fedrec-dp): distinct partitions, the first call (the build) left out
    body, wire_in, wire_out = [], 0, 0
    reply = None
    for i in range(samples + 1):
        part = (i * 97) % supernodes
        msg = train_msg(cfg, part + 1)
        ctx = context(part + 1, part)
        t = time.perf_counter()
        reply = client_app.train(msg, ctx)
        if i:
            body.append(time.perf_counter() - t)
        wire_in, wire_out = _wire(msg.content), _wire(reply.content)
    assert reply is not None
    plain = {
        "client_body_seconds": body,
        "client_body_seconds_median": statistics.median(body),
        "upload_payload_bytes": _payload(reply.content[contract.ARRAYS])
        if contract.ARRAYS in reply.content
        else 0,
        "upload_wire_bytes": wire_out,
        "download_wire_bytes": wire_in,
    }

    secure: dict[str, Any] = {}
    for c in per_round:
        scfg, _ = resolve(None, fedrec_sets(True, c, supernodes, 3), preset="central-dp")
        try:
            secure[str(c)] = _secure_costs(
                scfg, c, dim, train_msg, context, plain, supernodes, samples
            )
        except ValueError as err:  # a cohort the secure plan refuses (too many colluders)
            secure[str(c)] = {"refused": str(err)}
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"dim": dim, "shapes": shapes, "plain": plain, "secure": secure}


def _secure_costs(
    scfg: Any,
    c: int,
    dim: int,
    train_msg: Callable[..., Any],
    context: Callable[[int, int], Any],
    plain: dict[str, Any],
    supernodes: int,
    samples: int,
) -> dict[str, Any]:
    """One SecAgg+ round of fedrec's client handlers for node 1 and its k neighbours (k + 1
    in-process nodes): each stage's body time and message bytes, as node 1 sees them."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedrec.client import secure as client_secure
    from fedrec.server.secure_agg import SECAGG, masked_request
    from fedrec.shared.privacy.distributed import plan as plan_secure

    p = plan_secure(scfg, c, dim, supernodes)
    # the server's graph: the plan raises the neighbour count above neighbours_for's start
    # until the collusion risk is within budget (471 of 943: 34 neighbours, not 28)
    k, threshold = p.neighbours, p.threshold
    nodes = list(range(1, k + 2))  # one group: node 1 and its k neighbours
    me = nodes[0]
    ctxs = {n: context(n, (n * 89) % supernodes) for n in nodes}
    common = {"round": 1, "bits": p.encoding.bits, "threshold": threshold, "test-dropout": ""}
    times: dict[str, list[float]] = {s: [] for s in ("setup", "share", "masked", "unmask")}
    up: dict[str, int] = {}
    up_payload: dict[str, int] = {}
    down: dict[str, int] = {}

    def stage(name: str, n: int, fields: dict[str, Any], base: bool = False) -> Any:
        f = {**common, "stage": f"secagg_{name}", **fields}
        if base:
            msg = train_msg(scfg, n, f)
        else:
            msg = Message(RecordDict({SECAGG: ConfigRecord(f)}), n, f"train.secagg_{name}")
        handler = client_secure.HANDLERS[f"secagg_{name}"]
        t = time.perf_counter()
        out = handler(msg, ctxs[n])
        times[name].append(time.perf_counter() - t)
        if n == me:
            down[name] = _wire(msg.content)
            up[name] = _wire(out.content)
            up_payload[name] = sum(_payload(r) for r in out.content.values())
        return out

    keys = {}
    for n in nodes:
        rec = stage("setup", n, {}).content[SECAGG]
        keys[n] = (rec["pk1"], rec["pk2"])
    group = {
        "ids": nodes,
        "pk1": [keys[i][0] for i in nodes],
        "pk2": [keys[i][1] for i in nodes],
    }
    routed: dict[int, list[tuple[int, bytes]]] = {n: [] for n in nodes}
    for n in nodes:
        rec = stage("share", n, group).content[SECAGG]
        for dst, ct in zip(rec["dst"], rec["ct"], strict=True):
            routed[int(dst)].append((n, bytes(ct)))
    enc = p.encoding
    timed = nodes[: max(1, min(samples, len(nodes)))]  # masked and unmask: these nodes
    for n in timed:
        stage("masked", n, masked_request(routed[n], p), base=True)  # the server's request
    for n in timed:
        stage("unmask", n, {"survivors": nodes, "dropped": []})
    cts = [len(ct) for _, ct in routed[me]]
    return {
        "neighbours": k,
        "threshold": threshold,
        "public_key_bytes": [len(keys[me][0]), len(keys[me][1])],
        "ciphertext_bytes_each": statistics.median(cts),
        "ciphertexts": len(cts),
        "masked_vector_bytes": (4 if enc.bits <= 32 else 8) * dim,
        "upload_payload_bytes_by_stage": up_payload,
        "upload_payload_bytes": sum(up_payload.values()),
        "upload_wire_bytes_by_stage": up,
        "upload_wire_bytes": sum(up.values()),
        "download_wire_bytes_by_stage": down,
        "download_wire_bytes": sum(down.values()),
        "client_body_seconds_by_stage": {s: statistics.median(v) for s, v in times.items()},
        "client_body_samples_by_stage": {s: len(v) for s, v in times.items()},
        "ratio_upload_payload_to_plain": sum(up_payload.values()) / (4 * dim),
        "ratio_upload_wire_to_plain": sum(up.values()) / plain["upload_wire_bytes"],
    }


# --- the benchmark --------------------------------------------------------------------------


def _median_after_first(secs: list[float | None]) -> float:
    later = [s for s in secs[1:] if s is not None]
    if not later:  # one round: nothing but the warm-up round to report
        return float(secs[0]) if secs and secs[0] is not None else float("nan")
    return statistics.median(later)


def _body_seconds(costs: dict[str, Any] | None, variant: str, c: int) -> float | None:
    """One client's ClientApp time per round, measured in-process (all four stages for
    secure aggregation), or None."""
    if not costs:
        return None
    variant = variant.removesuffix("+poll")
    if variant == "fedrec-dp":
        return float(costs["plain"]["client_body_seconds_median"])
    if variant == "fedrec-secagg" and str(c) in costs["secure"]:
        return float(sum(costs["secure"][str(c)]["client_body_seconds_by_stage"].values()))
    return None


def parse_rounds_at(items: list[str]) -> dict[tuple[str, int], int]:
    out = {}
    for item in items:
        m = re.fullmatch(r"([a-z0-9+-]+)@(\d+)=(\d+)", item.strip())
        if not m or m.group(1) not in VARIANTS + PATCHED or int(m.group(3)) < 1:
            raise ValueError(
                f"--rounds-at {item!r}: VARIANT@C=R with VARIANT in {VARIANTS + PATCHED}"
            )
        out[(m.group(1), int(m.group(2)))] = int(m.group(3))
    return out


def bench(
    variants: list[str],
    per_round: list[int],
    *,
    supernodes: int,
    rounds: int,
    rounds_at: dict[tuple[str, int], int],
    body_clients: int,
    workdir: Path,
    out: Path,
) -> dict[str, Any]:
    from fedrec.simulations.launch import resolve

    doc: dict[str, Any] = {
        "kind": "round-cost",
        "settings": {
            "variants": variants,
            "clients_per_round": per_round,
            "supernodes": supernodes,
            "rounds": rounds,
            "rounds_at": {f"{v}@{c}": r for (v, c), r in rounds_at.items()},
            "array_sizes": list(ARRAY_SIZES),
            "preset": "central-dp",
            "fedrec_sets": dict(EXTRA_SETS),
            # what the preset and the sets resolve to (the trusted variant at the first cohort
            # size; the secure one adds secure-agg): a preset's meaning can change between
            # commits (central-dp did at bc26920), this does not
            "fedrec_config": dataclasses.asdict(
                resolve(
                    None, fedrec_sets(False, per_round[0], supernodes, rounds), preset="central-dp"
                )[0]
            ),
            "median_over": "rounds 2..R (round 1 includes warm-up)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "results": [],
        "versions": versions(),
    }
    results: list[dict[str, Any]] = doc["results"]
    if body_clients > 0:
        print("in-process ClientApp bodies and message sizes ...", flush=True)
        doc["client_costs"] = client_costs(supernodes, per_round, body_clients, workdir)
        write_json(out, doc)
    for c in per_round:
        for v in variants:
            r = rounds_at.get((v, c), rounds)
            print(f"{v}: {c} of {supernodes} clients per round, {r} rounds ...", flush=True)
            wd = workdir / f"{v}-c{c}"
            runner = run_noop if v.startswith("noop") else run_fedrec
            if "secagg" in v:
                from fedrec.shared.privacy.distributed import check_cohort

                scfg, _ = resolve(None, fedrec_sets(True, c, supernodes, r), preset="central-dp")
                try:
                    check_cohort(scfg, supernodes)
                except ValueError as err:  # recorded, not measured: the plan refuses it
                    print(f"  refused: {err}", flush=True)
                    results.append({"variant": v, "clients_per_round": c, "refused": str(err)})
                    write_json(out, doc)
                    continue
            res = runner(v, supernodes, c, r, wd)
            med = _median_after_first(res["round_seconds"])
            row = {
                "variant": v,
                "clients_per_round": c,
                "supernodes": supernodes,
                "rounds": r,
                "median_round_seconds": med,
                "per_client_seconds": med / c,
                **res,
            }
            base = next(
                (x for x in results if x["variant"] == BASELINE.get(v) and "refused" not in x and
                 x["clients_per_round"] == c),
                None,
            )  # fmt: skip
            if base is not None:
                row["baseline"] = base["variant"]
                row["ratio_to_baseline"] = med / base["median_round_seconds"]
            plain = next(
                (x for x in results if x["variant"] == v.removesuffix("+poll") and
                 "refused" not in x and x["clients_per_round"] == c and v.endswith("+poll")),
                None,
            )  # fmt: skip
            if plain is not None:
                row["ratio_to_unpatched"] = med / plain["median_round_seconds"]
            body = _body_seconds(doc.get("client_costs"), v, c)
            if body is not None:
                # the clients' own compute if the actors (one per core) were never idle
                actors = os.cpu_count() or 1
                row["client_body_seconds"] = body
                row["client_compute_seconds_per_round"] = c * body / actors
                row["client_compute_share_of_round"] = c * body / actors / med
            results.append(row)
            print(
                f"  median round {med:.2f} s, {med / c * 1000:.1f} ms per client"
                + (f", {row['ratio_to_baseline']:.2f}x {row['baseline']}" if base else "")
                + f"; wall {res['wall_seconds']:.0f} s",
                flush=True,
            )
            doc["summary"] = summary(doc)
            write_json(out, doc)
    return doc


def summary(doc: dict[str, Any]) -> list[str]:
    lines = []
    for x in doc["results"]:
        if "refused" in x:
            lines.append(f"{x['variant']} C={x['clients_per_round']}: refused ({x['refused']})")
            continue
        ratio = (
            f", {x['ratio_to_baseline']:.2f}x {x['baseline']}" if "ratio_to_baseline" in x else ""
        ) + (
            f", {x['ratio_to_unpatched']:.2f}x without the patch"
            if "ratio_to_unpatched" in x
            else ""
        )
        lines.append(
            f"{x['variant']} C={x['clients_per_round']} (N={x['supernodes']}, R={x['rounds']}): "
            f"median round {x['median_round_seconds']:.2f} s, "
            f"{x['per_client_seconds'] * 1000:.1f} ms per client{ratio}; "
            f"wall {x['wall_seconds']:.0f} s"
            + (
                f"; ClientApp bodies alone {x['client_compute_seconds_per_round']:.1f} s a round "
                f"({x['client_compute_share_of_round']:.0%})"
                if "client_compute_seconds_per_round" in x
                else ""
            )
        )
    costs = doc.get("client_costs")
    if costs:
        plain = costs["plain"]
        lines.append(
            f"fedrec plain round ClientApp body (in-process): "
            f"{plain['client_body_seconds_median'] * 1000:.0f} ms median; upload "
            f"{plain['upload_payload_bytes']} B payload, {plain['upload_wire_bytes']} B wire"
        )
        for c, s in costs["secure"].items():
            if "refused" in s:
                lines.append(f"secure aggregation, C={c}: refused ({s['refused']})")
                continue
            lines.append(
                f"secure aggregation, C={c} (k={s['neighbours']}): upload "
                f"{s['upload_payload_bytes']} B payload ({s['ratio_upload_payload_to_plain']:.2f}x"
                f" plain), {s['upload_wire_bytes']} B wire "
                f"({s['ratio_upload_wire_to_plain']:.2f}x plain)"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--clients-per-round", default="94,943")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--rounds-at",
        action="append",
        default=[],
        help="VARIANT@C=R: R rounds for that variant at C clients per round (repeatable)",
    )
    ap.add_argument("--supernodes", type=int, default=FULL)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fedrec setting for the fedrec variants, on top of the central-dp preset "
        "(repeatable; e.g. negative-sampling=shared)",
    )
    ap.add_argument(
        "--body-clients",
        type=int,
        default=12,
        help="clients timed in-process for the ClientApp body (0: skip that and the bytes)",
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS + PATCHED for v in variants):
        ap.error(f"--variants {args.variants!r}: a comma list of {', '.join(VARIANTS + PATCHED)}")
    try:
        per_round = [int(x) for x in args.clients_per_round.split(",") if x.strip()]
        rounds_at = parse_rounds_at(args.rounds_at)
        if not per_round or min(per_round) < 3 or max(per_round) > args.supernodes:
            raise ValueError(
                f"--clients-per-round {args.clients_per_round!r}: integers in "
                f"[3, --supernodes={args.supernodes}]"
            )
        for c in per_round:
            fraction_for(c, args.supernodes)
    except ValueError as err:
        ap.error(str(err))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            ap.error(f"--set {item!r}: expected KEY=VALUE, e.g. negative-sampling=shared")
        EXTRA_SETS[key.strip()] = value.strip()
    try:
        from fedrec.simulations.launch import resolve

        resolve(None, fedrec_sets(True, per_round[0], args.supernodes, 1), preset="central-dp")
    except (ValueError, KeyError) as err:
        ap.error(f"--set: {err}")
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            workdir = args.keep
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-round-")))
        doc = bench(
            variants,
            per_round,
            supernodes=args.supernodes,
            rounds=args.rounds,
            rounds_at=rounds_at,
            body_clients=args.body_clients,
            workdir=workdir.resolve(),
            out=args.out,
        )
    write_json(args.out, doc)
    print("\n".join(doc.get("summary", [])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
