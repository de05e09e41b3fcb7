"""Would a private release of profile-conditioned popularity lift federated cold users?

Run: ``python simulations/results/private-segment-prior/study.py > output.txt`` (ML-100K from
``FEDREC_DATA``; about a minute). A computation, not a fedrec mechanism.

Profile-conditioned popularity (``pp``) is protocol C's bar. A federation could release it: each
of the ten silos sends its (segment, item) interaction counts with Gaussian noise of standard
deviation ``z`` per cell, the server sums them. Under fedrec's local unit (one interaction added or
removed) a silo's counts change in one cell by 1: a Gaussian mechanism of L2 sensitivity 1 and
noise multiplier ``z``; the sum over silos carries noise ``z * sqrt(10)`` per cell. The segments'
age bands are fixed in advance (MovieLens-1M's published age groups: 18, 25, 35, 45, 50, 56): a
private release cannot take its band edges from the users' ages, as the suite's ``pp`` baseline
does (quantiles of the training users').

Scored per ``z``, averaged over 10 noise draws: the noisy counts clipped at 0 and shrunk toward the
(noisy) global popularity by a pseudo-count ``m`` (``pp``'s estimator), and an empirical-Bayes
estimator that shrinks each cell toward its segment's share of global popularity by
``kappa * E / (kappa * E + sigma^2)`` (``E`` the cell's expected count under global popularity).
Fields (age, gender, both, none: popularity alone), estimator and its parameter are chosen on the
suite's pseudo-cold holdout (10 % of the trained users, seed 1; their k = 0 and k = 3 queries),
then scored once on protocol C's test users.

The epsilon columns: the release alone, per silo, at delta 1e-5 (dp-accounting's PLD), and what it
would cost the suite's ``C-fed-eps8`` federation (disjoint examples, replace-one adjacency,
sample rate 0.025, 100 DP-SGD steps, budget 8): the DP-SGD noise multiplier that keeps the
composed epsilon at 8 with the release counted as one more step at sample rate 1 and noise
multiplier ``2 z`` (a replacement moves a clipped sum by up to 2 clip norms; one interaction moves
one count by 1, so that step's replace-one curve is the release's add/remove curve, checked here).
"""

from __future__ import annotations

import os
from pathlib import Path

import dp_accounting
import numpy as np

from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.privacy.accounting import epsilon_spent
from fedrec.shared.splitting import Split, holdout_split, make_split

SILOS = 10
DRAWS = 10
DELTA = 1e-5
AGE_EDGES = np.array([18.0, 25.0, 35.0, 45.0, 50.0, 56.0])  # MovieLens-1M's age groups
FIELDS = (("age", "gender"), ("age",), ("gender",), ())
SHRINK = (30.0, 300.0, 3000.0)
KAPPA = (0.3, 1.0, 3.0, 10.0)
Z = (0.0, 1.0, 2.0, 5.0, 10.0)
# the suite's C-fed-eps8: sample rate 0.025, 10 local steps x 10 rounds, replace-one, PLD
DPSGD_Q, DPSGD_STEPS, BUDGET = 0.025, 100, 8.0


class NoisySegments(ProfilePopularity):
    """``pp`` from (segment, item) counts with Gaussian noise ``sigma`` per cell."""

    def __init__(
        self,
        split: Split,
        user_fields: dict[int, dict[str, str]],
        fields: tuple[str, ...],
        sigma: float,
        rng: np.random.Generator,
        estimator: tuple[str, float],
    ) -> None:
        super().__init__(split, user_fields, fields=fields or ("gender",), shrink=0.0)
        self.fields = fields
        self.edges = {"age": AGE_EDGES} if "age" in fields else {}
        raw = [user_fields.get(int(u), {}) for u in split.user_ids]
        self.keys = [self._key(r) for r in raw]
        n_items = split.n_items
        # sorted: the noise draw each segment gets must not depend on the process' string hashes
        found = sorted({k for u in np.unique(split.train_user) if (k := self.keys[u]) is not None})
        index = {k: i for i, k in enumerate(found)}
        user_key = np.array([index.get(k, -1) if k is not None else -1 for k in self.keys])
        segments: dict[tuple[str, ...], np.ndarray] = {}
        for key in found:
            rows = user_key[split.train_user] == index[key]
            segments[key] = np.bincount(split.train_item[rows], minlength=n_items).astype(float)
        noisy = {k: c + rng.normal(0.0, sigma, n_items) for k, c in segments.items()}
        total = np.maximum(sum(noisy.values()), 0.0)
        self.p = total / max(total.sum(), 1.0)
        kind, value = estimator
        self.segments = {}
        for key, c in noisy.items():
            if not fields:
                continue
            if kind == "shrink":
                c = np.maximum(c, 0.0)
                self.segments[key] = (c + value * self.p) / (c.sum() + value)
            else:  # empirical Bayes toward the segment's share of global popularity
                expected = max(c.sum(), 1.0) * self.p
                weight = value * expected / (value * expected + sigma**2 + 1e-12)
                self.segments[key] = expected + (c - expected) * weight

    def score(self, users, history, profiles, warm):  # noqa: ANN001, ANN201
        out = np.empty((len(users), self.p.shape[0]), dtype=np.float64)
        for b, u in enumerate(np.asarray(users).tolist()):
            seg = self.segments.get(self.keys[u]) if self.keys[u] is not None else None
            out[b] = self.p if seg is None else seg
        return out


