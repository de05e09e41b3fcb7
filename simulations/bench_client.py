"""Client-side cost of one federated round on ML-100K, written to a results file.

Run: ``python -m fedrec.simulations.bench_client --out simulations/results/bench/client.json``

Measures, for ``--clients`` one-user clients with the default settings (1 torch thread, as in a
simulation actor): the wall time of one DP-SGD round (median, p90), the same round without DP
(the reference, same clients, same run), the bytes one reply uploads (fp32 tensors), the time to
build a client's state once per process (backbone + catalog cache), and the process' peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import train_round
from fedrec.client.runtime import client_state
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.params import load_travelling, nbytes, travelling_state
from fedrec.shared.rundir import versions, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--aggregator", default="ffa", choices=("ffa", "fedavg"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = FedConfig(aggregator=args.aggregator)
    t0 = time.perf_counter()
    first = client_state(cfg, {"partition-id": 0})
    setup = time.perf_counter() - t0
    init = travelling_state(first.model)
    times: dict[str, list[float]] = {"dp": [], "no_dp": []}
    examples = []
    for mode, c in (("dp", cfg), ("no_dp", replace(cfg, dp=False))):
        for p in range(1, args.clients + 1):
            st = client_state(c, {"partition-id": p})
            load_travelling(st.model, init)
            t = time.perf_counter()
            train_round(st.scorer, st.examples, c, MemoryStore(), seed=p)
            times[mode].append(time.perf_counter() - t)
            examples.append(len(st.examples))
    dp, ref = np.array(times["dp"]), np.array(times["no_dp"])
    result = {
        "settings": cfg.as_dict(),
        "clients": args.clients,
        "examples_per_client_median": float(np.median(examples)),
        "round_seconds_dp": {"median": float(np.median(dp)), "p90": float(np.quantile(dp, 0.9))},
        "round_seconds_no_dp": {
            "median": float(np.median(ref)),
            "p90": float(np.quantile(ref, 0.9)),
        },
        "dp_over_no_dp_median": float(np.median(dp) / np.median(ref)),
        "upload_bytes_per_round": nbytes(init),
        "client_setup_seconds": setup,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
