"""Local DP-SGD rounds: the adapter really moves, epsilon accumulates truthfully, budgets hold."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from fedrec.client.budget import FileStore, MemoryStore
from fedrec.client.local_train import (
    ClientExamples,
    build_examples,
    calibrated_noise,
    poisson_batches,
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


def _rows(examples):
    from collections import Counter

    t, c = examples
    return Counter(zip(t.tolist(), map(tuple, c.tolist()), strict=True))


@pytest.mark.parametrize("seed", range(5))
def test_one_interaction_is_one_replacement_of_disjoint_examples(seed):
    """The claimed unit mapped onto the examples, on random histories: adding or removing one
    interaction either adds/removes one example or replaces one example by another (never
    more), which is the ``replace-one`` adjacency FedConfig declares for disjoint examples; and
    both cases occur, so add/remove accounting (the old claim) would be wrong."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    items, times = rng.integers(0, 500, n), np.sort(rng.choice(10**6, n, replace=False))
    slots, key = int(rng.integers(2, 12)), int(rng.integers(0, 100))
    full = _rows(disjoint_examples(items, times, slots=slots, history_len=20, key=key))
    kinds = set()
    for drop in range(n):  # removing interaction `drop` = adding it to the smaller history
        keep = np.arange(n) != drop
        part = _rows(disjoint_examples(items[keep], times[keep], slots=slots, history_len=20,
                                       key=key))  # fmt: skip
        gone, new = full - part, part - full
        # (nothing changes when the interaction falls outside its slot's history-len window)
        assert sum(gone.values()) <= 1 and sum(new.values()) <= 1
        kinds.add("replace" if new and gone else "add-remove" if gone else "none")
    assert _cfg(history_len=20).dp_adjacency() == "replace-one"
    assert _cfg(history_len=20).dp_group() == 1
    if n > 3 * slots:
        assert "replace" in kinds


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
    assert (b - before).abs().max() > 0  # a DP step really changed the LoRA B
    assert (model.item_bias - bias_before).abs().max() > 0
    sigma = calibrated_noise(cfg)
    assert store.budget.history == [(sigma, 0.5, 3)]
    assert store.budget.mechanism == cfg.dp_mechanism()
    replace = dict(delta=1e-5, accountant="pld", adjacency="replace-one")
    assert r1.epsilon == pytest.approx(epsilon_spent(history=[(sigma, 0.5, 3)], **replace))
    r2 = train_round(scorer, data, cfg, store, seed=1)
    # the accountant persisted: epsilon is the two rounds', not a fresh round's
    assert r2.epsilon == pytest.approx(epsilon_spent(history=[(sigma, 0.5, 6)], **replace))
    # replace-one costs more than the add/remove epsilon the same history would claim
    assert r2.epsilon > epsilon_spent(history=[(sigma, 0.5, 6)], delta=1e-5, accountant="pld")
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
    hist = store.budget.history
    assert len(hist) == 1 and hist[0][2] == 9  # refused rounds took no steps


