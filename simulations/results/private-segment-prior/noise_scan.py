"""Which segment-noise should the federation's age-band release use? Validation only.

Run: ``python simulations/results/private-segment-prior/noise_scan.py > noise_scan.txt`` (ML-100K
from ``FEDREC_DATA``; about a minute). Prints NO test score: the choice it informs is made on the
suite's pseudo-cold holdout (10 % of the trained users, seed 1), as ``smoothing.py``'s ``valid``
column.

For each per-silo noise z (ten silos: the summed table's cells carry variance 10 z^2) it prints,
for the federation's own estimator (:class:`SegmentPrior`, shrink kappa), the prior alone's
validation NDCG@10 averaged over ten noise draws (seeds 0-9), and what the budget pays: the
release's own epsilon at delta 1e-5 (the run it is charged as, :func:`release_run`, alone) and
the DP-SGD noise multiplier the client calibrates when the release shares epsilon 8 with it
(``fed-C-segment-prior``'s settings, :func:`calibrated_noise`).
"""

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.segments import (
    FLOOR,
    SegmentPrior,
    count_table,
    n_segments,
    noised_counts,
    release_run,
    segments_of,
)
from fedrec.shared.privacy.accounting import epsilon_spent
from fedrec.shared.privacy.calibration import calibrated_noise
from fedrec.shared.privacy.report import load_fed_config
from fedrec.shared.splitting import holdout_split, make_split

HERE = Path(__file__).resolve().parent
RUN = HERE.parent / "fed-C-segment-prior" / "runs" / "age-z2-seed0"
ZS = (0.7, 0.8, 1.0, 1.4, 2.0)
KAPPAS = (1.0, 3.0, 10.0)
DRAWS = 10
SILOS = 10

root = Path(os.environ.get("FEDREC_DATA", Path.home() / ".cache/fedrec/data"))
ds = load_dataset(root / "ml-100k")
split = make_split(ds, "C")
hold = holdout_split(split, 0.1, [ds.user_text(int(u)) for u in split.user_ids], seed=1)
if hold.valid is None:
    raise SystemExit("the holdout split has no validation queries")
VALID = hold.valid
segs = segments_of(ds.user_fields, hold.user_ids, ("age",))
users = np.unique(hold.train_user)
items = [hold.train_item[hold.train_user == u] for u in users]
exact = count_table(items, segs[users], hold.n_items, n_segments(("age",)))
base = load_fed_config(RUN)


class Prior:
    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def score(self, users, history, profiles, warm):  # noqa: ANN001, ARG002 - the model protocol
        return np.log(self.rows[segs[np.asarray(users)]] + FLOOR)


def valid(z: float, kappa: float) -> float:
    var = SILOS * z * z  # what the server's estimator assumes (the rounding not counted)
    scores = []
    for d in range(DRAWS):
        rng = np.random.default_rng(d)
        # as the release: each silo adds its own rounded noise to its table (the client's
        # noised_counts, which adds the counts unchanged), the server sums
        noise = sum(noised_counts(np.zeros(exact.shape), z, rng) for _ in range(SILOS))
        rows = SegmentPrior(exact + noise, noise_var=var, kappa=kappa).rows
        scores.append(evaluate(Prior(rows), VALID, ks=(10,), with_auc=False)["NDCG@10"])
    return float(np.mean(scores))


ceiling = SegmentPrior(exact, noise_var=0.0, kappa=3.0).rows  # no noise: no shrinkage
score = evaluate(Prior(ceiling), VALID, ks=(10,), with_auc=False)["NDCG@10"]
print(f"exact counts (no noise): valid {score:.4f}")


def release_epsilon(z: float) -> float:
    run = release_run(z, base.dp_adjacency(), base.dp_group())
    return epsilon_spent(
        history=[run], delta=base.delta, accountant=base.accountant, adjacency=base.dp_adjacency()
    )


lo, hi = 0.3, 2.0  # the z at which the release alone spends the whole budget (bisection)
for _ in range(20):
    lo, hi = (
        (lo, (lo + hi) / 2)
        if release_epsilon((lo + hi) / 2) <= base.epsilon
        else ((lo + hi) / 2, hi)
    )
print(f"the release alone spends epsilon {base.epsilon:g} at z = {hi:.4f} (no budget left)")
head = " | ".join(f"valid kappa {k:g}" for k in KAPPAS)
print(f"z | release epsilon alone | DP-SGD noise multiplier at epsilon 8 | {head}")
for z in ZS:
    eps = release_epsilon(z)
    sigma = calibrated_noise(dataclasses.replace(base, segment_noise=z))
    cells = " | ".join(f"{valid(z, k):.4f}" for k in KAPPAS)
    print(f"{z:g} | {eps:.3f} | {sigma:.4f} | {cells}", flush=True)
sys.exit(0)
