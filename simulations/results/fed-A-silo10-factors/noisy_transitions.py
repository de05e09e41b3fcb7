"""How much of the first-order sequential signal survives per-interaction DP in 10 silos?

Each silo would release its own "last item -> next item" transition counts with Gaussian noise
of std 2 z per cell for noise multiplier z (replace-one adjacency: the L2 sensitivity is 2 when
the new interaction takes the old one's place in the sequence, sqrt(6) when it may sit
elsewhere in time, so 2 z favours the counts); the server sums the 10 releases, whose
noise adds up to std 2 z sqrt(10) per cell. This scores protocol A (valid and test NDCG@10) with
the summed counts: the last L items' rows (weights 1, 0.5, 0.25), plus pw times popularity
scaled to [0, 1]. z = 0 is the non-private count. It simulates the noise; it is not a fedrec
mechanism and nothing here is accounted. Usage (from the repository, after `fedrec data fetch
ml-100k`): python simulations/results/fed-A-silo10-factors/noisy_transitions.py 0 0.25 0.5 1
"""

import sys

import numpy as np

from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import dataset_and_split, resolve_data_dir

ds, sp = dataset_and_split(resolve_data_dir("ml-100k"), "A", 0)
n = sp.n_items
counts = np.zeros((n, n))
for h in sp.train_histories():
    if len(h) > 1:
        np.add.at(counts, (h[:-1], h[1:]), 1.0)
pop = np.bincount(sp.train_item, minlength=n).astype(float)
rng = np.random.default_rng(0)
assert sp.valid is not None


class Transitions:
    def __init__(self, m: np.ndarray, pw: float, last: int) -> None:
        self.m, self.pw, self.last = m, pw, last

    def score(self, users, history, profiles, warm):  # noqa: ANN001, ANN201 - a Scorer
        out = np.zeros((len(users), n))
        for q, h in enumerate(history):
            for k in range(1, min(self.last, len(h)) + 1):
                out[q] += 0.5 ** (k - 1) * self.m[h[-k]]
            out[q] += self.pw * pop / pop.max()
        return out


for z in [float(a) for a in sys.argv[1:]]:
    noisy = counts + (rng.normal(0, 2 * z * np.sqrt(10), (n, n)) if z > 0 else 0)
    for pw in (0.0, 1.0, 5.0):
        for last in (1, 3):
            s = Transitions(noisy, pw, last)
            v = evaluate(s, sp.valid, with_auc=False)["NDCG@10"]
            t = evaluate(s, sp.tests["test"], with_auc=False)["NDCG@10"]
            print(f"z={z} pw={pw} last={last} valid {v:.4f} test {t:.4f}", flush=True)
