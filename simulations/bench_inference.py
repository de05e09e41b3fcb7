"""Inference benchmark: index build, ``recommend`` latency (warm index), ``add_items``, cold start.

Run: ``python -m fedrec.simulations.bench_inference RUN [--out FILE] [--repeats N]``.
Writes JSON (default ``RUN/bench/inference.json``): medians and p99 in milliseconds, with the
machine and library versions. Nothing here is asserted: results go to the file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.shared.inference import Recommender
from fedrec.shared.rundir import versions, write_json


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": round(1000 * statistics.median(s), 3),
        "p99_ms": round(1000 * s[min(len(s) - 1, int(0.99 * len(s)))], 3),
        "n": len(s),
    }


def bench(run: Path, *, repeats: int = 500, history_len: int = 20, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    index = run / "index"
    shutil.rmtree(index, ignore_errors=True)
    t0 = time.perf_counter()
    Recommender.load(run)  # cold: builds the item index (plain path over the catalog)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = Recommender.load(run)  # warm: the index comes from disk
    load_s = time.perf_counter() - t0
    ids = rec.item_ids
    for _ in range(20):  # warm-up
        rec.recommend(history=rng.choice(ids, history_len, replace=False).tolist(), k=10)
    plain, explained, cold = [], [], []
    for _ in range(repeats):
        h = rng.choice(ids, history_len, replace=False).tolist()
        t = time.perf_counter()
        rec.recommend(history=h, k=10)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        rec.recommend(history=h, k=10, explain=True)
        explained.append(time.perf_counter() - t)
    queries = ["space adventure with robots", "a romantic comedy in paris", "gangster crime drama"]
    for r in range(min(repeats, 60)):
        t = time.perf_counter()
        rec.cold_start(query=f"{queries[r % 3]} {r}", k=10)  # distinct text: no cache hit
        cold.append(time.perf_counter() - t)
    new = []
    next_id = int(ids.max()) + 1
    for r in range(50):
        t = time.perf_counter()
        rec.add_items({next_id + r: f"Robots in Space part {r} (2026). Genres: Sci-Fi, Adventure"})
        new.append(time.perf_counter() - t)
    return {
        "run": str(run),
        "catalog_items": int(len(ids)),
        "history_len": history_len,
        "index_build_s": round(build_s, 2),
        "load_with_warm_index_s": round(load_s, 2),
        "recommend": _ms(plain),
        "recommend_explain": _ms(explained),
        "cold_start_query": _ms(cold),
        "add_items_one": _ms(new),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },  # fmt: skip
        "versions": versions(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=500)
    args = ap.parse_args()
    result = bench(args.run, repeats=args.repeats)
    out = args.out or args.run / "bench" / "inference.json"
    write_json(out, result)
    print(f"wrote {out}")
    for k in ("recommend", "recommend_explain", "cold_start_query", "add_items_one"):
        print(f"  {k}: p50 {result[k]['p50_ms']} ms, p99 {result[k]['p99_ms']} ms")
    print(f"  index build {result['index_build_s']} s")
    print(f"  load with a warm index {result['load_with_warm_index_s']} s")


if __name__ == "__main__":
    main()
