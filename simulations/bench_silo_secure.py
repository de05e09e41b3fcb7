"""One silo's cost per round without a trusted server (``silos-secure``) and with one, measured
in the same invocation; written to a results file.

Run: ``python -m fedrec.simulations.bench_silo_secure --out
simulations/results/bench/silo-secure.json [--rounds 3] [--repeats 2] [--variants ...]``

Every variant plays silo 0 of ML-100K's ten (partition ``silo``, the presets' ``silos = 10``)
in a FRESH process, as a simulation actor does (one torch thread, a task identity), through
fedrec's ClientApp handlers (:mod:`fedrec.client.app`, :mod:`fedrec.client.secure`) on the
initial global model, for ``--rounds`` rounds:

- ``silos-secure``: the preset (per-interaction DP, every window every round, the Skellam noise
  share added on the silo inside SecAgg+). A round is the four stages as the server asks them:
  ``setup`` and ``share`` on all ten silos (their keys are needed for silo 0's shares; the
  other nine run in the same process and are not timed), then silo 0's ``masked`` (its full-batch
  step, projection, integer encoding, noise share and masks) and ``unmask``. Timed: silo 0's
  four handler calls. The masked-stage request is the server's own calibration
  (:func:`~fedrec.shared.privacy.secure_interaction.plan_interaction`), which silo 0 checks.
- ``trusted-server-q1``: the same step (sample-rate 1, the same ``batch-divisor`` and
  ``physical-batch``) with ``dp-noise = server``: silo 0 sends its unnoised float32 model, the
  server adds the noise. The secure variant's overhead over this one is what secure
  aggregation costs.
- ``silos-trusted-server``: that preset as shipped (sample-rate 0.1: a tenth of the windows).
- ``silos``: the local-noise preset (each silo adds its own DP-SGD noise; 10 local steps at
  sample-rate 0.1).

Reported per variant: the round seconds of the handlers (median over rounds 2..R of every
process; round 1 builds the data, the model and the scorer and is reported apart), by stage
for the secure variant; the bytes silo 0 uploads per round (payload: array values and ``bytes``
fields; wire: the sum of Flower's ``deflate()`` over the reply's object tree, what a deployment
pushes), by stage for the secure variant; and the process's peak RSS (``ru_maxrss``: imports,
data, model, training and, for the secure variant, the nine other silos' key material).
Ratios to ``trusted-server-q1`` use medians measured in this invocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# variant -> (preset, --set overrides on top of it)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "silos-secure": ("silos-secure", {}),
    "trusted-server-q1": (
        "silos-trusted-server",
        {"sample-rate": "1.0", "batch-divisor": "30176.0", "physical-batch": "64"},
    ),
    "silos-trusted-server": ("silos-trusted-server", {}),
    "silos": ("silos", {}),
}
BASELINE = "trusted-server-q1"
SILO = 0  # the silo measured (partition-id); node ids are partition + 1


def child(variant: str, rounds: int) -> dict[str, Any]:
    """Silo 0 under ``variant`` in this process for ``rounds`` rounds."""
    import torch

    torch.set_num_threads(1)  # a Ray actor with num_cpus=1 runs one thread
    import flwr.simulation  # noqa: F401 - what a ClientApp actor process has imported

    from fedrec.simulations.bench_round import InProcessClients
    from fedrec.simulations.launch import resolve

    preset, sets = VARIANTS[variant]
    cfg, _ = resolve(None, sets, preset=preset)
    work = Path(tempfile.mkdtemp(prefix="fedrec-bench-silo-"))
    try:
        clients = InProcessClients(cfg, cfg.silos, work / "run")
        rss_setup = _rss_now_mb()
        play = _secure_round if cfg.secure_agg else _plain_round
        per_round = [play(cfg, clients, r + 1) for r in range(rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "variant": variant,
        "preset": preset,
        "sets": sets,
        "settings": cfg.as_dict(),
        "rss_after_setup_mb": rss_setup,
        "rounds": per_round,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _message(clients: Any, cfg: Any, node: int, rnd: int, extra: dict[str, Any] | None) -> Any:
    """Round ``rnd``'s train message to ``node`` (``clients.train_msg`` sets round 1)."""
    from fedrec.shared.federation import contract

    msg = clients.train_msg(cfg, node, extra)
    msg.content[contract.CONFIG]["server-round"] = rnd
    return msg


