"""The LoRA recommender: cached path == plain path, losses, examples, training, FFA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.shared.backbone import load_backbone
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.model.central import ModelScorer, ProfileBank, example_loss, train_central
from fedrec.shared.model.config import ModelConfig, TrainConfig, from_dict
from fedrec.shared.model.examples import right_aligned, sequence_examples, set_examples
from fedrec.shared.model.towers import RecModel, mean_pool
from fedrec.shared.splitting import protocol_a

from .test_baselines import Popularity


@pytest.fixture(scope="module")
def ds(synth_dir):
    return load_dataset(synth_dir)


def make_model(ds, tiny_backbone, **kw) -> RecModel:
    base, tok = load_backbone(tiny_backbone)
    cfg = ModelConfig(backbone=str(tiny_backbone), max_length=16, history_len=8, **kw)
    sp = protocol_a(ds)
    return RecModel(base, tok, ds.item_texts(), cfg, warm_items=np.unique(sp.train_item))


def perturb_lora(model: RecModel, seed: int = 0) -> None:
    """Move LoRA B (all zeros at init) and, unless A is frozen (FFA-LoRA, whose catalog cache
    holds A(x) for the A it was built with), A as well."""
    g = torch.Generator().manual_seed(seed)
    lora = model.lora_layer()
    with torch.no_grad():
        for p in (lora.lora_A["default"].weight, lora.lora_B["default"].weight):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["tiny_backbone", "tiny_llama"])
def test_cached_item_tower_equals_full_peft_forward(ds, family, request):
    model = make_model(ds, request.getfixturevalue(family))
    perturb_lora(model)  # B is zero at init: make the adapter matter
    model.eval()  # the plain path's dropout off; the cached path never has dropout
    cached = model.text_embeddings()
    plain = model.encode_texts(model.item_texts)
    assert torch.allclose(cached, plain, atol=1e-5)
    # and the adapter really changes the output
    with model.backbone.disable_adapter():
        frozen = model.encode_texts(model.item_texts)
    assert (frozen - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["tiny_backbone", "tiny_llama"])
def test_cached_path_gradients_equal_plain_path(ds, family, request):
    model = make_model(ds, request.getfixturevalue(family))
    perturb_lora(model, seed=1)
    model.eval()
    target = torch.randn(
        len(model.item_texts), model.dim, generator=torch.Generator().manual_seed(2)
    )
    params = model.adapter_parameters()
    grads = []
    for path in ("cached", "plain"):
        emb = model.text_embeddings() if path == "cached" else model.encode_texts(model.item_texts)
        loss = ((emb - target) ** 2).mean()
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]]))[0, 0] == 2.0


def test_sequence_examples_hand_built():
    users, targets, ctx = sequence_examples([np.array([5, 6, 7]), np.array([9])], history_len=2)
    assert users.tolist() == [0, 0, 0, 1] and targets.tolist() == [5, 6, 7, 9]
    assert ctx.tolist() == [[-1, -1], [-1, 5], [5, 6], [-1, -1]]
    assert right_aligned([np.array([1, 2, 3])], 5).tolist() == [[-1, -1, 1, 2, 3]]


def test_set_examples_draw_other_items_of_any_size_in_time_order():
    seqs = [np.arange(100, 130), np.array([7, 8]), np.array([9])]
    users, targets, ctx = set_examples(seqs, history_len=10, rng=np.random.default_rng(0))
    assert users.tolist() == [0] * 30 + [1, 1, 2] and targets.tolist()[-3:] == [7, 8, 9]
    sizes = (ctx >= 0).sum(1)
    for row in range(30):
        c = ctx[row][ctx[row] >= 0]
        assert targets[row] not in c  # never its own target
        assert np.all(np.diff(c) > 0)  # time order (seq 0 increases with time)
        assert np.all(ctx[row][: 10 - c.size] == -1)  # right-aligned
    assert sizes[:30].min() == 0 and sizes[:30].max() == 10  # 0..min(L, n-1) are drawn
    assert set(ctx[30][ctx[30] >= 0]) <= {8} and sizes[32] == 0  # a one-item user: no context
    # later items appear in contexts too (not only the items before the target)
    assert any(np.any(ctx[r][ctx[r] >= 0] > targets[r]) for r in range(30))
    again = set_examples(seqs, history_len=10, rng=np.random.default_rng(0))
    assert np.array_equal(again[2], ctx)  # a seeded generator reproduces them
    few = set_examples(seqs, history_len=10, rng=np.random.default_rng(1), max_context=3)[2]
    assert (few >= 0).sum(1).max() == 3  # contexts of 0..3 items: a new user's regime


def test_additive_tower_keeps_length_so_bias_leads_short_histories(ds, tiny_backbone):
    model = make_model(ds, tiny_backbone, user_tower="additive")
    with torch.no_grad():
        model.profile_gate.fill_(0.1)
        items = model.item_embeddings()
        none = torch.full((1, 8), -1)
        assert torch.all(model.user_embeddings(items, none) == 0)  # ranks by bias alone
        prof = torch.randn(1, model.dim) * 7
        u = model.user_embeddings(items, none, prof)
        assert torch.allclose(u.norm(), torch.tensor(0.1), atol=1e-6)  # gate * unit profile
        two = torch.tensor([[-1] * 6 + [3, 4]])
        full = torch.arange(8).unsqueeze(0)
        w = model.history_weights(two >= 0)  # zero position logits: 1/8 per slot present
        assert torch.allclose(w, torch.tensor([[0.0] * 6 + [0.125, 0.125]]))
        assert torch.allclose(model.user_embeddings(items, two), (items[3] + items[4]) / 8)
        assert model.user_embeddings(items, two).norm() < model.user_embeddings(items, full).norm()
    recency = make_model(ds, tiny_backbone)
    with torch.no_grad():
        assert torch.allclose(recency.user_embeddings(items, two).norm(), torch.tensor(1.0))


def test_candidate_scorer_refuses_the_additive_tower(ds, tiny_backbone):
    from fedrec.shared.model.candidates import CandidateScorer

    model = make_model(ds, tiny_backbone, user_tower="additive", id_residual=False)
    with pytest.raises(ValueError, match="recency user tower only"):
        CandidateScorer(model)


def test_example_loss_is_per_example_and_masks_context(ds, tiny_backbone):
    model = make_model(ds, tiny_backbone)
    model.eval()
    with torch.no_grad():
        items = model.item_embeddings()
        ctx = torch.tensor([[-1, -1, -1, -1, -1, -1, 3, 4], [-1] * 8])
        targets = torch.tensor([7, 3])
        per = example_loss(model, items, ctx, targets, None, reduction="none")
        # reference: softmax over all items but the context (3, 4) for row 0
        u = model.user_embeddings(items, ctx[:1])
        logits = model.scores(u, items)[0]
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep[[3, 4]] = False
        ref = -(logits[7] - torch.logsumexp(logits[keep], 0))
        assert torch.allclose(per[0], ref, atol=1e-5)
        # the user's other items (positives) leave the softmax too; the target stays
        pos = torch.zeros(2, len(model.item_texts), dtype=torch.bool)
        pos[0, [5, 6, 7]] = True
        masked = example_loss(model, items, ctx, targets, None, reduction="none", positives=pos)
        keep[[5, 6]] = False
        assert torch.allclose(masked[0], -(logits[7] - torch.logsumexp(logits[keep], 0)), atol=1e-5)
        assert torch.allclose(masked[1], per[1])
        # one example's loss does not depend on the other examples in the batch
        alone = example_loss(model, items, ctx[1:], targets[1:], None, reduction="none")
        assert torch.allclose(per[1], alone[0], atol=1e-6)


def test_a_fixed_log_prior_offset_enters_the_loss_and_the_scores(ds, tiny_backbone):
    model = make_model(ds, tiny_backbone)
    model.eval()
    n = len(model.item_texts)
    rng = np.random.default_rng(0)
    prior = np.log(rng.dirichlet(np.ones(n), size=3)).astype(np.float32)  # per user index
    with torch.no_grad():
        items = model.item_embeddings()
        ctx = torch.tensor([[-1, -1, -1, -1, -1, -1, 3, 4], [-1] * 8])
        targets = torch.tensor([7, 3])
        users = np.array([2, 0])
        off = torch.from_numpy(prior[users])
        got = example_loss(model, items, ctx, targets, None, reduction="none", offset=off)
        logits = model.scores(model.user_embeddings(items, ctx), items) + off
        logits[0, [3, 4]] = -torch.inf
        assert torch.allclose(got, torch.nn.functional.cross_entropy(logits, targets,
                              reduction="none"), atol=1e-5)  # fmt: skip
        plain = example_loss(model, items, ctx, targets, None, reduction="none")
        assert not torch.allclose(got, plain)
    bank = ProfileBank(model)
    hist = [np.array([3, 4]), np.array([], dtype=np.int64)]
    args = (users, hist, [None, None], np.zeros(2, dtype=bool))
    with_prior = ModelScorer(model, bank, lambda us: prior[us]).score(*args)
    without = ModelScorer(model, bank).score(*args)
    assert np.allclose(with_prior - without, prior[users], atol=1e-5)


def test_empty_history_and_no_profile_rank_by_bias(ds, tiny_backbone):
    model = make_model(ds, tiny_backbone)
    with torch.no_grad():
        model.item_bias.copy_(torch.arange(len(model.item_texts), dtype=torch.float))
        items = model.item_embeddings()
        u = model.user_embeddings(items, torch.full((1, 8), -1))
        assert torch.all(u == 0)
        s = model.scores(u, items)[0]
    warm = model.warm.nonzero().squeeze(1)
    assert torch.equal(torch.argsort(-s[warm]), torch.argsort(-warm.float()))


def test_ffa_trains_only_b(ds, tiny_backbone):
    model = make_model(ds, tiny_backbone, ffa=True)
    params = model.adapter_parameters()
    assert [tuple(p.shape) for p in params] == [
        tuple(model.lora_layer().lora_B["default"].weight.shape)
    ]
    other = make_model(ds, tiny_backbone, ffa=True)  # same seed: the same frozen A everywhere
    assert torch.equal(
        model.lora_layer().lora_A["default"].weight, other.lora_layer().lora_A["default"].weight
    )


def test_frozen_encoding_keeps_ffa_a_frozen(ds, tiny_backbone):
    """PEFT's disable_adapter() re-marks the adapter trainable on exit; A must stay frozen."""
    model = make_model(ds, tiny_backbone, ffa=True)
    model.encode_texts(["a profile text"], adapted=False)
    assert not model.lora_layer().lora_A["default"].weight.requires_grad
    assert model.lora_layer().lora_B["default"].weight.requires_grad


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown key 'lora_rank'"):
        from_dict(ModelConfig, {"lora_rank": 4})
    with pytest.raises(ValueError, match="lora_r"):
        from_dict(ModelConfig, {"lora_r": "0"})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="user_tower.*recency or additive"):
        from_dict(ModelConfig, {"user_tower": "attention"})
    with pytest.raises(ValueError, match="examples.*sequence or set"):
        from_dict(TrainConfig, {"examples": "sets"})
    assert from_dict(ModelConfig, {"ffa": "true", "lora-r": "4"}).lora_r == 4


