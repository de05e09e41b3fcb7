"""Time of one client's DP-SGD round, the catalog tower vs the token path, same run.

Run: ``python -m fedrec.simulations.bench_dp_step --out simulations/results/bench/dp_step.json``

For each client kind (a silo of ML-100K users as in the full suite, with FFA-LoRA and with
FedAvg-LoRA, and a one-user client with ``fedrec simulate``'s defaults) it runs the same
client's round ``--repeats`` times with each path of
:class:`~fedrec.shared.model.candidates.CandidateScorer` (``tower=True``, the default, and
``tower=False``, Opacus' own Linear sampler over the token activations), alternating the order,
on 1 torch thread as in a simulation actor. It reports the median and p90 round time of each
and the ratio of medians. Both paths compute the same per-example gradients
(``tests/test_candidates.py``); the privacy accounting does not depend on the path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import train_round
from fedrec.client.runtime import client_state
from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.federation.params import load_travelling, travelling_state
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.rundir import versions, write_json

_SILO: dict[str, Any] = {  # the full suite's federated settings (simulations/suites/full.toml)
    "partition": "silo",
    "silos": 10,
    "sample-rate": 0.025,
    "local-steps": 10,
    "lr": 8.0,
    "num-rounds": 10,
    "accountant": "pld",
}
KINDS: dict[str, dict[str, Any]] = {
    "silo": _SILO,
    # the same silo with FedAvg-LoRA (A trains too: the tower also gives dA in closed form)
    "silo-fedavg": {**_SILO, "aggregator": "fedavg"},
    # fedrec simulate's defaults
    "user": {},
}


def _time_kind(cfg: FedConfig, repeats: int) -> dict[str, Any]:
    st = client_state(cfg, {"partition-id": 0})
    init = travelling_state(st.model)
    scorers = {"tower": st.scorer, "token_path": CandidateScorer(st.model, tower=False)}
    if scorers["tower"].tower is None:
        raise RuntimeError("the default scorer does not use the catalog tower on this backbone")
    times: dict[str, list[float]] = {k: [] for k in scorers}
    for r in range(repeats):
        order = list(scorers) if r % 2 == 0 else list(reversed(scorers))
        for name in order:
            load_travelling(st.model, init)  # every round starts from the same adapter
            t = time.perf_counter()
            res = train_round(scorers[name], st.examples, cfg, MemoryStore(), seed=r)
            times[name].append(time.perf_counter() - t)
            if not res.trained:
                raise RuntimeError(f"the round did not train: {res.reason}")
    load_travelling(st.model, init)
    out: dict[str, Any] = {
        "examples": len(st.examples),
        "expected_batch": cfg.sample_rate * len(st.examples),
        "local_steps": cfg.local_steps,
    }
    for name, ts in times.items():
        a = np.array(ts)
        out[f"round_seconds_{name}"] = {
            "median": float(np.median(a)),
            "p90": float(np.quantile(a, 0.9)),
            "all": [round(float(x), 4) for x in a],
        }
    out["token_path_over_tower_median"] = float(
        np.median(times["token_path"]) / np.median(times["tower"])
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated: {', '.join(KINDS)}")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        ap.error(f"--kinds: unknown {bad or kinds}; choose from {', '.join(KINDS)}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    result: dict[str, Any] = {"kind": "dp-step", "repeats": args.repeats, "torch_threads": 1}
    summary = []
    for kind in kinds:
        cfg = parse_run_config({**KINDS[kind], "epsilon": 8.0})
        r = {"settings": cfg.as_dict(), **_time_kind(cfg, args.repeats)}
        result[kind] = r
        print(kind, {k: v for k, v in r.items() if k != "settings"}, flush=True)
        summary.append(
            f"DP round of a {kind} client ({cfg.aggregator}, {r['local_steps']} steps, "
            f"expected batch {r['expected_batch']:.0f}): catalog tower median "
            f"{r['round_seconds_tower']['median']:.2f} s vs token path "
            f"{r['round_seconds_token_path']['median']:.2f} s "
            f"({r['token_path_over_tower_median']:.2f}x), {args.repeats} repeats, 1 torch thread"
        )
    result["summary"] = summary
    result["versions"] = versions()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
