"""On-device personalization (simulations/personalize.py): the untouched personal part is the
global model, and each device's rows move only with its own windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.examples import right_aligned, sequence_examples
from fedrec.simulations.personalize import Personal

from .test_model import ds, make_model, perturb_lora  # noqa: F401 - fixture re-export


def _model(ds, tiny_backbone):  # noqa: F811
    model = make_model(ds, tiny_backbone, ffa=True, id_residual=False, use_profile=False)
    perturb_lora(model, seed=4)
    with torch.no_grad():
        model.item_bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        model.pos_logits.copy_(torch.linspace(-1, 1, model.cfg.history_len))
    model.eval()
    return model


def test_untrained_personal_part_scores_as_the_global_model(ds, tiny_backbone):  # noqa: F811
    model = _model(ds, tiny_backbone)
    hist = [np.array([3, 7, 11]), np.array([5, 2]), np.array([], dtype=np.int64)]
    users = np.array([0, 2, 1])
    ref = ModelScorer(model, ProfileBank(model)).score(users, hist, [None] * 3, np.ones(3, bool))
    for part in ("offset", "recency", "both"):
        got = Personal(model, 3, part).scorer().score(users, hist, [None] * 3, np.ones(3, bool))
        assert np.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("part", ["offset", "recency", "both"])
def test_each_device_trains_on_its_own_windows_only(ds, tiny_backbone, part):  # noqa: F811
    """Device 1 has no windows: its rows stay the global ones. Device 0's result is the same
    whether device 2 trains beside it or not (the batched simulation is each device alone)."""
    model = _model(ds, tiny_backbone)
    L = model.cfg.history_len
    histories = [np.array([3, 7, 11, 4, 9]), np.array([], dtype=np.int64), np.array([5, 2, 8])]
    users, targets, context = (torch.as_tensor(x) for x in sequence_examples(histories, L))
    together = Personal(model, 3, part)
    together.fit(users, context, targets, 3, steps=4, lr=0.05)
    mine = users == 0
    alone = Personal(model, 3, part)
    alone.fit(users[mine], context[mine], targets[mine], 3, steps=4, lr=0.05)
    moved = [p for p in together.params()]
    assert moved and any(float((p[0] - q[0]).abs().max()) > 1e-4 for p, q in zip(
        moved, Personal(model, 3, part).params(), strict=True))  # fmt: skip
    for p, q in zip(together.params(), alone.params(), strict=True):
        assert torch.allclose(p[0], q[0], atol=1e-6)  # device 0: the same either way
    fresh = Personal(model, 3, part)
    for p, q in zip(together.params(), fresh.params(), strict=True):
        assert torch.equal(p[1], q[1])  # device 1 never trained
    ctx = torch.as_tensor(right_aligned([histories[0]], L))
    assert not torch.allclose(together.scores(torch.tensor([0]), ctx),
                              fresh.scores(torch.tensor([0]), ctx))  # fmt: skip


def test_paired_comparison_counts_per_device_differences(ds, tiny_backbone):  # noqa: F811
    from fedrec.shared.splitting import protocol_a
    from fedrec.simulations.personalize import paired

    model = _model(ds, tiny_backbone)
    split = protocol_a(ds)
    test, n = split.tests["test"], split.n_users
    same = paired(
        Personal(model, n, "offset").scorer(), Personal(model, n, "offset").scorer(), test
    )
    assert same["ndcg10_diff_mean"] == 0 and same["ndcg10_diff_ci95"] == [0.0, 0.0]
    assert same["devices_gain"] == same["devices_lose"] == 0 and same["devices"] == len(test)
    other = Personal(model, n, "offset")
    with torch.no_grad():
        other.offset.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    diff = paired(Personal(model, n, "offset").scorer(), other.scorer(), test)
    lo, hi = diff["ndcg10_diff_ci95"]
    assert lo <= diff["ndcg10_diff_mean"] <= hi and diff["devices_gain"] + diff["devices_lose"] > 0