def test_training_learns_and_beats_popularity(ds, tiny_backbone):
    torch.manual_seed(0)
    model = make_model(ds, tiny_backbone)
    sp = protocol_a(ds)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    profiles = [ds.user_text(int(u)) for u in sp.user_ids]
    trace = train_central(model, sp, profiles, TrainConfig(epochs=6, batch_size=64, patience=6))
    lora_b = "backbone.base_model.model.encoder.layer.1.output.dense.lora_B.default.weight"
    assert not torch.equal(before[lora_b], model.get_parameter(lora_b))
    losses = [e["loss"] for e in trace["epochs"]]
    assert losses[-1] < losses[0]
    test = sp.tests["test"]
    ours = evaluate(ModelScorer(model, ProfileBank(model)), test, ks=(10,))["NDCG@10"]
    pop = evaluate(Popularity(sp), test, ks=(10,))["NDCG@10"]
    assert ours > pop


def test_user_map_travels_its_learned_half_only_and_starts_as_the_plain_tower(ds, tiny_backbone):
    """The user map's Q travels as ``head.user_map`` (dim, r); its basis P is rebuilt from the
    seed (the same on every side) and never travels; at init (Q = 0) the user vectors are the
    plain tower's; the run config's ``user-map`` reaches the model and is range-checked."""
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.federation.params import travelling_state

    model = make_model(ds, tiny_backbone, ffa=True, user_map=3)
    state = travelling_state(model)
    assert state["head.user_map"].shape == (model.dim, 3)
    assert not any("basis" in k for k in state)
    twin = make_model(ds, tiny_backbone, ffa=True, user_map=3)
    assert torch.equal(twin.user_map_basis, model.user_map_basis)
    plain = make_model(ds, tiny_backbone, ffa=True)
    ctx = torch.as_tensor(right_aligned([np.array([1, 4, 9]), np.array([2])], 8))
    with torch.no_grad():
        items = plain.item_embeddings()
        assert torch.allclose(
            model.user_embeddings(items, ctx, None), plain.user_embeddings(items, ctx, None)
        )
        model.user_map.normal_()
        assert not torch.allclose(
            model.user_embeddings(items, ctx, None), plain.user_embeddings(items, ctx, None)
        )
    assert FedConfig(user_map=5).model_config().user_map == 5
    assert FedConfig(user_map=5, lr=3.0).map_lr() == 3.0
    assert FedConfig(user_map=5, lr=3.0, lr_map=0.5).map_lr() == 0.5
    with pytest.warns(UserWarning, match="lr-map"):
        FedConfig(lr_map=0.5)
    with pytest.raises(ValueError, match="lr-map"):
        FedConfig(user_map=5, lr_map=-1.0)
    with pytest.raises(ValueError, match="user-map"):
        FedConfig(user_map=-1)
    with pytest.raises(ValueError, match="user_map"):
        ModelConfig(user_map=2000)


