"""Memory and time of one client by client size, written to a results file.

Run: ``python -m fedrec.simulations.bench_footprint --out simulations/results/bench/footprint.json``

For each client size (one user; one silo of 10, of 4; one silo holding every user) a fresh
process plays one client as a simulation actor does (one torch thread, the imports a ClientApp
actor has, the client's state built by :func:`fedrec.client.runtime.client_state`, the run's
default settings unless ``--set`` says otherwise) and trains ``--rounds`` DP rounds with
:func:`fedrec.client.local_train.train_round`. Each process reports its peak RSS (``ru_maxrss``:
the whole process, imports, backbone, catalog cache and training), its RSS after set-up, and the
wall time of each round. The parent writes medians over ``--repeats`` processes per setting.

Settings measured per size:

- ``default``: the defaults (``expected-batch`` 16, ``physical-batch`` 16);
- ``q0.5``: every client at ``sample-rate`` 0.5 (the old default, sized for one-user clients:
  a silo's logical batch is thousands of examples), with the default physical-batch bound;
- ``q0.5-unbounded`` (one user and 10 silos only; larger silos would take 10 GB and more):
  the same with ``physical-batch`` 0, the baseline the bound is measured against.

The ``q0.5`` settings train ONE local step in ONE round per process (``local-steps`` 1): memory
does not depend on the number of steps, and a silo of every user at q 0.5 takes minutes per step
on this machine. Their round times are per step; the default setting's are per round.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name -> run-config keys of the partition; the client measured is partition 0
SIZES: dict[str, dict[str, Any]] = {
    "one-user": {"partition": "user"},
    "silo-of-10": {"partition": "silo", "silos": 10},
    "silo-of-4": {"partition": "silo", "silos": 4},
    "silo-of-1": {"partition": "silo", "silos": 1},
}
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "q0.5": {"sample-rate": 0.5, "local-steps": 1},
    "q0.5-unbounded": {"sample-rate": 0.5, "local-steps": 1, "physical-batch": 0},
}
ONE_ROUND = ("q0.5", "q0.5-unbounded")  # settings measured on one round per process
UNBOUNDED_SIZES = ("one-user", "silo-of-10")


def child(raw: dict[str, Any], rounds: int) -> dict[str, Any]:
    """One client in this process: set-up, then ``rounds`` rounds; measurements as a dict."""
    import torch

    torch.set_num_threads(1)  # as in a simulation actor (one per core)
    import flwr.simulation  # noqa: F401 - what a ClientApp actor process has imported
    import ray  # noqa: F401

    from fedrec.client.budget import MemoryStore
    from fedrec.client.local_train import train_round
    from fedrec.client.runtime import client_state
    from fedrec.shared.federation.config import parse_run_config

    cfg = parse_run_config(raw, where="bench_footprint")
    t0 = time.perf_counter()
    st = client_state(cfg, {"partition-id": 0})
    setup = time.perf_counter() - t0
    rss_setup = _rss_now_mb()
    store = MemoryStore()
    times, results = [], []
    for r in range(rounds):
        t = time.perf_counter()
        res = train_round(st.scorer, st.examples, cfg, store, seed=r)
        times.append(time.perf_counter() - t)
        results.append(res)
    q = cfg.client_sample_rate(st.examples.users)
    return {
        "users": int(st.examples.users),
        "examples": len(st.examples),
        "sample_rate": q,
        "expected_logical_batch": q * len(st.examples),
        "physical_batch": cfg.physical_batch,
        "local_steps": cfg.local_steps,
        "trained": all(r.trained for r in results),
        "epsilon": results[-1].epsilon if results else None,
        "setup_seconds": setup,
        "rss_after_setup_mb": rss_setup,
        "round_seconds": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results file (JSON)")
    ap.add_argument("--rounds", type=int, default=3, help="DP rounds per process")
    ap.add_argument("--repeats", type=int, default=1, help="processes per (size, setting)")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--settings", default=",".join(SETTINGS), help=", ".join(SETTINGS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config keys for every measurement (e.g. local-steps=2)")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: JSON run config
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.rounds)), flush=True)
        return
    if args.out is None:
        ap.error("--out is required")
    from fedrec.shared.federation.config import parse_run_config, parse_sets
    from fedrec.shared.rundir import versions, write_json

    common = parse_sets(args.set)
    sizes = [s for s in args.sizes.split(",") if s]
    settings = [s for s in args.settings.split(",") if s]
    for name, known in (("size", SIZES), ("setting", SETTINGS)):
        bad = [s for s in (sizes if name == "size" else settings) if s not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}: choose from {', '.join(known)}")
    rows = []
    for size in sizes:
        for setting in settings:
            if setting.endswith("unbounded") and size not in UNBOUNDED_SIZES:
                continue
            raw = {**SIZES[size], **SETTINGS[setting], **common}
            parse_run_config(raw, where="bench_footprint")  # bad keys fail before any work
            runs: list[dict[str, Any]] = []
            for _ in range(args.repeats):
                proc = subprocess.run(
                    [sys.executable, "-m", "fedrec.simulations.bench_footprint",
                     "--child", json.dumps(raw),
                     "--rounds", str(1 if setting in ONE_ROUND else args.rounds)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    runs.append({"failed": True, "returncode": proc.returncode,
                                 "stderr_tail": proc.stderr[-2000:]})  # fmt: skip
                    continue
                runs.append(json.loads(found[-1].removeprefix("RESULT ")))
            ok = [r for r in runs if not r.get("failed")]
            row: dict[str, Any] = {"size": size, "setting": setting, "config": raw, "runs": runs}
            if ok:
                row |= {
                    "users": ok[0]["users"],
                    "examples": ok[0]["examples"],
                    "sample_rate": ok[0]["sample_rate"],
                    "expected_logical_batch": ok[0]["expected_logical_batch"],
                    "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in ok),
                    "rss_after_setup_mb_median": statistics.median(
                        r["rss_after_setup_mb"] for r in ok
                    ),
                    "round_seconds_median": statistics.median(
                        t for r in ok for t in r["round_seconds"]
                    ),
                    "all_trained": all(r["trained"] for r in ok),
                }
            rows.append(row)
            _print_row(row)
    write_json(
        args.out,
        {
            "what": "peak RSS and round time of one client process by client size",
            "command": " ".join(["python -m fedrec.simulations.bench_footprint", *sys.argv[1:]]),
            "rounds_per_process": args.rounds,
            "repeats": args.repeats,
            "rows": rows,
            "versions": versions(),
        },
    )


def _print_row(row: dict[str, Any]) -> None:
    if "peak_rss_mb_median" not in row:
        print(f"{row['size']:>11} {row['setting']:>15}: FAILED", flush=True)
        return
    print(
        f"{row['size']:>11} {row['setting']:>15}: {row['users']:>4} users, "
        f"{row['examples']:>6} examples, q {row['sample_rate']:.4g} "
        f"(batch ~{row['expected_logical_batch']:.0f}), peak RSS "
        f"{row['peak_rss_mb_median']:.0f} MB, round {row['round_seconds_median']:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