def test_device_keeps_its_mechanism_and_cap_whatever_the_server_says(ds, tiny_backbone):  # noqa: F811
    """The budget stores the mechanism and the cap: a later run with a larger epsilon, or with
    another adjacency (sliding windows), cannot re-account or extend the device's history."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer, data = CandidateScorer(model), _data(ds)
    store = MemoryStore()
    first = _cfg(backbone=str(tiny_backbone), num_rounds=2)
    assert all(train_round(scorer, data, first, store, seed=r).trained for r in range(2))
    assert store.budget.epsilon_max == first.epsilon
    # a second run asks for 4x the budget: the device's cap (the first run's) still holds
    greedy = _cfg(backbone=str(tiny_backbone), num_rounds=2, epsilon=16.0)
    r = train_round(scorer, data, greedy, store, seed=2)
    assert not r.trained and "budget" in r.reason and f"> {first.epsilon}" in r.reason
    # the owner may set the device's cap explicitly (node config epsilon-max)
    r = train_round(scorer, data, greedy, store, seed=3, device_cap=16.0)
    assert r.trained and store.budget.epsilon_max == 16.0
    # a run under sliding windows would account the same history at another adjacency: refused
    seq = _cfg(backbone=str(tiny_backbone), examples="sequence", accountant="rdp", epsilon=50.0)
    r = train_round(scorer, data, seq, store, seed=4)
    assert not r.trained and r.reason.startswith("mechanism")


def test_file_store_survives_restart_and_rejects_garbage(tmp_path):
    from fedrec.client.budget import Budget

    path = tmp_path / "dev" / "budget.json"
    mech = _cfg().dp_mechanism()
    FileStore(path).save(Budget([(1.2, 0.5, 4)], mech, 8.0))
    assert FileStore(path).load() == Budget([(1.2, 0.5, 4)], mech, 8.0)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="refusing to train"):
        FileStore(path).load()
    # an older fedrec's file: steps without the mechanism they were spent under
    path.write_text('{"history": [[1.2, 0.5, 4]]}')
    with pytest.raises(ValueError, match="not the mechanism"):
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


@pytest.mark.parametrize("q", [0.02, 0.3, 0.9])
def test_poisson_batches_are_opacus_draws(q):
    """The vectorized sampler takes Opacus' Poisson draws: from the same generator state, the
    same rows as its UniformWithReplacementSampler, step after step (empty draws included),
    every tensor indexed alike; about q n rows a step; tensors of unequal length refused."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n, steps = 57, 40
    context = torch.arange(n * 3).reshape(n, 3)
    targets = torch.arange(n) + 1000
    ours = poisson_batches([context, targets], q, torch.Generator().manual_seed(11))
    opacus = UniformWithReplacementSampler(
        num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(11), steps=steps
    )
    sizes = []
    for want in opacus:
        ctx, tgt = next(ours)
        assert tgt.tolist() == [1000 + i for i in want]
        assert torch.equal(ctx, context[want])
        assert ctx.dtype == context.dtype and ctx.shape[1:] == context.shape[1:]
        sizes.append(len(want))
    assert len(sizes) == steps
    assert abs(sum(sizes) / steps - q * n) < 4 * (q * (1 - q) * n / steps) ** 0.5 + 0.5
    with pytest.raises(ValueError, match="rows"):
        next(poisson_batches([context, targets[:-1]], q, torch.Generator()))


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

    for acc in ("prv", "pld"):
        with pytest.raises(ValueError, match="accountant=rdp"):
            _cfg(examples="sequence", accountant=acc)
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
    k = _cfg(examples="sequence", history_len=hl, accountant="rdp").dp_group()
    assert k == 1 + 2 * hl
    assert _cfg(history_len=hl).dp_group() == 1
    assert _cfg(examples="sequence", history_len=hl, accountant="rdp").dp_adjacency() == (
        "add-remove"
    )
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
    cfg = _cfg(backbone=str(tiny_backbone), examples="sequence", epsilon=8.0, accountant="rdp")
    r = train_round(CandidateScorer(model), seq, cfg, MemoryStore(), seed=0)
    k = cfg.dp_group()
    assert r.trained and k == 17
    hist = [(r.noise_multiplier, cfg.sample_rate, cfg.local_steps)]
    assert r.epsilon == pytest.approx(epsilon_spent(history=hist, delta=cfg.delta, group=k))
    assert r.epsilon > epsilon_spent(history=hist, delta=cfg.delta)  # the larger, group bound
    disjoint = _cfg(backbone=str(tiny_backbone), epsilon=8.0, accountant="rdp")
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


