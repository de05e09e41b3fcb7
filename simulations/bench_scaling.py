"""Simulation wall time against the number of clients, on this machine.

Run: ``python -m fedrec.simulations.bench_scaling --out FILE [--clients 50,200,943] [--repeats 1]``

Each point is a real ``fedrec simulate`` process (Flower's simulation runtime, Ray backend) on
ML-100K with N clients: ``partition=silo silos=N`` splits the 943 users into N clients of whole
users (N = 943 is one user per client), ``fraction-train=0.1`` samples a tenth of them per round,
with 2 rounds of the default local DP-SGD and no evaluation beyond the final one. So the number of
client rounds grows with N (0.1 N per round), and so does the work Flower's driver does per
round (it polls every virtual node). The wall time includes start-up (Ray, data, the backbone in
each actor) and the final test evaluation; the reference is the smallest N, measured in the same
run. Extra ``--set KEY=VALUE`` options are passed to every run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedrec.shared.rundir import versions, write_json

SETTINGS = {"num-rounds": 2, "fraction-train": 0.1, "evaluate-every": 0, "partition": "silo"}


def run_once(n: int, extra: list[str], workdir: Path) -> float:
    sets = {**SETTINGS, "silos": n}
    cmd = [sys.executable, "-m", "fedrec", "simulate", "--out", str(workdir / f"n{n}"),
           "--baselines", "none", "--preset", "cross-device"]  # fmt: skip
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for kv in extra:
        cmd += ["--set", kv]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.perf_counter() - t


def bench(ns: list[int], *, repeats: int, extra: list[str]) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    for n in ns:
        secs = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as d:
                secs.append(run_once(n, extra, Path(d)))
        med = statistics.median(secs)
        points.append({"clients": n, "clients_per_round": max(int(0.1 * n), 2),
                       "seconds_median": med, "seconds_all": secs})  # fmt: skip
        print(f"{n:>5} clients: {med / 60:.2f} min (median of {repeats})", flush=True)
    ref = float(points[0]["seconds_median"])
    for p in points:
        p["ratio_to_smallest"] = p["seconds_median"] / ref
    return {
        "kind": "simulation-scaling",
        "settings": {**SETTINGS, "extra": extra},
        "repeats": repeats,
        "points": points,
        "summary": [
            f"{p['clients']} clients ({p['clients_per_round']} per round, 2 rounds): "
            f"{p['seconds_median'] / 60:.2f} min, {p['ratio_to_smallest']:.2f}x the "
            f"{points[0]['clients']}-client run"
            for p in points
        ],
        "versions": versions(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clients", default="50,200,943")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    try:
        ns = sorted(int(x) for x in args.clients.split(",") if x.strip())
        if not ns or min(ns) < 2:
            raise ValueError
    except ValueError:
        ap.error(f"--clients {args.clients!r}: comma-separated integers >= 2")
    write_json(args.out, bench(ns, repeats=max(1, args.repeats), extra=args.sets))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
