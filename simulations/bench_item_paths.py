"""A one-user client's plain ClientApp body with and without the distinct-item paths, paired.

Run: ``python -m fedrec.simulations.bench_item_paths --out FILE [--pairs 60] [--repeats 3]``

The body is ``fedrec.client.app.train`` (the default federation's training, preset
``central-dp``: two local SGD steps on capped sliding windows, shared negatives; all 943
clients a round), one thread as in a simulation actor, on distinct partitions of ML-100K, the
global arrays the same for every call (one round's clients in one process). Each pair runs one
client's body both ways, in alternating order:

- ``before``: the batch-first path (every example's context and candidate rows gathered as
  ``(batch, L + M, dim)``, the token-level graph at every step), forced by making
  ``CandidateScorer._hooked`` answer True and ``LoRAItemTower.start_round`` do nothing: what a
  body did before commits fd957b8 and c4bf2fb;
- ``after``: the code as it is (the batch's distinct items scored through a ``(U, dim)`` table,
  and a first step at the round's start B read from the catalog's forward at B).

Reported per repeat: the median of the per-pair ratios after / before and the medians of the
two bodies. Both ways give the same numbers (``tests/test_candidates.py``); this measures time
only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedrec.shared.rundir import versions, write_json


@contextmanager
def _before_paths() -> Any:
    from fedrec.shared.model.candidates import CandidateScorer, LoRAItemTower

    hooked, start = CandidateScorer._hooked, LoRAItemTower.start_round
    CandidateScorer._hooked = lambda self: True  # type: ignore[method-assign]
    LoRAItemTower.start_round = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        CandidateScorer._hooked = hooked  # type: ignore[method-assign]
        LoRAItemTower.start_round = start  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.pairs < 1 or args.repeats < 1:
        ap.error("--pairs and --repeats must be at least 1")

    from fedrec.client import app as client_app
    from fedrec.simulations.bench_round import InProcessClients, fedrec_sets
    from fedrec.simulations.launch import resolve

    n = 943
    cfg, _ = resolve(None, fedrec_sets(False, n, n, 3), preset="central-dp")
    run_dir = Path(tempfile.mkdtemp(prefix="fedrec-bench-paths-"))
    clients = InProcessClients(cfg, n, run_dir)

    def body(part: int) -> float:
        msg, ctx = clients.train_msg(cfg, part + 1), clients.context(part + 1, part)
        t = time.perf_counter()
        client_app.train(msg, ctx)
        return time.perf_counter() - t

    body(0)  # builds the data, the model and the scorer
    with _before_paths():
        body(1)
    repeats = []
    part = 2
    for r in range(args.repeats):
        before, after, ratios = [], [], []
        for i in range(args.pairs):
            part = (part + 97) % n
            if (i + r) % 2 == 0:
                with _before_paths():
                    b = body(part)
                a = body(part)
            else:
                a = body(part)
                with _before_paths():
                    b = body(part)
            before.append(b)
            after.append(a)
            ratios.append(a / b)
        repeats.append(
            {
                "ratio_after_to_before_median": statistics.median(ratios),
                "before_seconds_median": statistics.median(before),
                "after_seconds_median": statistics.median(after),
                "before_seconds": before,
                "after_seconds": after,
            }
        )
        print(
            f"repeat {r + 1}: after/before median {statistics.median(ratios):.3f} "
            f"(before {1000 * statistics.median(before):.1f} ms, "
            f"after {1000 * statistics.median(after):.1f} ms)",
            flush=True,
        )
    shutil.rmtree(run_dir, ignore_errors=True)
    write_json(
        args.out,
        {
            "kind": "bench-item-paths",
            "settings": cfg.as_dict(),
            "pairs": args.pairs,
            "repeats": repeats,
            "versions": versions(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