@pytest.mark.parametrize("sampling", ["keyed", "shared"])
@pytest.mark.parametrize("seed", range(3))
def test_per_example_gradients_depend_on_their_example_alone(ds, tiny_backbone, seed, sampling):  # noqa: F811
    """Property test on random histories: with one interaction added, every example other than
    the affected one has a bit-identical per-example gradient (negatives and cold-dropout masks
    included), through the training path's own loss (``batch_loss``) and Opacus' per-sample
    gradients, for per-example (keyed) and per-step (shared) negatives. Negatives drawn from one
    stream in batch order fail this: the added example shifts every later example's draws."""
    from opacus import GradSampleModule

    from fedrec.client.local_train import batch_loss, quiet_opacus_hooks

    rng = np.random.default_rng(seed)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer = CandidateScorer(model)
    cfg = _cfg(
        backbone=str(tiny_backbone), cold_dropout=0.3, negatives=12, negative_sampling=sampling
    )
    n = int(rng.integers(12, 30))
    times = np.sort(rng.choice(10**6, n + 1, replace=False))
    items = rng.integers(0, scorer.n_items, n + 1)
    key, step = rng.bytes(32), int(rng.integers(0, 100))

    def per_example(keep: np.ndarray) -> dict[tuple, torch.Tensor]:
        # many slots: some interactions are alone in theirs, so adding one adds an example
        ex = build_examples([(items[keep], times[keep])], slots=24, history_len=8, key=seed)
        gsm = GradSampleModule(scorer, loss_reduction="sum")
        try:
            batch = [torch.as_tensor(ex.context), torch.as_tensor(ex.targets)]
            loss = batch_loss(gsm, batch, scorer.n_items, cfg, key=key, step=step, summed=True)
            with quiet_opacus_hooks():
                loss.backward()
            params = [p for p in scorer.parameters() if p.requires_grad]
            grads = torch.cat(
                [
                    p.grad_sample.reshape(len(ex), -1)
                    if getattr(p, "grad_sample", None) is not None
                    else torch.zeros(len(ex), p.numel())
                    for p in params
                ],
                dim=1,
            )
        finally:
            gsm._close()
            for p in scorer.parameters():
                p.grad_sample, p.grad = None, None
        rows = zip(ex.targets.tolist(), map(tuple, ex.context.tolist()), strict=True)
        return {row: grads[i] for i, row in enumerate(rows)}

    with_all = per_example(np.ones(n + 1, dtype=bool))
    kinds = set()
    for extra in rng.permutation(n + 1)[:8]:  # the interaction in one history, not the other
        without = per_example(np.arange(n + 1) != extra)
        shared = with_all.keys() & without.keys()
        assert len(with_all) - len(shared) == 1 and len(without) - len(shared) <= 1
        kinds.add("add" if len(with_all) > len(without) else "replace")
        assert all(with_all[r].abs().sum() > 0 for r in shared)  # not trivially 0
        for row in shared:
            assert torch.equal(with_all[row], without[row]), (extra, row)
    # both kinds were exercised: an added example shifts a batch-order stream for every later
    # example; a replaced one does not (the count stays the same)
    assert kinds == {"add", "replace"}


def test_a_device_refuses_rounds_its_owner_did_not_allow():
    """On a device (node config with data-dir) the server cannot switch DP off, turn on the ID
    table or profiles, or raise delta past the device's delta-max; in simulation nothing
    changes."""
    from fedrec.client.app import device_guard

    dev = {"data-dir": "/data/me"}
    device_guard(_cfg(), dev)  # local DP: fine
    for bad in (
        _cfg(dp=False, epsilon=FedConfig.epsilon),
        _cfg(use_profile=True),
    ):
        with pytest.raises(ValueError, match="allow-no-dp=true"):
            device_guard(bad, dev)
    device_guard(_cfg(dp=False, epsilon=FedConfig.epsilon), dev | {"allow-no-dp": "true"})
    with pytest.raises(ValueError, match="delta-max"):
        device_guard(_cfg(delta=1e-3), dev | {"delta-max": 1e-5})
    device_guard(_cfg(dp=False, epsilon=FedConfig.epsilon), {"partition-id": 0})  # simulation


