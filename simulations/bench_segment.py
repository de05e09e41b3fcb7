"""What the segment prior's release costs a silo and the server, written to a results file.

Run: ``python -m fedrec.simulations.bench_segment --out simulations/results/bench/segment.json``

The settings are the full suite's ``C-fed-eps8-segment`` (ML-100K protocol C, 10 silos, local
DP-SGD at epsilon 8 per interaction, ``segment-prior=age``, ``segment-noise=2``), read from its
committed ``config.json``; the baseline is the same settings without ``segment-prior`` (the suite's
``C-fed-eps8``), measured in the same process. For each silo, in alternating order (one thread, as
in a simulation actor), from the same global model:

- the round-1 train call with the release charged (``train_round(release=...)``: the DP-SGD noise
  calibrated with the release in the budget) against the same call without it, and the ratio of
  the paired times;
- counting the silo's (segment, item) table (once per client process) and releasing it (noise,
  rounding, encoding into the reply's record);
- the bytes the reply uploads: the model update, and the table's record in round 1;
- on the server: checking and summing the ten tables, and building the prior after the last round.

Medians over silos and repeats. Peak RSS is the whole process' (both settings' states); the
table's own size is given exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.client.app import segment_record
from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import train_round
from fedrec.client.runtime import _user_rows, client_state
from fedrec.server.strategy import segment_table
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.params import load_travelling, nbytes, travelling_state
from fedrec.shared.federation.segments import (
    build_prior,
    count_table,
    n_segments,
    parse_fields,
    segments_of,
)
from fedrec.shared.privacy.calibration import planned_release
from fedrec.shared.rundir import versions, write_json

SUITE_RUN = Path(__file__).parent / "results" / "suite-full" / "runs" / "C-fed-eps8-segment"


def _config(path: Path) -> FedConfig:
    fed = json.loads((path / "config.json").read_text())["federation"]
    names = {f.name for f in dataclasses.fields(FedConfig)}
    return FedConfig(**{k: v for k, v in fed.items() if k in names})


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def _record_bytes(record: Any) -> int:
    return sum(len(array.data) for array in record.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2, help="round-1 pairs per silo")
    ap.add_argument("--run", type=Path, default=SUITE_RUN, help="a run whose config to use")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with_prior = _config(args.run)
    if not (with_prior.segment_prior and with_prior.dp):
        raise SystemExit(f"{args.run}: its config has no segment-prior under local DP")
    without = dataclasses.replace(with_prior, segment_prior="")
    release = planned_release(with_prior)
    fields = parse_fields(with_prior.segment_prior)
    states = {
        mode: [client_state(cfg, {"partition-id": p}) for p in range(cfg.silos)]
        for mode, cfg in (("with", with_prior), ("without", without))
    }
    init = travelling_state(states["with"][0].model)
    seconds: dict[str, list[float]] = {"with": [], "without": []}
    ratios, sigmas = [], {}
    for rep in range(args.repeats):
        for p in range(with_prior.silos):
            order = ("with", "without") if (p + rep) % 2 == 0 else ("without", "with")
            pair = {}
            for mode in order:
                st = states[mode][p]
                cfg = with_prior if mode == "with" else without
                load_travelling(st.model, init)
                t = time.perf_counter()
                res = train_round(
                    st.scorer, st.examples, cfg, MemoryStore(), seed=p,
                    release=release if mode == "with" else None,
                )  # fmt: skip
                pair[mode] = time.perf_counter() - t
                seconds[mode].append(pair[mode])
                sigmas[mode] = float(res.noise_multiplier)
            ratios.append(pair["with"] / pair["without"])
    count_s, release_s, tables, record_bytes = [], [], [], []
    for st in states["with"]:
        split = st.split
        assert st.dataset is not None
        segs = segments_of(st.dataset.user_fields, split.user_ids[st.users], fields)
        items = [split.train_item[_user_rows(split, u)] for u in st.users]
        t = time.perf_counter()
        counts = count_table(items, segs, split.n_items, n_segments(fields))
        count_s.append(time.perf_counter() - t)
        assert st.segment_counts is not None and np.array_equal(counts, st.segment_counts)
        t = time.perf_counter()
        record = segment_record(counts, with_prior)
        release_s.append(time.perf_counter() - t)
        record_bytes.append(_record_bytes(record))
        tables.append(record)
    t = time.perf_counter()
    total = None
    for record in tables:
        table = segment_table(record, with_prior, states["with"][0].split.n_items)
        assert isinstance(table, np.ndarray), table
        total = table if total is None else total + table
    server_sum_s = time.perf_counter() - t
    assert total is not None
    t = time.perf_counter()
    build_prior(
        total, len(tables), dp=True, noise=with_prior.segment_noise,
        shrink=with_prior.segment_shrink,
    )  # fmt: skip
    prior_s = time.perf_counter() - t
    update_bytes = nbytes(init)
    rec = int(np.median(record_bytes))
    summary = [
        f"segment-prior release ({with_prior.silos} silos, {'+'.join(fields)}, noise "
        f"{with_prior.segment_noise}): round-1 train call {_median(seconds['with']):.2f} s with "
        f"the release charged vs {_median(seconds['without']):.2f} s without (median of paired "
        f"ratios {_median(ratios):.3f}, {len(ratios)} pairs); DP-SGD noise multiplier "
        f"{sigmas['with']:.3f} vs {sigmas['without']:.3f} at the same epsilon",
        f"upload in round 1 {update_bytes + rec:,} bytes ({update_bytes:,} update + {rec:,} "
        f"table), later rounds {update_bytes:,}; counting the table {_median(count_s) * 1e3:.2f} "
        f"ms, releasing it {_median(release_s) * 1e3:.2f} ms a silo; server check + sum of "
        f"{len(tables)} tables {server_sum_s * 1e3:.1f} ms, prior {prior_s * 1e3:.1f} ms",
    ]
    result = {
        "kind": "segment-release",
        "summary": summary,
        "settings": with_prior.as_dict(),
        "settings_from": os.path.relpath(args.run, Path(__file__).resolve().parents[1]),
        "silos": with_prior.silos,
        "repeats": args.repeats,
        "round1_seconds_with_release": {"median": _median(seconds["with"])},
        "round1_seconds_without": {"median": _median(seconds["without"])},
        "round1_paired_ratio_median": _median(ratios),
        "round1_paired_ratio_range": [float(min(ratios)), float(max(ratios))],
        "dp_sgd_noise_multiplier": sigmas,
        "count_table_seconds_median": _median(count_s),
        "release_seconds_median": _median(release_s),
        "table_cells": int(total.size),
        "table_bytes_in_memory": int(total.nbytes),
        "upload_bytes": {
            "update": update_bytes,
            "segment_record_round1": rec,
            "round1_total": update_bytes + rec,
            "later_rounds_total": update_bytes,
        },
        "server_check_and_sum_seconds": server_sum_s,
        "server_build_prior_seconds": prior_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    write_json(args.out, result)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
