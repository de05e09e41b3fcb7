"""Local DP-SGD rounds: the adapter really moves, epsilon accumulates truthfully, budgets hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.client.local_train import (
    ClientExamples,
    FileStore,
    MemoryStore,
    build_examples,
    calibrated_noise,
    train_round,
)
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.model.examples import disjoint_examples
from fedrec.shared.privacy.accounting import epsilon_spent

from .test_model import ds, make_model  # noqa: F401 - fixture re-export


def _data(ds, n_users=3):  # noqa: F811
    from fedrec.shared.splitting import protocol_a

    sp = protocol_a(ds)
    hist = sp.train_histories()
    users = []
    for u in range(n_users):
        rows = np.flatnonzero(sp.train_user == u)
        users.append((sp.train_item[rows], sp.train_time[rows]))
    assert all(len(h) > 3 for h in hist[:n_users])
    return build_examples(users, slots=6, history_len=8, key=0)


def _cfg(**kw):
    base = dict(
        backbone="x",
        history_len=8,
        max_length=16,
        local_steps=3,
        sample_rate=0.5,
        negatives=10,
        lr=0.5,
        epsilon=4.0,
        num_rounds=4,
        fraction_train=1.0,
    )
    base.update(kw)
    return FedConfig(**base)


def test_removing_one_interaction_changes_exactly_one_example():
    rng = np.random.default_rng(0)
    items, times = rng.integers(0, 500, 60), np.sort(rng.integers(0, 10**6, 60))
    full = disjoint_examples(items, times, slots=8, history_len=20, key=3)
    rows = {(t, tuple(c)) for t, c in zip(full[0].tolist(), full[1].tolist(), strict=True)}
    for drop in range(60):
        keep = np.arange(60) != drop
        part = disjoint_examples(items[keep], times[keep], slots=8, history_len=20, key=3)
        rows2 = {(t, tuple(c)) for t, c in zip(part[0].tolist(), part[1].tolist(), strict=True)}
        assert len(rows - rows2) == 1  # exactly one example differs (or vanished)
        assert len(rows2 - rows) <= 1
    # the naive sliding window does NOT have this property: one interaction is in many examples
    from fedrec.shared.model.examples import sequence_examples

    _, _, ctx = sequence_examples([items], history_len=20)
    assert (ctx == items[10]).any(axis=1).sum() > 1


@pytest.mark.parametrize("ffa", [True, False])
def test_dp_round_changes_adapter_and_accounts(ds, tiny_backbone, ffa):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=ffa)
    scorer = CandidateScorer(model)
    b = model.lora_layer().lora_B["default"].weight
    before = b.detach().clone()
    bias_before = model.item_bias.detach().clone()
    cfg = _cfg(backbone=str(tiny_backbone))
    store = MemoryStore()
    data = _data(ds)
    r1 = train_round(scorer, data, cfg, store, seed=0)
    assert r1.trained and r1.steps == 3 and np.isfinite(r1.loss)
    assert (b - before).abs().max() > 0  # a DP step really changed the LoRA B (DESIGN 7)
    assert (model.item_bias - bias_before).abs().max() > 0
    sigma = calibrated_noise(cfg)
    assert store.history == [(sigma, 0.5, 3)]
    assert r1.epsilon == pytest.approx(epsilon_spent(history=[(sigma, 0.5, 3)], delta=1e-5))
    r2 = train_round(scorer, data, cfg, store, seed=1)
    # the accountant persisted: epsilon is the two rounds', not a fresh round's
    assert r2.epsilon == pytest.approx(epsilon_spent(history=[(sigma, 0.5, 6)], delta=1e-5))
    assert r2.epsilon > r1.epsilon * 1.2
    # Opacus' hooks were removed: a plain forward/backward no longer fills grad_sample
    for p in scorer.parameters():
        p.grad_sample = None
    scorer(
        torch.as_tensor(data.context[:2]), torch.as_tensor(data.targets[:2, None])
    ).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in scorer.parameters())


def test_budget_is_never_exceeded(ds, tiny_backbone):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer = CandidateScorer(model)
    cfg = _cfg(backbone=str(tiny_backbone), num_rounds=3, fraction_train=1.0)
    store = MemoryStore()
    data = _data(ds)
    eps = [train_round(scorer, data, cfg, store, seed=r) for r in range(5)]
    assert [r.trained for r in eps] == [True, True, True, False, False]
    assert eps[2].epsilon <= cfg.epsilon and eps[2].epsilon > 0.9 * cfg.epsilon
    assert "budget" in eps[3].reason and eps[3].epsilon == pytest.approx(eps[2].epsilon)
    assert len(store.history) == 1 and store.history[0][2] == 9  # refused rounds took no steps


def test_file_store_survives_restart_and_rejects_garbage(tmp_path):
    path = tmp_path / "dev" / "budget.json"
    FileStore(path).save([(1.2, 0.5, 4)])
    assert FileStore(path).load() == [(1.2, 0.5, 4)]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="refusing to train"):
        FileStore(path).load()


def test_empty_poisson_batches_are_handled(ds, tiny_backbone):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer = CandidateScorer(model)
    data = _data(ds, n_users=1)
    one = ClientExamples(data.targets[:1], data.context[:1])
    cfg = _cfg(backbone=str(tiny_backbone), sample_rate=0.05, local_steps=20)
    r = train_round(scorer, one, cfg, MemoryStore(), seed=0)
    assert r.trained and r.steps == 20  # most batches are empty; each still counts as a step
    assert all(torch.isfinite(p).all() for p in scorer.parameters())


def test_non_dp_round_reports_no_epsilon(ds, tiny_backbone):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    cfg = _cfg(backbone=str(tiny_backbone), dp=False, epsilon=FedConfig.epsilon)
    r = train_round(CandidateScorer(model), _data(ds), cfg, MemoryStore(), seed=0)
    assert r.trained and r.epsilon == 0.0 and r.noise_multiplier == 0.0


def test_sequence_examples_only_without_local_dp(ds, tiny_backbone):  # noqa: F811
    """examples=sequence (central training's sliding windows): with local DP only under the RDP
    accountant (group privacy); without local DP a round trains on them, epsilon 0."""
    from fedrec.shared.model.examples import sequence_examples
    from fedrec.shared.splitting import protocol_a

    with pytest.raises(ValueError, match="accountant=rdp"):
        _cfg(examples="sequence", accountant="prv")
    with pytest.raises(ValueError, match="'examples'"):
        _cfg(examples="windows", dp=False, epsilon=FedConfig.epsilon)
    sp = protocol_a(ds)
    users = []
    for u in range(3):
        rows = np.flatnonzero(sp.train_user == u)
        users.append((sp.train_item[rows], sp.train_time[rows]))
    seq = build_examples(users, slots=6, history_len=8, key=0, sequence=True)
    _, targets, context = sequence_examples([items for items, _ in users], 8)
    assert np.array_equal(seq.targets, targets) and np.array_equal(seq.context, context)
    assert len(seq) == sum(len(items) for items, _ in users) > len(_data(ds))
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    cfg = _cfg(
        backbone=str(tiny_backbone), dp=False, epsilon=FedConfig.epsilon, examples="sequence"
    )
    before = model.lora_layer().lora_B["default"].weight.detach().clone()
    r = train_round(CandidateScorer(model), seq, cfg, MemoryStore(), seed=0)
    assert r.trained and r.examples == len(seq) and r.epsilon == 0.0
    assert not torch.equal(before, model.lora_layer().lora_B["default"].weight)


def test_sliding_windows_change_at_most_the_group_size_of_examples():
    """Removing one interaction from a sequence changes at most 1 + 2 * history-len examples in
    add/remove terms (FedConfig.dp_group), and the bound is reached."""
    from collections import Counter

    from fedrec.shared.model.examples import sequence_examples

    rng = np.random.default_rng(1)
    items = rng.integers(0, 500, 40)
    hl = 4
    k = _cfg(examples="sequence", history_len=hl).dp_group()
    assert k == 1 + 2 * hl
    assert _cfg(history_len=hl).dp_group() == 1
    assert _cfg(examples="sequence", history_len=hl, dp=False, epsilon=8.0).dp_group() == 1

    def rows(seq):
        _, t, c = sequence_examples([seq], history_len=hl)
        return Counter(zip(t.tolist(), map(tuple, c.tolist()), strict=True))

    full = rows(items)
    worst = 0
    for drop in range(len(items)):
        part = rows(np.delete(items, drop))
        distance = sum(((full - part) + (part - full)).values())  # removals + additions
        assert distance <= k
        worst = max(worst, distance)
    assert worst == k


def test_dp_round_on_sliding_windows_reports_group_epsilon(ds, tiny_backbone):  # noqa: F811
    from fedrec.shared.splitting import protocol_a

    sp = protocol_a(ds)
    users = []
    for u in range(3):
        rows = np.flatnonzero(sp.train_user == u)
        users.append((sp.train_item[rows], sp.train_time[rows]))
    seq = build_examples(users, slots=6, history_len=8, key=0, sequence=True)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    cfg = _cfg(backbone=str(tiny_backbone), examples="sequence", epsilon=8.0)
    r = train_round(CandidateScorer(model), seq, cfg, MemoryStore(), seed=0)
    k = cfg.dp_group()
    assert r.trained and k == 17
    hist = [(r.noise_multiplier, cfg.sample_rate, cfg.local_steps)]
    assert r.epsilon == pytest.approx(epsilon_spent(history=hist, delta=cfg.delta, group=k))
    assert r.epsilon > epsilon_spent(history=hist, delta=cfg.delta)  # the larger, group bound
    disjoint = _cfg(backbone=str(tiny_backbone), epsilon=8.0)
    from fedrec.client.local_train import calibrated_noise

    assert r.noise_multiplier > calibrated_noise(disjoint)  # more noise for the same budget


def test_id_table_trains_without_dp_only_at_its_own_rate(ds, tiny_backbone):  # noqa: F811
    """id-residual=true: refused with local or user-level DP (config and round); without DP one
    full-batch SGD step moves the table by exactly lr-id times its gradient (twice lr-id, twice
    the change) while B moves at lr."""
    with pytest.raises(ValueError, match="id-residual=true needs dp=false"):
        _cfg(id_residual=True)
    with pytest.raises(ValueError, match="id-residual=true needs dp=false"):
        _cfg(id_residual=True, dp=False, epsilon=FedConfig.epsilon, user_dp=True)
    with pytest.warns(UserWarning, match="'lr-id' is ignored"):
        _cfg(dp=False, epsilon=FedConfig.epsilon, lr_id=3.0)
    model = make_model(ds, tiny_backbone, id_residual=True, ffa=True)
    with pytest.raises(ValueError, match="cannot train the per-item ID table"):
        train_round(CandidateScorer(model), _data(ds), _cfg(), MemoryStore(), seed=0)

    def one_step(lr_id):
        m = make_model(ds, tiny_backbone, id_residual=True, ffa=True)
        with torch.no_grad():
            m.id_emb.normal_(generator=torch.Generator().manual_seed(1))
        before = m.id_emb.detach().clone(), m.lora_layer().lora_B["default"].weight.detach().clone()
        cfg = _cfg(
            backbone=str(tiny_backbone), dp=False, epsilon=FedConfig.epsilon, id_residual=True,
            lr_id=lr_id, sample_rate=1.0, local_steps=1,
        )  # fmt: skip
        r = train_round(CandidateScorer(m), _data(ds), cfg, MemoryStore(), seed=0)
        assert r.trained and r.epsilon == 0.0
        after = m.id_emb.detach(), m.lora_layer().lora_B["default"].weight.detach()
        return after[0] - before[0], after[1] - before[1]

    d_id, d_b = one_step(2.0)
    d_id2, d_b2 = one_step(4.0)
    assert d_id.abs().max() > 0 and d_b.abs().max() > 0
    assert torch.allclose(d_id2, 2 * d_id, atol=1e-6)
    assert torch.allclose(d_b2, d_b, atol=1e-6)
    d_same, _ = one_step(0.0)  # 0: the table follows lr (0.5)
    assert torch.allclose(d_same, d_id / 4, atol=1e-6)