def test_a_device_refuses_a_user_level_budget_above_its_owners_caps():
    """user-epsilon-max / user-delta-max in a device's node config: a trusted-server run whose
    user-level budget is larger is refused, and a secure one with a larger delta, from the
    configs alone."""
    from fedrec.client.app import device_guard

    secure = FedConfig(dp=False, user_dp=True, secure_agg=True, user_epsilon=8.0, user_delta=1e-4)
    trusted = FedConfig(dp=False, user_dp=True, user_epsilon=8.0, user_delta=1e-4)
    dev = {"data-dir": "/data/me", "allow-no-dp": "true"}
    device_guard(trusted, dev | {"user-epsilon-max": 8, "user-delta-max": 1e-4})
    with pytest.raises(ValueError, match=r"user-epsilon 7.9.*user-epsilon-max=4"):
        device_guard(trusted, dev | {"user-epsilon-max": 4, "user-delta-max": 1e-4})
    # a fixed noise multiplier spends what it spends, whatever user-epsilon the config states
    weak = FedConfig(dp=False, user_dp=True, user_epsilon=4.0, user_noise_multiplier=0.1)
    with pytest.raises(ValueError, match=r"multiplier 0.1.*user-epsilon-max=4"):
        device_guard(weak, dev | {"user-epsilon-max": 4, "user-delta-max": 1e-3})
    # a secure round checks the device's record of the rounds it joined instead (client.secure)
    device_guard(secure, dev | {"user-epsilon-max": 4, "user-delta-max": 1e-4}, secure=True)
    # a cap without the device's own delta, or one that cannot refuse, is a node config error
    with pytest.raises(ValueError, match="without user-delta-max"):
        device_guard(secure, dev | {"user-epsilon-max": 4}, secure=True)
    for bad in ("nan", float("inf"), 0, -1, "eight"):
        with pytest.raises(ValueError, match="not a finite number"):
            device_guard(secure, dev | {"user-epsilon-max": bad, "user-delta-max": 1e-4})
    for cfg, secure_round in ((secure, True), (trusted, False)):
        with pytest.raises(ValueError, match="user-delta-max"):
            device_guard(cfg, dev | {"user-delta-max": 1e-5}, secure=secure_round)
    device_guard(trusted, {"partition-id": 0, "user-epsilon-max": 4})  # simulation
    # a delta cap that cannot refuse (NaN, a non-number) is a node config error too
    for key in ("delta-max", "user-delta-max"):
        for bad in ("nan", "tiny", 0, 1.5):
            with pytest.raises(ValueError, match=rf"{key}=.*not a number in \(0, 1\)"):
                device_guard(trusted, dev | {key: bad})
    # without user-level DP its caps are not read at all
    plain = FedConfig(dp=True, user_dp=False)
    device_guard(plain, {"data-dir": "/d", "user-epsilon-max": "nan", "user-delta-max": "x"})


@pytest.mark.parametrize("seed", range(5))
def test_the_charge_is_the_history_opacus_writes(seed):
    """A round is charged before it trains as ``with_steps`` writes it; on random sequences of
    rounds (repeated and changing (sigma, q)) that equals what Opacus' accountant records step
    by step, which ``train_round`` checks after training."""
    from opacus.accountants import RDPAccountant

    from fedrec.client.local_train import with_steps

    rng = np.random.default_rng(seed)
    acc, charged = RDPAccountant(), []
    for _ in range(int(rng.integers(1, 12))):
        sigma, q = float(rng.choice([0.8, 1.1, 1.1 + 1e-12])), float(rng.choice([0.5, 0.25]))
        steps = int(rng.integers(0, 5))
        charged = with_steps(charged, sigma, q, steps)
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert charged == [(float(s), float(q), int(n)) for s, q, n in acc.history]


def _blocking_step(monkeypatch, blocked: str):
    """Patch local training's step so that the thread named ``blocked`` waits at its first step
    (mid-round, after its charge) until the returned event is set."""
    import threading

    import fedrec.client.local_train as lt

    started, go, real = threading.Event(), threading.Event(), lt._step

    def step(*a, **kw):
        if threading.current_thread().name == blocked:
            started.set()
            assert go.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(lt, "_step", step)
    return started, go


