"""Whether the projection of a ``silos-secure`` run could have bound: each silo's float64
full-batch step (its change before the projection onto the ball of radius ``update-norm-max``),
recomputed at the run's initial model and at its final one.

    python simulations/results/fed-A-secure-interaction/step_norms.py RUN initial|final [SILOS]

RUN is a ``fedrec simulate`` run folder with its ``model/`` and ``adapter/`` on disk (they are
not committed); SILOS a comma-separated list (default: all). Each silo's step is what its client
computes in a round (``train_round`` with the run's config: every window, noise 0, one SGD
step), from the model given. It is a recomputation, not the run's own step: the negatives
come from OS entropy, so it differs slightly from the step the run took at the initial model,
and no round stepped from the final model (round 30 stepped from round 29's). It prints one
JSON line per silo. The steps of rounds 2 to 30 are not recomputed: the server keeps no
intermediate models.
"""

import json
import sys
import time
from pathlib import Path

import torch

from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import train_round
from fedrec.client.runtime import client_state
from fedrec.shared.federation.params import load_travelling, travelling_state
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.privacy.report import load_fed_config


def main(run: Path, which: str, silos: list[int] | None) -> None:
    if which not in ("initial", "final"):
        raise SystemExit(f"second argument {which!r}: give 'initial' or 'final'")
    torch.set_num_threads(1)  # as a simulation's client actor runs
    cfg = load_fed_config(run)  # checked as `fedrec audit` reads it
    first = client_state(cfg, {"partition-id": 0, "num-partitions": cfg.silos})
    # the initial global model is the one every client builds from the run config's seed
    model = first.model
    if which == "final":
        model = load_model(run)[0]
        for k in travelling_state(first.model):  # a loaded model's head is frozen (inference)
            if k.startswith("head."):
                getattr(model, k.removeprefix("head.")).requires_grad_(True)
    start = {k: v.detach().clone() for k, v in travelling_state(model).items()}
    for i in silos if silos is not None else range(cfg.silos):
        t0 = time.perf_counter()
        cs = client_state(cfg, {"partition-id": i, "num-partitions": cfg.silos})
        load_travelling(cs.model, start)  # the clients of one process share one model
        r = train_round(cs.scorer, cs.examples, cfg, MemoryStore(), seed=0)
        assert r.trained and r.steps64 is not None
        norm = float(torch.cat([s.double().reshape(-1) for _p, s in r.steps64]).norm())
        row = {
            "run": run.name, "model": which, "silo": i, "windows": len(cs.examples),
            "step_norm": round(norm, 4), "radius": cfg.update_norm_max,
            "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    parts = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) == 4 else None
    main(Path(sys.argv[1]), sys.argv[2], parts)
