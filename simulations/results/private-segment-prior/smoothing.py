"""Does borrowing from neighbouring age bands help the federation's noisy age-band prior?

Run: ``python simulations/results/private-segment-prior/smoothing.py 2 > smoothing.txt`` (ML-100K
from ``FEDREC_DATA``; about 15 s). A computation on the released table's post-processing, not a
fedrec mechanism.

The federation's segment prior (``segment-prior=age``, ``segment-noise`` z = 2 per silo, ten silos:
noise variance 10 z^2 per cell of the sum) shrinks each age band's noisy counts toward global
popularity (``SegmentPrior``, kappa). Two alternatives, both post-processing of the same release:
``neigh`` shrinks a band toward the pooled counts of the other bands weighted lam^|a - b| (its
neighbours first) instead of global popularity; ``kernel`` replaces a band's counts by the
lam^|a - b|-weighted mean of all bands' counts (noise variance reduced accordingly) and then
shrinks as ``SegmentPrior`` does. The band for a missing age keeps the base estimator. Scored as
the prior alone (log of the row), ten noise draws (seeds 0-9), chosen on the suite's pseudo-cold
holdout (10 % of the trained users, seed 1), test read once.
"""

import os
import sys
from pathlib import Path

import numpy as np

from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.segments import (
    FLOOR,
    SegmentPrior,
    count_table,
    n_segments,
    segments_of,
)
from fedrec.shared.splitting import holdout_split, make_split

root = Path(os.environ.get("FEDREC_DATA", Path.home() / ".cache/fedrec/data"))
ds = load_dataset(root / "ml-100k")
split = make_split(ds, "C")
hold = holdout_split(split, 0.1, [ds.user_text(int(u)) for u in split.user_ids], seed=1)
Z = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
DRAWS = 10
sigma2 = Z * Z * 10


def table(sp, fields):
    segs = segments_of(ds.user_fields, sp.user_ids, fields)
    users = np.unique(sp.train_user)
    items = [sp.train_item[sp.train_user == u] for u in users]
    return count_table(items, segs[users], sp.n_items, n_segments(fields)), segs


class Prior:
    def __init__(self, rows, segs):
        self.rows, self.segs = rows, segs

    def score(self, users, history, profiles, warm):
        return np.log(self.rows[self.segs[np.asarray(users)]] + FLOOR)


def eb(c, target, var, kappa):
    expected = max(c.sum(), 1.0) * target
    w = kappa * expected / (kappa * expected + var) if var > 0 else 1.0
    row = np.maximum(expected + (c - expected) * w, 0)
    return row / row.sum()


def estimator(noisy, kind, kappa, lam):
    total = np.maximum(noisy.sum(0), 0)
    p = total / total.sum()
    nb = noisy.shape[0]
    rows = []
    if kind == "base":
        return SegmentPrior(noisy, noise_var=sigma2, kappa=kappa).rows
    if kind == "neigh":  # age only: 7 bands + unknown (last)
        nbands = nb - 1
        for a in range(nb):
            if a == nbands:
                rows.append(eb(noisy[a], p, sigma2, kappa))
                continue
            pool = sum((lam ** abs(a - b)) * noisy[b] for b in range(nbands) if b != a)
            pool = np.maximum(pool, 0)
            # target: mixture of neighbours-pooled and p
            tgt = pool / pool.sum()
            rows.append(eb(noisy[a], tgt, sigma2, kappa))
        return np.stack(rows)
    if kind == "kernel":  # smooth rows directly, then EB to p
        nbands = nb - 1
        for a in range(nb):
            if a == nbands:
                c = noisy[a]
                var = sigma2
            else:
                w = np.array([lam ** abs(a - b) for b in range(nbands)])
                c = (w[:, None] * noisy[:nbands]).sum(0) / w.sum() * 1.0
                # scale so the row's total matches (variance of the weighted mean)
                var = sigma2 * (w**2).sum() / w.sum() ** 2
            rows.append(eb(c, p, var, kappa))
        return np.stack(rows)


def run(fields, kind, kappa, lam):
    out = {"valid": [], "k=0": [], "k=3": []}
    for sp, keys in ((hold, ["valid"]), (split, ["k=0", "k=3"])):
        t, segs = table(sp, fields)
        for d in range(DRAWS if Z > 0 else 1):
            rng = np.random.default_rng(d)
            noisy = t + rng.normal(0, np.sqrt(sigma2), t.shape) if Z > 0 else t
            m = Prior(estimator(noisy, kind, kappa, lam), segs)
            for k in keys:
                q = sp.valid if k == "valid" else sp.tests[k]
                out[k].append(evaluate(m, q, ks=(10,), with_auc=False)["NDCG@10"])
    return {k: float(np.mean(v)) for k, v in out.items()}


pp = ProfilePopularity(split, ds.user_fields, fields=("age", "gender"), shrink=30.0)
print(
    "profile-pop test",
    {
        k: round(evaluate(pp, split.tests[k], ks=(10,), with_auc=False)["NDCG@10"], 4)
        for k in ("k=0", "k=3")
    },
)
res = []
for kappa in (1.0, 3.0, 10.0):
    r = run(("age",), "base", kappa, 0)
    res.append(("base", kappa, 0.0, r))
    print("base", kappa, r, flush=True)
    for lam in (0.1, 0.3, 0.5, 1.0):
        for kind in ("neigh", "kernel"):
            r = run(("age",), kind, kappa, lam)
            res.append((kind, kappa, lam, r))
            print(kind, kappa, lam, r, flush=True)
best = max(res, key=lambda x: x[3]["valid"])
print("CHOSEN", best)