@pytest.mark.parametrize("cap_rounds", [1, 2])
def test_two_runs_on_one_device_take_turns_on_its_budget(
    ds,  # noqa: F811
    tiny_backbone,
    tmp_path,
    monkeypatch,
    cap_rounds,
):
    """Run A is mid-round on a device when run B's round starts. A's steps are already on the
    device's file (charged before training, under its lock), so B sees them: with a cap that
    allows one round B is refused; with room for two, both rounds stay on the file (before,
    each run read the file before training and wrote after it, so one lost the other's
    steps, and both could pass the cap)."""
    import threading

    path = tmp_path / "state" / "privacy-budget.json"
    cfg = _cfg(backbone=str(tiny_backbone), num_rounds=2)  # two rounds fit its epsilon
    one = calibrated_noise(cfg)  # the sigma both runs use
    data = _data(ds)
    at = lambda n: epsilon_spent(  # noqa: E731
        history=[(one, 0.5, n)], delta=1e-5, accountant="pld", adjacency="replace-one"
    )
    cap = (at(3) + at(6)) / 2 if cap_rounds == 1 else cfg.epsilon
    started, go = _blocking_step(monkeypatch, "run-a")
    results = {}

    def run(name: str) -> None:
        scorer = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=True))
        results[name] = train_round(scorer, data, cfg, FileStore(path), seed=0, device_cap=cap)

    a = threading.Thread(target=run, args=("a",), name="run-a")
    a.start()
    assert started.wait(120)
    run("b")  # while A waits inside its round
    go.set()
    a.join(120)
    assert results["a"].trained
    steps = FileStore(path).load().history
    if cap_rounds == 1:
        assert not results["b"].trained and "budget" in results["b"].reason
        assert steps == [(one, 0.5, 3)]
    else:
        assert results["b"].trained
        assert steps == [(one, 0.5, 6)]  # neither run's steps were lost
        assert results["b"].epsilon == pytest.approx(
            epsilon_spent(history=steps, delta=1e-5, accountant="pld", adjacency="replace-one")
        )


def test_a_round_that_fails_mid_training_still_counts(ds, tiny_backbone, tmp_path, monkeypatch):  # noqa: F811
    """The charge is made before training: a crash after it leaves the steps on the device's
    file (an over-count, never an under-count), and no stray temp or half-written file."""
    import fedrec.client.local_train as lt

    def boom(*a, **kw):
        raise RuntimeError("power cut")

    monkeypatch.setattr(lt, "_step", boom)
    path = tmp_path / "state" / "privacy-budget.json"
    cfg = _cfg(backbone=str(tiny_backbone))
    scorer = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=True))
    with pytest.raises(RuntimeError, match="power cut"):
        train_round(scorer, _data(ds), cfg, FileStore(path), seed=0)
    assert FileStore(path).load().history == [(calibrated_noise(cfg), 0.5, 3)]
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "privacy-budget.json",
        "privacy-budget.json.lock",
    ]


def test_concurrent_updates_of_a_device_budget_lose_no_step(tmp_path):
    """Eight writers charge 15 steps each to one device's budget file at the same time: the lock
    makes every read-modify-write see the others' (without it most steps are lost)."""
    import threading

    from fedrec.client.budget import Budget
    from fedrec.client.local_train import with_steps

    path = tmp_path / "state" / "privacy-budget.json"
    mech = _cfg().dp_mechanism()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(15):
                FileStore(path).update(
                    lambda b: Budget(with_steps(b.history, 1.1, 0.5, 1), mech, 8.0)
                )
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert FileStore(path).load().history == [(1.1, 0.5, 120)]


def test_the_cap_is_checked_again_inside_the_lock(ds, tiny_backbone, tmp_path):  # noqa: F811
    """Run B reads the device's budget (its first check passes: nothing spent yet) and then
    waits; run A charges and trains a whole round; B's charge, under the lock, sees A's steps and
    refuses (a cap that allows one round). Without the check inside the lock B would train too."""
    import threading

    from fedrec.client.budget import Budget

    path = tmp_path / "state" / "privacy-budget.json"
    cfg = _cfg(backbone=str(tiny_backbone), num_rounds=2)
    sigma = calibrated_noise(cfg)
    at = lambda n: epsilon_spent(  # noqa: E731
        history=[(sigma, 0.5, n)], delta=1e-5, accountant="pld", adjacency="replace-one"
    )
    cap = (at(3) + at(6)) / 2
    waiting, go = threading.Event(), threading.Event()

    class Slow(FileStore):
        def update(self, change):  # type: ignore[no-untyped-def]
            waiting.set()
            assert go.wait(60)
            return super().update(change)

    data, results = _data(ds), {}

    def run_b() -> None:
        scorer = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=True))
        results["b"] = train_round(scorer, data, cfg, Slow(path), seed=0, device_cap=cap)

    b = threading.Thread(target=run_b)
    b.start()
    assert waiting.wait(120)  # B passed its first check and waits before its charge
    scorer = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=True))
    assert train_round(scorer, data, cfg, FileStore(path), seed=0, device_cap=cap).trained
    go.set()
    b.join(120)
    assert not results["b"].trained and "budget" in results["b"].reason
    assert FileStore(path).load() == Budget([(sigma, 0.5, 3)], cfg.dp_mechanism(), cap)