def test_catalog_user_map_basis_is_the_catalogs_principal_directions(ds, tiny_backbone):
    """``user_map_space=catalog``: P is orthonormal, the catalog embeddings' top principal
    directions (more of their energy than any other r directions: checked against random
    ones), the same from the catalog cache and from plain backbone passes (a loaded model),
    and only the r x r map travels."""
    from fedrec.shared.federation.params import travelling_state

    model = make_model(ds, tiny_backbone, ffa=True, user_map=3, user_map_space="catalog")
    p = model.user_map_basis
    assert p.shape == (model.dim, 3)
    assert torch.allclose(p.T @ p, torch.eye(3), atol=1e-5)
    e = torch.nn.functional.normalize(model.text_embeddings(), dim=-1)
    rand, _ = torch.linalg.qr(torch.randn(model.dim, 3, generator=torch.Generator().manual_seed(0)))
    assert float((e @ p).norm()) > float((e @ rand).norm())
    assert float((e @ p).norm()) >= float((e @ torch.linalg.svd(e)[2][:3].T).norm()) - 1e-4
    base, tok = load_backbone(tiny_backbone)
    plain = RecModel(base, tok, ds.item_texts(), model.cfg, with_cache=False)
    assert torch.allclose(plain.user_map_basis, p, atol=1e-4)
    assert travelling_state(model)["head.user_map"].shape == (3, 3)


