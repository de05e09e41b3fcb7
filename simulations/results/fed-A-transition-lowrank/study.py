"""Does a low-rank denoising of noisy transition counts reach ALS, and does pooling the silos'
noise (distributed DP) matter for it?

Run: ``python simulations/results/fed-A-transition-lowrank/study.py > output.txt`` (ML-100K from
``FEDREC_DATA``; two to four minutes on 2 cores). A computation, not a fedrec mechanism.

The release is ``../fed-A-silo10-factors/noisy_transitions.py``'s: each of ten silos sends its
"last item -> next item" transition counts (L2 sensitivity sqrt(3) under fedrec's unit, one
interaction added or removed: the cells (p, x), (x, n) and (p, n)) and its item counts
(sensitivity 1), both with Gaussian noise multiplier z = 0.85: the two releases composed cost
epsilon 7.99 per silo at delta 1e-5 (PLD), the whole budget, nothing left for a model. Two ways
to add the noise, the same epsilon per silo against the server:

* ``local``: every silo adds its full noise and the server sums ten releases (noise std
  sqrt(10) x sqrt(3) x z per cell of the sum), as fedrec's silos do today;
* ``distributed``: every silo adds a tenth of the variance and the server sees only the sum
  through secure aggregation (noise std sqrt(3) x z per cell, one release's). This holds only if
  every silo adds its share and the aggregation hides the single releases: a server that learns
  the other nine silos' releases faces noise of std sqrt(3) x z / sqrt(10) on a silo's counts.

The server then keeps the rank-r truncated SVD of the summed noisy matrix (post-processing) and
scores protocol A's validation and test users with their last L items' rows (weights 1, 0.5,
0.25, ...) plus pw times the noisy popularity scaled to [0, 1]. (r, L, pw) are chosen on
validation (mean over the draws), then the test score is read once. Three noise draws
(seeds 0, 1, 2) per way. r = "full" keeps the noisy matrix as it is.
"""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
from dp_accounting.pld import pld_privacy_accountant

from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import dataset_and_split, resolve_data_dir
from fedrec.shared.splitting import EvalSet

SILOS, DELTA, Z = 10, 1e-5, 0.85
RANKS = (4, 8, 16, 32, 64, 0)  # 0: no truncation
LASTS = (1, 3, 5)
PWS = (0.0, 1.0, 5.0, 20.0, 100.0)
DRAWS = (0, 1, 2)

ds, sp = dataset_and_split(resolve_data_dir("ml-100k"), "A", 0)
n = sp.n_items
counts = np.zeros((n, n))
for h in sp.train_histories():
    if len(h) > 1:
        np.add.at(counts, (h[:-1], h[1:]), 1.0)
pop = np.bincount(sp.train_item, minlength=n).astype(float)
if sp.valid is None:
    raise SystemExit("protocol A's split must hold a validation set")
valid_set: EvalSet = sp.valid


class Transitions:
    def __init__(self, m: np.ndarray, p: np.ndarray, pw: float, last: int) -> None:
        self.m, self.p, self.pw, self.last = m, p / np.abs(p).max(), pw, last

    def score(self, users, history, profiles, warm):  # noqa: ANN001, ANN201 - a Scorer
        out = np.zeros((len(users), n))
        for q, h in enumerate(history):
            for k in range(1, min(self.last, len(h)) + 1):
                out[q] += 0.5 ** (k - 1) * self.m[h[-k]]
            out[q] += self.pw * self.p
        return out


def epsilon(z: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dpa.GaussianDpEvent(z), 2)  # the transitions and the item counts
    return float(acc.get_epsilon(DELTA))


def scores(m: np.ndarray, p: np.ndarray) -> dict[tuple[int, int, float], tuple[float, float]]:
    u, s, vt = np.linalg.svd(m)
    out = {}
    for r in RANKS:
        low = (u[:, :r] * s[:r]) @ vt[:r] if r else m
        for last in LASTS:
            for pw in PWS:
                sc = Transitions(low, p, pw, last)
                v = evaluate(sc, valid_set, with_auc=False)["NDCG@10"]
                t = evaluate(sc, sp.tests["test"], with_auc=False)["NDCG@10"]
                out[(r, last, pw)] = (v, t)
    return out


print(f"epsilon per silo of the two releases at z={Z}: {epsilon(Z):.3f} (PLD, delta {DELTA})")
print(
    "largest singular values of the exact transition counts:",
    " ".join(f"{x:.0f}" for x in np.linalg.svd(counts, compute_uv=False)[:8]),
)
ways = {"none": 0.0, "distributed": np.sqrt(3) * Z, "local": np.sqrt(3) * Z * np.sqrt(SILOS)}
for way, std in ways.items():
    print(
        f"{way}: noise std per cell of the sum {std:.2f}; spectral norm of that noise about "
        f"{2 * np.sqrt(n) * std:.0f} (2 sqrt(n) std)",
        flush=True,
    )
    runs = []
    for d in DRAWS if std > 0 else (0,):
        rng = np.random.default_rng(d)
        m = counts + (rng.normal(0, std, (n, n)) if std > 0 else 0)
        p = pop + (rng.normal(0, std / np.sqrt(3), n) if std > 0 else 0)
        runs.append(scores(m, p))
    mean = {
        k: (np.mean([r[k][0] for r in runs]), np.mean([r[k][1] for r in runs])) for k in runs[0]
    }
    for (r, last, pw), (v, t) in sorted(mean.items(), key=lambda x: -x[1][0])[:6]:
        print(f"  r={r or 'full'} last={last} pw={pw}: valid {v:.4f} test {t:.4f}")
    best = max(mean, key=lambda k: mean[k][0])
    tests = " ".join(f"{r[best][1]:.4f}" for r in runs)
    print(
        f"  CHOSEN ON VALIDATION r={best[0] or 'full'} last={best[1]} pw={best[2]}: valid "
        f"{mean[best][0]:.4f}, test {mean[best][1]:.4f} (draws: {tests})",
        flush=True,
    )
    full = max((k for k in mean if k[0] == 0), key=lambda k: mean[k][0])
    print(
        f"  without truncation, chosen on validation last={full[1]} pw={full[2]}: valid "
        f"{mean[full][0]:.4f}, test {mean[full][1]:.4f}",
        flush=True,
    )
