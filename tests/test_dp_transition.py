"""The DP-SGD study of simulations/dp_transition, on tiny synthetic data: its calibration meets
the epsilon it states, the rows it does not learn are never released, and one example's change
moves the clipped sum by at most twice the clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.simulations import dp_transition as dpt

from .test_cold_transition import _split


@pytest.mark.parametrize(("epsilon", "steps"), [(2.0, 5), (8.0, 20)])
def test_the_noise_multiplier_spends_at_most_the_epsilon_and_not_much_less(epsilon, steps):
    sigma = dpt.noise_multiplier(epsilon, steps)
    assert dpt._eps("pld", sigma, steps) <= epsilon
    assert dpt._eps("pld", sigma * 0.99, steps) > epsilon  # the smallest, to the search's 1e-4
    assert dpt._eps("rdp", sigma, steps) >= dpt._eps("pld", sigma, steps) * 0.999  # looser


def _data(seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(10, size=6, replace=False).tolist() for _ in range(30)]
    sp = _split(seqs)
    fields = {100 + k: {"gender": "MF"[k % 2]} for k in range(30)}
    return sp, ProfilePopularity(sp, fields, fields=["gender"], shrink=0.0)


def test_rows_outside_the_top_items_stay_zero_under_noise():
    sp, pp = _data()
    keep = dpt.rows(sp, 4)
    counts = np.bincount(sp.train_item, minlength=10)
    top = set(np.argsort(-counts, kind="stable")[:4].tolist())
    assert {int(i) for i in torch.nonzero(keep[:, 0]).flatten()} == top
    model = dpt.train(sp, pp, steps=3, noise_std=5.0, seed=1, top=4)
    for table in (model.e, model.f):
        off = [i for i in range(10) if i not in top]
        assert float(table[off].abs().max()) == 0.0  # never trained, never noised
        assert float(table[sorted(top)].abs().max()) > 0.0
    assert float(dpt.rows(sp, 0).min()) == 1.0  # top 0: every row


def test_one_changed_interaction_moves_the_clipped_sum_by_at_most_twice_the_clip():
    """Property on random data: a user's example is rebuilt with one interaction changed (its
    first items included); the clipped per-example gradients of every other user are the same,
    so the clipped sum moves by at most 2 C."""
    rng = np.random.default_rng(3)
    for trial in range(5):
        seqs = [rng.choice(10, size=rng.integers(4, 8), replace=False).tolist() for _ in range(12)]
        changed = [list(s) for s in seqs]
        u = int(rng.integers(len(seqs)))
        pos = int(rng.integers(len(changed[u])))
        free = sorted(set(range(10)) - set(changed[u]))
        changed[u][pos] = int(rng.choice(free))
        sums = []
        for s in (seqs, changed):
            sp = _split(s)
            fields = {100 + k: {"gender": "M"} for k in range(len(s))}
            pp = ProfilePopularity(_split(seqs), fields, fields=["gender"], shrink=0.0)
            prior, g, r = dpt._examples(sp, pp)  # the prior is public here: fixed by seqs
            gen = torch.Generator().manual_seed(trial)
            p = {"e": 0.3 * torch.randn(10, 4, generator=gen),
                 "f": 0.3 * torch.randn(10, 4, generator=gen)}  # fmt: skip
            gr = dpt._per_example(p, prior, g, r)
            flat = torch.cat([gr["e"].reshape(len(s), -1), gr["f"].reshape(len(s), -1)], 1)
            scale = (dpt.CLIP / (flat.norm(dim=1) + 1e-12)).clamp(max=1.0)
            clipped = flat * scale[:, None]
            sums.append((clipped.sum(0), clipped))
        others = [k for k in range(len(seqs)) if k != u]
        assert torch.allclose(sums[0][1][others], sums[1][1][others])
        assert float((sums[0][0] - sums[1][0]).norm()) <= 2 * dpt.CLIP + 1e-6
