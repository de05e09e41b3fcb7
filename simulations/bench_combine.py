"""The SecAgg+ server's unmasking cost: rebuilding one secret per survivor from its Shamir shares,
in this process against a process pool (:func:`fedrec.shared.federation.secagg.combine_many`).

Run: ``python -m fedrec.simulations.bench_combine --out FILE [--secrets 471,943] [--repeats 3]``

For each count, ``--repeats`` timings of each way (the pool already started: a run pays its
start-up once, reported apart), medians, and the ratio in this run. Shares as in the default
federation: threshold 15 of 28 (the pool's result is checked equal to the serial one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from fedrec.shared.federation import secagg
from fedrec.shared.rundir import versions, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--secrets", default="471,943", help="comma list of secrets per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threshold", type=int, default=15)
    ap.add_argument("--shares", type=int, default=28)
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.secrets.split(",")]
    except ValueError:
        raise SystemExit(f"--secrets {args.secrets!r}: a comma list of integers") from None
    if not counts or min(counts) < 1 or args.repeats < 1:
        raise SystemExit("--secrets needs positive counts and --repeats at least 1")
    t0 = time.perf_counter()
    secagg.combine_many([[b""]] * secagg.PARALLEL_COMBINE_MIN)  # start the pool
    startup = time.perf_counter() - t0
    rows = []
    for n in counts:
        secrets = [os.urandom(secagg.SEED_BYTES) for _ in range(n)]
        groups = [
            secagg.split_secret(s, args.threshold, args.shares)[: args.threshold] for s in secrets
        ]
        times: dict[str, list[float]] = {"serial": [], "pool": []}
        for _ in range(args.repeats):
            for way, workers in (("serial", 1), ("pool", None)):
                t = time.perf_counter()
                got = secagg.combine_many(groups, workers=workers)
                times[way].append(time.perf_counter() - t)
                if got != secrets:
                    raise SystemExit(f"{way}: the rebuilt secrets differ from the shared ones")
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "secrets": n,
                "seconds": times,
                "median_seconds": med,
                "ms_per_secret_serial": 1000 * med["serial"] / n,
                "speedup_pool": med["serial"] / med["pool"],
            }
        )
        print(
            f"{n} secrets: serial {med['serial']:.2f} s, pool {med['pool']:.2f} s "
            f"({med['serial'] / med['pool']:.2f}x)",
            flush=True,
        )
    write_json(
        args.out,
        {
            "kind": "secagg-combine",
            "cpus": os.cpu_count(),
            "threshold": args.threshold,
            "shares": args.shares,
            "pool_startup_seconds": startup,
            "results": rows,
            "versions": versions(),
        },
    )
    print(f"pool start-up {startup:.2f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