def release_epsilon(z: float) -> float:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(z))
    return float(acc.get_epsilon(DELTA))


def dpsgd_sigma(z: float) -> float:
    """The DP-SGD noise multiplier for BUDGET with the release composed (z = 0: no release)."""
    extra = [(2 * z, 1.0, 1)] if z > 0 else []

    def spent(s: float) -> float:
        return epsilon_spent(
            history=[(s, DPSGD_Q, DPSGD_STEPS), *extra],
            delta=DELTA,
            accountant="pld",
            adjacency="replace-one",
        )

    lo, hi = 0.3, 8.0
    if spent(hi) > BUDGET:
        return float("inf")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > BUDGET else (lo, mid)
    return hi


def main() -> None:
    root = Path(os.environ.get("FEDREC_DATA", Path.home() / ".cache/fedrec/data"))
    ds = load_dataset(root / "ml-100k")
    split = make_split(ds, "C")
    holdout = holdout_split(split, 0.1, [ds.user_text(int(u)) for u in split.user_ids], seed=1)
    assert holdout.valid is not None
    tests = sorted(split.tests)
    pp = ProfilePopularity(split, ds.user_fields, fields=("age", "gender"), shrink=30.0)
    print("suite profile-popularity (quantile age bands, m 30), test:",
          {k: round(evaluate(pp, split.tests[k], ks=(10,), with_auc=False)["NDCG@10"], 4)
           for k in tests})  # fmt: skip
    for z in Z:
        if z > 0:
            check = epsilon_spent(
                history=[(2 * z, 1.0, 1)], delta=DELTA, accountant="pld", adjacency="replace-one"
            )
            print(f"z={z}: release alone epsilon {release_epsilon(z):.3f} (PLD, add/remove, "
                  f"sensitivity 1); as a replace-one step at 2z: {check:.3f}")  # fmt: skip
        sigma = z * np.sqrt(SILOS)
        grid = [("shrink", m) for m in SHRINK] + ([("eb", k) for k in KAPPA] if z > 0 else [])
        best: tuple[float, str] | None = None
        for fields in FIELDS:
            for est in grid if fields else [("shrink", 0.0)]:
                valid: list[float] = []
                test: dict[str, list[float]] = {k: [] for k in tests}
                for draw in range(DRAWS if z > 0 else 1):
                    rng = np.random.default_rng(draw)
                    m = NoisySegments(holdout, ds.user_fields, fields, sigma, rng, est)
                    valid.append(evaluate(m, holdout.valid, ks=(10,), with_auc=False)["NDCG@10"])
                    rng = np.random.default_rng(draw)
                    m = NoisySegments(split, ds.user_fields, fields, sigma, rng, est)
                    for k in tests:
                        ndcg = evaluate(m, split.tests[k], ks=(10,), with_auc=False)["NDCG@10"]
                        test[k].append(ndcg)
                row = (
                    f"z={z} fields={'+'.join(fields) or 'none'} {est[0]}={est[1]} valid "
                    f"{np.mean(valid):.4f} test "
                    + " ".join(f"{k} {np.mean(v):.4f}" for k, v in test.items())
                )
                print(row, flush=True)
                if best is None or np.mean(valid) > best[0]:
                    best = (float(np.mean(valid)), row)
        assert best is not None
        print(f"z={z} CHOSEN ON VALIDATION: {best[1]}; DP-SGD noise multiplier for epsilon "
              f"{BUDGET} with the release: {dpsgd_sigma(z):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