def _plain_round(cfg: Any, clients: Any, rnd: int) -> dict[str, Any]:
    from fedrec.client import app as client_app
    from fedrec.shared.federation import contract
    from fedrec.simulations.bench_round import _payload, _wire

    msg = _message(clients, cfg, SILO + 1, rnd, None)
    ctx = clients.context(SILO + 1, SILO)
    t = time.perf_counter()
    reply = client_app.train(msg, ctx)
    secs = time.perf_counter() - t
    if contract.ARRAYS not in reply.content:
        raise RuntimeError(f"silo {SILO} did not train in round {rnd}: {reply.content}")
    return {
        "seconds": secs,
        "upload_payload_bytes": _payload(reply.content[contract.ARRAYS]),
        "upload_wire_bytes": _wire(reply.content),
        "download_wire_bytes": _wire(msg.content),
    }


def _secure_round(cfg: Any, clients: Any, rnd: int) -> dict[str, Any]:
    """The four SecAgg+ stages of one round: setup and share on every silo (the server's own
    graph and routing, :class:`~fedrec.shared.federation.secagg.SecAggServer`), then silo 0's
    masked input and unmask shares; silo 0's handler calls are timed."""
    import secrets

    from flwr.app import ConfigRecord, Message, RecordDict

    from fedrec.client import secure as client_secure
    from fedrec.server.secure_agg import SECAGG, masked_request
    from fedrec.shared.federation.secagg import SecAggServer
    from fedrec.shared.privacy.secure_interaction import plan_interaction
    from fedrec.simulations.bench_round import _payload, _wire

    dim = sum(t.numel() for t in clients.state.values())
    p = plan_interaction(cfg, cfg.silos, dim, cfg.silos)
    enc = p.encoding
    nodes = list(range(1, cfg.silos + 1))
    me = SILO + 1
    server = SecAggServer(
        nodes,
        k=p.neighbours,
        threshold=p.threshold,
        bits=enc.bits,
        dim=enc.dim,
        min_survivors=p.min_survivors,
        seed=secrets.randbits(63),
    )
    ctxs = getattr(clients, "_silo_contexts", None)
    if ctxs is None:  # a node's context persists across rounds, as in the runtime
        ctxs = {n: clients.context(n, n - 1) for n in nodes}
        clients._silo_contexts = ctxs
    common = {"round": rnd, "bits": enc.bits, "threshold": server.threshold, "test-dropout": ""}
    secs: dict[str, float] = {}
    up_payload: dict[str, int] = {}
    up_wire: dict[str, int] = {}
    down_wire: dict[str, int] = {}

    def stage(name: str, n: int, fields: dict[str, Any], base: bool = False) -> Any:
        f = {**common, "stage": f"secagg_{name}", **fields}
        if base:
            msg = _message(clients, cfg, n, rnd, f)
        else:
            msg = Message(RecordDict({SECAGG: ConfigRecord(f)}), n, f"train.secagg_{name}")
        handler = client_secure.HANDLERS[f"secagg_{name}"]
        t = time.perf_counter()
        out = handler(msg, ctxs[n])
        if n == me:
            secs[name] = time.perf_counter() - t
            up_payload[name] = sum(_payload(r) for r in out.content.values())
            up_wire[name] = _wire(out.content)
            down_wire[name] = _wire(msg.content)
        return out.content.get(SECAGG)  # the masked-input reply carries arrays instead

    keys = {}
    for n in nodes:
        rec = stage("setup", n, {})
        keys[n] = server.check_setup_reply(n, (rec["pk1"], rec["pk2"]))
    outgoing, commits = {}, {}
    group_ids: list[int] = []
    for n in nodes:
        group = server.group_keys_for(n, keys)
        ids = sorted(group)
        if n == me:  # no silo drops out: silo 0's survivors will be its whole group
            group_ids = ids
        rec = stage(
            "share",
            n,
            {"ids": ids, "pk1": [group[i][0] for i in ids], "pk2": [group[i][1] for i in ids]},
        )
        items = [(int(d), bytes(c)) for d, c in zip(rec["dst"], rec["ct"], strict=True)]
        server.check_share_reply(n, items)
        outgoing[n], commits[n] = items, rec["commit"]
    got = server.route(outgoing, commits).get(me, [])
    stage("masked", me, masked_request(got, p), base=True)  # the server's own request
    stage("unmask", me, {"survivors": group_ids, "dropped": []})
    for n in nodes:  # the round is over for the silos that were not timed too
        ctxs[n].state.pop(client_secure.STATE, None)
    return {
        "neighbours": p.neighbours,
        "threshold": server.threshold,
        "seconds": sum(secs.values()),
        "seconds_by_stage": secs,
        "upload_payload_bytes": sum(up_payload.values()),
        "upload_payload_bytes_by_stage": up_payload,
        "upload_wire_bytes": sum(up_wire.values()),
        "upload_wire_bytes_by_stage": up_wire,
        "download_wire_bytes": sum(down_wire.values()),
        "download_wire_bytes_by_stage": down_wire,
    }


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summarize(variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over processes (RSS) and over rounds 2..R of every process (time)."""
    later = [r for run in runs for r in run["rounds"][1:]]
    first = [run["rounds"][0]["seconds"] for run in runs]
    if not later:
        raise ValueError("--rounds must be at least 2: round 1 includes the build")
    row: dict[str, Any] = {
        "variant": variant,
        "processes": len(runs),
        "rounds_timed": len(later),
        "round_seconds_median": statistics.median(r["seconds"] for r in later),
        "round_seconds_min": min(r["seconds"] for r in later),
        "round_seconds_max": max(r["seconds"] for r in later),
        "first_round_seconds_median": statistics.median(first),
        "upload_payload_bytes": statistics.median(r["upload_payload_bytes"] for r in later),
        "upload_wire_bytes": statistics.median(r["upload_wire_bytes"] for r in later),
        "download_wire_bytes": statistics.median(r["download_wire_bytes"] for r in later),
        "peak_rss_mb_median": statistics.median(run["peak_rss_mb"] for run in runs),
        "rss_after_setup_mb_median": statistics.median(run["rss_after_setup_mb"] for run in runs),
    }
    if "seconds_by_stage" in later[0]:
        for key in (
            "seconds_by_stage",
            "upload_payload_bytes_by_stage",
            "upload_wire_bytes_by_stage",
        ):
            row[key] = {s: statistics.median(r[key][s] for r in later) for s in later[0][key]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results file (JSON)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per process (>= 2)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the variant to play
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.rounds)), flush=True)
        return
    if args.out is None:
        ap.error("--out is required")
    if args.rounds < 2 or args.repeats < 1:
        ap.error("--rounds must be at least 2 (round 1 builds the client) and --repeats >= 1")
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    from fedrec.shared.rundir import versions, write_json

    rows, raw = [], {}
    # interleaved: repeat 1 of every variant, then repeat 2, ... (drift hits all alike)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for v in variants:
            proc = subprocess.run(
                [sys.executable, "-m", "fedrec.simulations.bench_silo_secure",
                 "--child", v, "--rounds", str(args.rounds)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                raise SystemExit(
                    f"variant {v} (repeat {rep + 1}) failed with exit code {proc.returncode}:\n"
                    + proc.stderr[-3000:]
                )
            runs[v].append(json.loads(found[-1].removeprefix("RESULT ")))
            last = runs[v][-1]["rounds"]
            print(
                f"{v:>21} repeat {rep + 1}: rounds "
                + ", ".join(f"{r['seconds']:.1f}" for r in last)
                + f" s, peak RSS {runs[v][-1]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    for v in variants:
        rows.append(summarize(v, runs[v]))
        raw[v] = runs[v]
    by = {r["variant"]: r for r in rows}
    if BASELINE in by:
        base = by[BASELINE]
        for r in rows:
            r["ratio_round_seconds_to_" + BASELINE] = (
                r["round_seconds_median"] / base["round_seconds_median"]
            )
            r["ratio_peak_rss_to_" + BASELINE] = (
                r["peak_rss_mb_median"] / base["peak_rss_mb_median"]
            )
            r["ratio_upload_wire_to_" + BASELINE] = (
                r["upload_wire_bytes"] / base["upload_wire_bytes"]
            )
    for r in rows:
        print(
            f"{r['variant']:>21}: round {r['round_seconds_median']:.2f} s (median of "
            f"{r['rounds_timed']}), upload {r['upload_wire_bytes']:,.0f} B wire / "
            f"{r['upload_payload_bytes']:,.0f} B payload, "
            f"peak RSS {r['peak_rss_mb_median']:.0f} MB",
            flush=True,
        )
    write_json(
        args.out,
        {
            "what": "one silo's round time, upload and peak RSS, with and without a trusted server",
            "command": " ".join(["python -m fedrec.simulations.bench_silo_secure", *sys.argv[1:]]),
            "rounds_per_process": args.rounds,
            "repeats": args.repeats,
            "baseline": BASELINE,
            "rows": rows,
            "runs": raw,
            "versions": versions(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