@pytest.mark.parametrize("ffa", [False, True])
def test_travelling_state_is_pefts_and_loads_strictly(ds, tiny_backbone, ffa):
    """The adapter tensors that travel are exactly PEFT's state dict (A only when it trains);
    loading writes them into the model and refuses a missing/extra key or a wrong shape."""
    from peft import get_peft_model_state_dict

    from fedrec.shared.federation.params import UpdateError, load_travelling, travelling_state

    model = make_model(ds, tiny_backbone, ffa=ffa)
    perturb_lora(model, seed=5)
    state = travelling_state(model)
    peft = get_peft_model_state_dict(model.backbone)
    adapter = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert set(adapter) == {k for k in peft if not (ffa and ".lora_A." in k)}
    assert all(torch.equal(adapter[k], peft[k]) for k in adapter)
    other = make_model(ds, tiny_backbone, ffa=ffa)
    load_travelling(other, state)
    got = travelling_state(other)
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert torch.equal(get_peft_model_state_dict(other.backbone)[next(iter(adapter))],
                       adapter[next(iter(adapter))])  # fmt: skip
    key = next(iter(adapter))
    for bad in (
        {k: v for k, v in state.items() if k != key},
        {**state, "head.nope": torch.zeros(1)},
        {**state, key: torch.zeros(3, 3)},
    ):
        with pytest.raises(UpdateError):
            load_travelling(other, bad)