def test_steps_beyond_the_charge_are_recorded_and_raise(ds, tiny_backbone, tmp_path, monkeypatch):  # noqa: F811
    """If Opacus ever took more steps than were charged (a bug, simulated here by a charge one
    step short), the steps it took are added to the file (an over-count, never an under-count)
    and the round fails."""
    import fedrec.client.local_train as lt

    real = lt.with_steps
    monkeypatch.setattr(lt, "with_steps", lambda h, s, q, n: real(h, s, q, n - 1))
    path = tmp_path / "state" / "privacy-budget.json"
    cfg = _cfg(backbone=str(tiny_backbone))
    scorer = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=True))
    with pytest.raises(RuntimeError, match="accounting bug"):
        train_round(scorer, _data(ds), cfg, FileStore(path), seed=0)
    hist = FileStore(path).load().history
    assert sum(n for *_, n in hist) == 2 + 3  # the short charge plus the three steps taken
    # on a device whose file cannot be written for the top-up: the error says the file could
    # not be written, not that the device refuses a round it has already trained
    import fedrec.client.budget as budget_module

    store = FileStore(tmp_path / "dev" / "privacy-budget.json", quiet=True)
    writes = []

    def second_write_fails(path, doc, prefix):  # noqa: ANN001, ANN202
        writes.append(path)
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        real_write(path, doc, prefix)

    real_write = budget_module._write_durably
    monkeypatch.setattr(budget_module, "_write_durably", second_write_fails)
    scorer = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=True))
    with pytest.raises(RuntimeError, match="accounting bug") as err:
        train_round(scorer, _data(ds), cfg, store, seed=0)
    assert "the budget file cannot be written" in str(err.value)
    assert "refuses the round" not in str(err.value) and len(writes) == 2


def test_a_client_process_keeps_freed_memory_unless_told_not_to():
    """keep_freed_memory sets glibc's malloc thresholds once per process, and
    FEDREC_MALLOC_TUNE=0 leaves malloc alone; each case in a fresh interpreter. On glibc the
    setting is checked by its effect, not by mallopt's return value (which is 1 even for an
    unknown parameter): a fresh 31 MiB block comes from the heap with it (under the 32 MiB
    threshold) and from mmap without it (glibc's dynamic threshold starts at 128 KiB)."""
    import os
    import platform
    import subprocess
    import sys

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    code = "from fedrec.client.runtime import keep_freed_memory as k; print(k(), k())"
    if glibc:  # whether a fresh 31 MiB block is mmapped (mallinfo2's count of mmapped blocks)
        code += textwrap.dedent(
            """
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks"
            class Info(ctypes.Structure):
                _fields_ = [(f, ctypes.c_size_t) for f in (names + " keepcost").split()]
            libc.mallinfo2.restype = Info
            libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            libc.free.argtypes = [ctypes.c_void_p]
            before = libc.mallinfo2().hblks
            block = libc.malloc(31 << 20)
            print(libc.mallinfo2().hblks > before)
            libc.free(block)
            """
        )
    base = {k: v for k, v in os.environ.items() if k != "FEDREC_MALLOC_TUNE"}

    def run(env: dict[str, str]) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        return out.stdout.split()

    off, on = run({**base, "FEDREC_MALLOC_TUNE": "0"}), run(base)
    assert off[:2] == ["False", "False"]
    if glibc:
        assert on == ["True", "True", "False"]  # from the heap
        assert off[2] == "True"  # mmapped
