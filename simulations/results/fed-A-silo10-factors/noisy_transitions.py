"""How much of the first-order sequential signal survives per-interaction DP in 10 silos?

Each silo would release two Gaussian histograms of its training data: its "last item -> next
item" transition counts and its item counts, both with noise multiplier z. The unit is fedrec's
(one interaction added or removed): removing item x from between p and n in a user's time
order changes the cells (p, x), (x, n) and (p, n) by one (a user rates an item once, so they are
distinct): L2 sensitivity sqrt(3), noise std sqrt(3) z per cell; an item count changes by one:
sensitivity 1, noise std z. The epsilon printed is the two releases composed (dp_accounting PLD,
delta 1e-5), per silo. The server sums the 10 silos' releases (noise std sqrt(10) times
larger). Protocol A is then scored (valid and test NDCG@10) with the sums: the last L items'
rows (weights 1, 0.5, 0.25) plus pw times the noisy popularity scaled to [0, 1] (pw = 1e6:
the noisy popularity alone, the counts breaking its ties). z = 0 is the
non-private count. It simulates the noise (one draw per z, in the order given, seed 0); it is
not a fedrec mechanism. Usage (from the repository, after `fedrec data fetch ml-100k`):
python simulations/results/fed-A-silo10-factors/noisy_transitions.py 0 0.3 0.6 0.85 1.5
"""

import sys

import dp_accounting as dpa
import numpy as np
from dp_accounting.pld import pld_privacy_accountant

from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import dataset_and_split, resolve_data_dir

SILOS, DELTA = 10, 1e-5
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


for z in [float(a) for a in sys.argv[1:]]:
    spread = np.sqrt(SILOS) * z
    noisy = counts + (rng.normal(0, np.sqrt(3) * spread, (n, n)) if z > 0 else 0)
    noisy_pop = pop + (rng.normal(0, spread, n) if z > 0 else 0)
    eps = f"{epsilon(z):.2f}" if z > 0 else "inf"
    for pw in (0.0, 1.0, 5.0, 20.0, 100.0, 1e6):
        for last in (1, 3):
            s = Transitions(noisy, noisy_pop, pw, last)
            v = evaluate(s, sp.valid, with_auc=False)["NDCG@10"]
            t = evaluate(s, sp.tests["test"], with_auc=False)["NDCG@10"]
            print(f"z={z} epsilon={eps} pw={pw} last={last} valid {v:.4f} test {t:.4f}", flush=True)