def test_item_offsets_travel_start_at_zero_and_learn_from_the_first_step(ds, tiny_backbone):
    """Item offsets travel as ``head.item_off`` (n_items, k), their basis never does; at init
    (zero) the scores are the plain model's; one SGD step on a batch moves the target's row
    (the term is linear in the table, unlike item factors at a zero init); the run config's
    ``item-offsets`` and ``lr-offsets`` reach the model and the optimizer and are checked."""
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.federation.params import travelling_state
    from fedrec.shared.model.candidates import CandidateScorer, candidate_loss

    model = make_model(ds, tiny_backbone, ffa=True, item_offsets=3)
    state = travelling_state(model)
    assert state["head.item_off"].shape == (len(model.item_texts), 3)
    assert not any("basis" in k for k in state)
    basis = model.offset_basis
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)  # orthonormal
    plain = make_model(ds, tiny_backbone, ffa=True)
    ctx = torch.as_tensor(right_aligned([np.array([1, 4, 9]), np.array([2])], 8))
    with torch.no_grad():
        items = plain.item_embeddings()
        got = model.scores(model.user_embeddings(items, ctx, None), items)
        ref = plain.scores(plain.user_embeddings(items, ctx, None), items)
    assert torch.allclose(got, ref, atol=1e-5)
    target = int(np.flatnonzero(model.warm.numpy())[3])
    scorer = CandidateScorer(model)
    cands = torch.tensor([[target, 5, 6, 7], [target, 8, 10, 11]])
    loss = candidate_loss(scorer(ctx, cands), ctx, cands)
    loss.backward()
    grad = model.item_off.grad
    assert grad[target].norm() > 0  # the first step already moves the target's row
    untouched = [i for i in range(len(model.item_texts)) if i not in set(cands.flatten().tolist())]
    assert float(grad[untouched].abs().sum()) == 0.0
    assert FedConfig(item_offsets=4).model_config().item_offsets == 4
    assert FedConfig(item_offsets=4, lr=3.0).offsets_lr() == 3.0
    assert FedConfig(item_offsets=4, lr=3.0, lr_offsets=64.0).offsets_lr() == 64.0
    with pytest.warns(UserWarning, match="lr-offsets"):
        FedConfig(lr_offsets=0.5)
    with pytest.raises(ValueError, match="lr-offsets"):
        FedConfig(item_offsets=4, lr_offsets=-1.0)
    with pytest.raises(ValueError, match="item-offsets"):
        FedConfig(item_offsets=65)
    with pytest.raises(ValueError, match="item-offsets"):
        FedConfig(item_offsets=4, item_factors=4)
    with pytest.raises(ValueError, match="item_offsets"):
        ModelConfig(item_offsets=2, item_factors=2)


def test_context_factors_make_the_history_side_its_own_table(ds, tiny_backbone):
    from fedrec.shared.model.candidates import CandidateScorer

    with pytest.raises(ValueError, match="factor_context"):
        ModelConfig(factor_context=True)
    sym = make_model(ds, tiny_backbone, item_factors=4)
    asym = make_model(ds, tiny_backbone, item_factors=4, factor_context=True)
    assert sym.item_fac_ctx is None and asym.item_fac_ctx is not None
    assert torch.equal(sym.item_fac, asym.item_fac)  # the same seeded target table
    assert not torch.equal(asym.item_fac_ctx, asym.item_fac)
    warm = asym.warm.nonzero().squeeze(1)[:3].tolist()
    hist = torch.tensor([[-1] * 5 + warm])
    with torch.no_grad():
        items = asym.item_embeddings()
        u = asym.user_embeddings(items, hist)
        w = asym.history_weights(hist >= 0)[0, -3:]
        expect = (w.unsqueeze(1) * asym.item_fac_ctx[warm]).sum(0)
        assert torch.allclose(u[0, -4:], expect, atol=1e-6)
        # the score's factor term pairs the context table's sum with the target table
        s = (
            asym.scores(u, items)[0]
            - asym.scores(torch.cat([u[:, :-4], 0 * u[:, -4:]], 1), items)[0]
        )
        assert torch.allclose(s[warm], (asym.item_fac[warm] @ expect), atol=1e-4)
    with pytest.raises(ValueError, match="factor_context"):
        CandidateScorer(make_model(ds, tiny_backbone, item_factors=4, factor_context=True))
    from fedrec.shared.inference import Recommender

    with pytest.raises(ValueError, match="factor_context"):  # served only when implemented
        Recommender(asym, list(range(len(asym.item_texts))), asym.item_texts)


def test_train_central_uses_each_users_own_offset_row(ds, tiny_backbone):
    """A row-constant offset cannot change a softmax (training is then the plain one, to the
    last bit of the loss); an offset that differs between users' rows does change it, and one
    that makes every example's target near-certain leaves almost no loss to train on."""
    sp = protocol_a(ds)
    profiles = [ds.user_text(int(u)) for u in sp.user_ids]
    cfg = TrainConfig(epochs=1, batch_size=32, max_steps=3, patience=1)
    n_items = len(ds.item_ids)

    def loss(offsets):  # noqa: ANN001, ANN202
        torch.manual_seed(0)
        model = make_model(ds, tiny_backbone)
        return train_central(model, sp, profiles, cfg, offsets=offsets)["epochs"][0]["loss"]

    plain = loss(None)
    shift = np.repeat(np.arange(sp.n_users, dtype=np.float32)[:, None], n_items, axis=1)
    assert abs(loss(shift) - plain) < 1e-5
    # each user's own training items strongly favoured: only right if row u is user u's
    favour = np.zeros((sp.n_users, n_items), dtype=np.float32)
    favour[sp.train_user, sp.train_item] = 30.0
    own = loss(favour)
    assert own < 0.5 * plain
    wrong = loss(np.roll(favour, 1, axis=0))  # every user given another user's row
    assert wrong > own + 1.0
