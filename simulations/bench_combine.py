"""SecAgg+'s Shamir costs: a client's sharing and the server's unmasking, three ways.

Run: ``python -m fedrec.simulations.bench_combine --out FILE [--secrets 471,943] [--repeats 3]
[--threshold 15] [--shares 28]``

- ``reference``: pycryptodome's ``Shamir`` (pure-Python GF(2^128) products), in this process;
- ``reference-pool``: the same, the unmasking's combinations in the process pool of
  :func:`fedrec.shared.federation.secagg.combine_many` (started beforehand: a run pays its
  start-up once, reported apart);
- ``ghash``: :mod:`fedrec.shared.federation.shamir` (the same scheme on pycryptodome's C
  GHASH), in this process: what fedrec runs where its self-check passes. Every secret here
  has the shares with indices 1..t (a round without dropouts): one set of Lagrange
  coefficients, computed once;
- ``ghash-new-index-sets``: the same, each secret rebuilt from a random t of its shares (as
  with dropouts), the coefficient cache emptied first: the worst case for the cache.

Unmasking: for each count, rebuilding that many secrets from ``--threshold`` shares each
(threshold 15 of 28 as in the default federation; the shares sorted by index, as the server
does); every way's result is checked equal to the shared secrets. Sharing: one client's
share-keys work, two secrets split into ``--shares`` shares each. ``--repeats`` timings of
each, medians, and the ratios to ``reference`` in this run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from fedrec.shared.federation import secagg, shamir
from fedrec.shared.rundir import versions, write_json


def _ways(fast: bool) -> None:
    """Switch this process between the GHASH path and pycryptodome's Shamir (both usable)."""
    shamir._STATE["fast"] = fast


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
    if not 1 <= args.threshold <= args.shares:
        raise SystemExit("--threshold must be between 1 and --shares")
    if not shamir.fast():
        raise SystemExit("the GHASH path is not usable here (see the warning above)")
    t0 = time.perf_counter()
    _ways(False)
    secagg.combine_many([[b""]] * secagg.PARALLEL_COMBINE_MIN)  # start the pool
    startup = time.perf_counter() - t0
    ways: dict[str, tuple[bool, int | None]] = {
        "reference": (False, 1),
        "reference-pool": (False, None),
        "ghash": (True, 1),
    }
    rows: list[dict[str, Any]] = []
    for n in counts:
        secrets = [os.urandom(secagg.SEED_BYTES) for _ in range(n)]
        groups = [
            secagg.split_secret(s, args.threshold, args.shares)[: args.threshold] for s in secrets
        ]
        rnd = random.Random(n)
        shuffled = []
        for s in secrets:
            shares = secagg.split_secret(s, args.threshold, args.shares)
            pick = rnd.sample(shares, args.threshold)
            shuffled.append(sorted(pick, key=lambda sh: int.from_bytes(sh[:4], "little")))
        times: dict[str, list[float]] = {w: [] for w in [*ways, "ghash-new-index-sets"]}
        for _ in range(args.repeats):
            _ways(True)
            shamir._lagrange_keys.cache_clear()
            t = time.perf_counter()
            got = secagg.combine_many(shuffled, workers=1)
            times["ghash-new-index-sets"].append(time.perf_counter() - t)
            if got != secrets:
                raise SystemExit("ghash-new-index-sets: the rebuilt secrets differ")
            for way, (fast, workers) in ways.items():
                _ways(fast)
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
                "ms_per_secret": {k: 1000 * v / n for k, v in med.items()},
                "speedup_vs_reference": {k: med["reference"] / v for k, v in med.items()},
            }
        )
        print(
            f"unmasking, {n} secrets: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
            + f" (ghash {med['reference'] / med['ghash']:.0f}x reference)",
            flush=True,
        )
    split: dict[str, list[float]] = {"reference": [], "ghash": []}
    for _ in range(max(args.repeats, 5)):
        for way in split:
            _ways(way == "ghash")
            t = time.perf_counter()
            for _secret in range(2):  # a client shares two secrets (b and the mask key's seed)
                secagg.split_secret(os.urandom(secagg.SEED_BYTES), args.threshold, args.shares)
            split[way].append(time.perf_counter() - t)
    split_med = {k: statistics.median(v) for k, v in split.items()}
    print(
        f"sharing (one client, 2 secrets x {args.shares} shares): "
        + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in split_med.items()),
        flush=True,
    )
    _ways(True)
    write_json(
        args.out,
        {
            "kind": "secagg-shamir",
            "cpus": os.cpu_count(),
            "threshold": args.threshold,
            "shares": args.shares,
            "pool_startup_seconds": startup,
            "unmasking": rows,
            "sharing_one_client": {
                "seconds": split,
                "median_seconds": split_med,
                "speedup_vs_reference": split_med["reference"] / split_med["ghash"],
            },
            "versions": versions(),
        },
    )
    print(f"pool start-up {startup:.2f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
