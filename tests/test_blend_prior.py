"""The cold-user blend of a model with profile-conditioned popularity (simulations/blend_prior)."""

from __future__ import annotations

import math

import numpy as np

from fedrec.simulations.blend_prior import FLOOR, Blend


class _Fixed:
    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def score(self, users, history, profiles, warm):  # noqa: ANN001
        return self.rows[np.asarray(users)]


def test_the_blend_is_the_model_at_zero_the_prior_at_infinity_and_a_log_sum_between():
    rng = np.random.default_rng(0)
    model = rng.normal(size=(4, 9))
    prior = rng.dirichlet(np.ones(9), size=4)
    prior[0, 3] = 0.0  # an item no one in the segment took: the floor keeps it finite
    args = (np.arange(4), [np.array([], dtype=np.int64)] * 4, [None] * 4, np.zeros(4, bool))
    m, p = _Fixed(model), _Fixed(prior)
    assert np.array_equal(Blend(m, p, 0.0).score(*args), model)
    assert np.array_equal(Blend(m, p, math.inf).score(*args), np.log(prior + FLOOR))
    mixed = Blend(m, p, 2.0).score(*args)
    assert np.allclose(mixed, model + 2.0 * np.log(prior + FLOOR)) and np.isfinite(mixed).all()
    # a product of experts: softmax(mixed) is proportional to softmax(model) * prior ** 2
    poe = np.exp(model - model.max(1, keepdims=True)) * (prior + FLOOR) ** 2
    soft = np.exp(mixed - mixed.max(1, keepdims=True))
    assert np.allclose(soft / soft.sum(1, keepdims=True), poe / poe.sum(1, keepdims=True))
