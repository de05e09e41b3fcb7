"""The DP training view of the model: same scores as RecModel, true per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from fedrec.shared.model import candidates
from fedrec.shared.model.candidates import CandidateScorer, candidate_loss, keyed_candidates
from fedrec.shared.model.examples import right_aligned

from .test_model import ds, make_model, perturb_lora  # noqa: F401 - fixture re-export


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(model.item_texts)
    hist = [np.array([3, 7, 11]), np.array([], dtype=np.int64), np.array([5, 5, 20, 31, 2])]
    context = torch.as_tensor(right_aligned(hist, model.cfg.history_len))
    targets = torch.tensor([1, 9, 3])
    cands, _ = keyed_candidates(
        targets, context, n_items=n, negatives=12, key=seed.to_bytes(8, "little"), step=0
    )
    cands[0, 3] = 7  # a negative that is in the context: must be masked
    prof = torch.randn(3, model.dim, generator=g)
    return context, cands, prof


def _cold_history_item(model) -> None:
    """Make item 20 (in the batch's contexts) cold: its factors must not count."""
    model.warm[20] = False


# (ffa, item factors, profile factors, user map rank)
FACTORS = [
    (False, 0, False, 0),
    (True, 0, False, 0),
    (True, 4, False, 0),
    (True, 4, True, 0),
    (True, 0, False, 3),
    (False, 4, True, 5),
    (True, 0, False, -3),  # a negative rank here: the catalog-space map of rank 3
    (True, -3, False, 0),  # a negative k here: item offsets of k = 3
    (False, -4, False, 3),
]


def _umap(umap: int) -> dict:
    return {"user_map": abs(umap), "user_map_space": "catalog" if umap < 0 else "free"}


def _per_item(factors: int) -> dict:
    """Item factors of k (k > 0) or item offsets of -k (k < 0)."""
    return {"item_factors": max(factors, 0), "item_offsets": max(-factors, 0)}


def _perturb_profile_factors(model) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if model.profile_fac is not None:  # zero at init: make the profile's factor term matter
            model.profile_fac.normal_(0, 0.5, generator=g)
        if model.user_map is not None:  # likewise the user map
            model.user_map.normal_(0, 0.5, generator=g)
        if model.item_off is not None:  # and the item offsets
            model.item_off.normal_(0, 0.5, generator=g)


@pytest.mark.parametrize("ffa,factors,pfac,umap", FACTORS)
def test_candidate_scores_equal_recmodel_scores(ds, tiny_backbone, ffa, factors, pfac, umap):  # noqa: F811
    model = make_model(
        ds,
        tiny_backbone,
        id_residual=False,
        ffa=ffa,
        profile_factors=pfac,
        **_per_item(factors),
        **_umap(umap),
    )
    _perturb_profile_factors(model)
    perturb_lora(model)
    with torch.no_grad():
        model.item_bias.normal_()
        model.pos_logits.normal_()
    if factors:
        _cold_history_item(model)
        assert model.user_embeddings(model.item_embeddings(), _batch(model)[0]).shape[1] == (
            model.dim + abs(factors)
        )
    model.eval()
    context, cands, prof = _batch(model)
    scorer = CandidateScorer(model)
    got = scorer(context, cands, prof)
    with torch.no_grad():
        items = model.item_embeddings()
        users = model.user_embeddings(items, context, prof)
        full = model.scores(users, items)  # (batch, n_items)
    assert torch.allclose(got, full.gather(1, cands), atol=1e-4)
    if factors < 0:  # the offsets are in the score, and only on warm candidates
        cold = model.warm.clone()
        with torch.no_grad():
            saved = model.item_off.clone()
            model.item_off.zero_()
            plain = model.scores(model.user_embeddings(items, context, prof), items)
            model.item_off.copy_(saved)
        assert not torch.allclose(plain.gather(1, cands), got, atol=1e-3)
        c = int(cands[0, 1])
        model.warm[c] = False
        again = CandidateScorer(model)(context, cands, prof)
        model.warm.copy_(cold)
        with torch.no_grad():
            # a cold candidate loses its bias and its offset term
            off_part = float(users[0, model.dim :] @ model.item_off[c] + model.item_bias[c])
        assert abs(off_part) > 1e-3
        assert again[0, 1].item() == pytest.approx(got[0, 1].item() - off_part, abs=1e-4)
    if umap:  # the map is in the score: without it the scores differ
        with torch.no_grad():
            model.user_map.zero_()
            plain = model.scores(model.user_embeddings(items, context, prof), items)
        assert not torch.allclose(plain.gather(1, cands), got, atol=1e-3)


@pytest.mark.parametrize("ffa,factors,pfac,umap", FACTORS)
def test_opacus_per_sample_grads_equal_micro_batch_loop(
    ds,  # noqa: F811
    tiny_backbone,
    ffa,
    factors,
    pfac,
    umap,
):
    """Opacus' hooks (incl. fedrec's grad samplers) vs one backward pass per example."""
    model = make_model(
        ds,
        tiny_backbone,
        id_residual=False,
        ffa=ffa,
        profile_factors=pfac,
        **_per_item(factors),
        **_umap(umap),
    )
    _perturb_profile_factors(model)
    perturb_lora(model, seed=3)
    if factors:
        _cold_history_item(model)
    context, cands, prof = _batch(model, seed=1)
    scorer = CandidateScorer(model)
    params = [p for p in scorer.parameters() if p.requires_grad]
    names = {id(p) for p in params}
    assert id(model.item_bias) in names and id(model.lora_layer().lora_B["default"].weight) in names
    assert (id(model.lora_layer().lora_A["default"].weight) in names) is not ffa
    assert (model.item_fac is not None and id(model.item_fac) in names) is (factors > 0)
    assert (model.item_off is not None and id(model.item_off) in names) is (factors < 0)
    assert (model.profile_fac is not None and id(model.profile_fac) in names) is pfac
    assert (model.user_map is not None and id(model.user_map) in names) is bool(umap)
    reference = []
    for b in range(context.shape[0]):
        loss = candidate_loss(
            scorer(context[b : b + 1], cands[b : b + 1], prof[b : b + 1]),
            context[b : b + 1],
            cands[b : b + 1],
        )
        reference.append(torch.autograd.grad(loss, params))
    gsm = GradSampleModule(scorer, loss_reduction="sum")
    loss = candidate_loss(gsm(context, cands, prof), context, cands, reduction="sum")
    loss.backward()
    for j, p in enumerate(params):
        per_sample = p.grad_sample  # (batch, *shape)
        for b in range(context.shape[0]):
            assert torch.allclose(per_sample[b], reference[b][j], atol=1e-5, rtol=1e-4), (j, b)
    gsm._close()


@pytest.mark.parametrize("ffa,factors,pfac,umap", FACTORS)
def test_distinct_item_path_equals_the_batch_first_path(
    ds,  # noqa: F811
    tiny_backbone,
    ffa,
    factors,
    pfac,
    umap,
):
    """Without Opacus' hooks the scorer embeds the batch's distinct items once (a (U, dim)
    table, no per-example copies); with any forward hook it takes the batch-first path the
    grad samplers need. Both give the same logits and the same gradient for every trainable
    parameter, with an item repeated within and across examples and candidates flagged cold;
    and a scorer inside a GradSampleModule takes the batch-first path."""
    model = make_model(
        ds,
        tiny_backbone,
        id_residual=False,
        ffa=ffa,
        profile_factors=pfac,
        **_per_item(factors),
        **_umap(umap),
    )
    _perturb_profile_factors(model)
    _random_layer_norm(model, seed=11)
    perturb_lora(model, seed=7)
    with torch.no_grad():
        model.item_bias.normal_()
        model.pos_logits.normal_()
    if factors:
        _cold_history_item(model)
    context, cands, prof = _batch(model, seed=4)
    cands[1, 4] = cands[0, 2]  # one item in two examples
    cands[2, 5] = cands[2, 6]  # one item twice in one example
    cands[0, 6] = context[2, -1]  # a candidate that is another example's context item
    as_cold = torch.zeros_like(cands, dtype=torch.bool)
    as_cold[1, 2:5] = True
    scorer = CandidateScorer(model)
    params = [p for p in scorer.parameters() if p.requires_grad]
    seen = []
    calls = candidates.LoRAItemTower.unit

    def counted(self, u):
        seen.append(u.shape)
        return calls(self, u)

    out = []
    for hooked in (False, True):
        handle = scorer.register_forward_hook(lambda *a: None) if hooked else None
        seen.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(candidates.LoRAItemTower, "unit", counted)
            logits = scorer(context, cands, prof, as_cold)
        assert (len(seen) == 1) is not hooked  # the distinct path ran, or did not
        loss = candidate_loss(logits, context, cands, reduction="sum")
        out.append((logits.detach(), torch.autograd.grad(loss, params)))
        if handle is not None:
            handle.remove()
    (l0, g0), (l1, g1) = out
    assert torch.allclose(l0, l1, atol=1e-5)
    for j, (a, b) in enumerate(zip(g0, g1, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), j
    assert any(a.abs().max() > 0 for a in g0)
    gsm = GradSampleModule(scorer, loss_reduction="sum")
    seen.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(candidates.LoRAItemTower, "unit", counted)
        gsm(context, cands, prof, as_cold)
    gsm._close()
    assert seen == []  # under Opacus: never the distinct path


def _random_layer_norm(model, seed: int) -> None:
    """Give the LayerNorm after the adapter a random scale and shift (a fresh tiny backbone
    has 1 and 0, under which a missing or misplaced scale would go unseen)."""
    from fedrec.shared.model.catalog_cache import adapter_site

    norm = adapter_site(model.backbone.base_model.model).norm
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=g))


def test_round_start_catalog_gives_the_same_vectors_and_gradients(
    ds,  # noqa: F811
    tiny_backbone,
    monkeypatch,
):
    """The catalog's forward at a round's start B (built once BUILD_AFTER clients started from
    that B in this process) gives the same unit vectors and the same gradient of B as the
    token-level graph, and the scorer with it the same logits and gradients of every
    parameter as the batch-first path; it is not built before, and not used once B moved."""
    monkeypatch.setattr(candidates, "BUILD_AFTER", 3)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    _random_layer_norm(model, seed=10)
    perturb_lora(model, seed=8)
    with torch.no_grad():
        model.item_bias.normal_()
        model.pos_logits.normal_()
    scorer = CandidateScorer(model)
    tower = scorer.tower
    assert tower is not None and float(tower.ln_weight.std()) > 0.1
    g = torch.Generator().manual_seed(9)
    u = torch.tensor([0, 2, 3, 7, 11, 20])
    upstream = torch.randn(u.shape[0], model.dim, generator=g)
    context, cands, prof = _batch(model, seed=5)
    params = [p for p in scorer.parameters() if p.requires_grad]

    def vectors_and_grad():
        tower.weight.grad = None
        e = tower.unit(u)
        (e * upstream).sum().backward()
        return e.detach(), tower.weight.grad.clone()

    def scorer_logits_and_grads(hooked: bool):
        handle = scorer.register_forward_hook(lambda *a: None) if hooked else None
        logits = scorer(context, cands, prof)
        if handle is not None:
            handle.remove()
        loss = candidate_loss(logits, context, cands, reduction="sum")
        return logits.detach(), torch.autograd.grad(loss, params)

    want = vectors_and_grad()
    batch_first = scorer_logits_and_grads(hooked=True)
    for _ in range(2):
        tower.start_round()
        assert tower._at_start is None  # fewer than BUILD_AFTER clients at this B: not built
    tower.start_round()
    assert tower._at_start is not None  # the third: the catalog at B
    built = candidates._FromCatalog.apply
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(candidates._FromCatalog, "apply", lambda *a: calls.append(1) or built(*a))
        got = vectors_and_grad()
        assert calls == [1]
        assert torch.allclose(got[0], want[0], atol=1e-6)
        assert want[1].abs().max() > 0
        assert torch.allclose(got[1], want[1], atol=1e-6, rtol=1e-4)
        logits, grads = scorer_logits_and_grads(hooked=False)
        assert calls == [1, 1]  # the scorer's distinct path read the catalog
        assert torch.allclose(logits, batch_first[0], atol=1e-5)
        for j, (a, b) in enumerate(zip(grads, batch_first[1], strict=True)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), j
        with torch.no_grad():
            # a local step moved B: the token-level graph again
            tower.weight.add_(torch.randn(tower.weight.shape, generator=g))
        moved = vectors_and_grad()
        assert calls == [1, 1]
    assert not torch.allclose(moved[0], want[0], atol=1e-3)
    tower.start_round()  # a new B: the old catalog is dropped, counting starts again
    assert tower._at_start is None and tower._seen == 1


@pytest.mark.parametrize("dp", [True, False])
def test_round_start_catalog_only_without_local_dp_and_never_for_fedavg_lora(
    ds,  # noqa: F811
    tiny_backbone,
    monkeypatch,
    dp,
):
    """A client round asks for the round-start catalog only without local DP-SGD (whose
    scorer runs under Opacus' hooks and never reads it); FedAvg-LoRA (A trains) never builds
    it."""
    from fedrec.client.budget import MemoryStore
    from fedrec.client.local_train import train_round

    from .test_dp_training import _cfg, _data

    monkeypatch.setattr(candidates, "BUILD_AFTER", 1)
    fedavg = CandidateScorer(make_model(ds, tiny_backbone, id_residual=False, ffa=False)).tower
    assert fedavg is not None
    fedavg.start_round()
    assert fedavg._at_start is None
    starts: list[int] = []
    monkeypatch.setattr(candidates.LoRAItemTower, "start_round", lambda self: starts.append(1))
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    extra = {} if dp else {"dp": False, "epsilon": 8.0}
    cfg = _cfg(backbone=str(tiny_backbone), local_steps=2, **extra)
    res = train_round(CandidateScorer(model), _data(ds), cfg, MemoryStore(), seed=0)
    assert res.trained
    assert starts == ([] if dp else [1])


def test_candidate_loss_masks_collisions():
    logits = torch.zeros(1, 4)
    context = torch.tensor([[5, -1]])
    cands = torch.tensor([[2, 5, 2, 9]])  # 5 in context, 2 repeats the target
    loss = candidate_loss(logits, context, cands)
    assert loss.item() == pytest.approx(np.log(2.0))  # target vs item 9 only


def _tower_vs_token(model, context, cands, prof, forget_forward=False):
    """Logits and per-example gradients of the trainable LoRA matrices, tower then token path."""
    lora = model.lora_layer()
    weights = [lora.lora_B["default"].weight, lora.lora_A["default"].weight]
    weights = [w for w in weights if w.requires_grad]
    out = []
    for tower in (True, False):
        scorer = CandidateScorer(model, tower=tower)
        assert (scorer.tower is not None) is tower
        if tower and forget_forward:  # the grad sampler then recomputes the forward's state
            forward = scorer.tower.forward

            def forgetful(items, _forward=forward, _tower=scorer.tower):
                e = _forward(items)
                _tower._saved = None
                return e

            scorer.tower.forward = forgetful
        gsm = GradSampleModule(scorer, loss_reduction="mean")
        logits = gsm(context, cands, prof)
        candidate_loss(logits, context, cands).backward()
        out.append((logits.detach(), [w.grad_sample.clone() for w in weights]))
        gsm._close()
        for p in scorer.parameters():
            p.grad_sample = None
            p.grad = None
    return weights, out


@pytest.mark.parametrize("ffa", [True, False])
def test_catalog_tower_equals_the_token_path(ds, tiny_backbone, ffa):  # noqa: F811
    """The catalog tower (closed-form per-example gradients of B, and of A with FedAvg-LoRA)
    against the token path (Opacus' own Linear sampler) on the same batch: same logits, same
    per-example gradients, with an item repeated within an example and across examples."""
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=ffa)
    perturb_lora(model, seed=5)
    context, cands, prof = _batch(model, seed=2)
    cands[1, 4] = cands[0, 2]  # one item in two examples
    cands[2, 5] = cands[2, 6]  # one item twice in one example
    weights, [(logits_t, grads_t), (logits_p, grads_p)] = _tower_vs_token(
        model, context, cands, prof
    )
    assert len(weights) == (1 if ffa else 2)
    assert torch.allclose(logits_t, logits_p, atol=1e-5)
    for w, gt, gp in zip(weights, grads_t, grads_p, strict=True):
        assert gt.shape == (context.shape[0], *w.shape)
        assert gt.abs().max() > 0
        assert torch.allclose(gt, gp, atol=1e-6, rtol=1e-4)


def test_catalog_tower_recomputes_when_the_forward_is_not_saved(
    ds,  # noqa: F811
    tiny_backbone,
    monkeypatch,
):
    """The grad sampler's fallback (no saved forward for these items and weights) gives the same
    per-example gradients as the token path; dA gathered one example at a time."""
    monkeypatch.setattr(candidates, "_CHUNK_FLOATS", 1)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=False)
    perturb_lora(model, seed=6)
    context, cands, prof = _batch(model, seed=3)
    _, [(_, grads_t), (_, grads_p)] = _tower_vs_token(
        model, context, cands, prof, forget_forward=True
    )
    for gt, gp in zip(grads_t, grads_p, strict=True):
        assert torch.allclose(gt, gp, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("tower", [True, False])
def test_id_table_scores_and_gradients_equal_recmodel(ds, tiny_backbone, tower):  # noqa: F811
    """With an ID table (federated training without DP): the scorer's logits, with some
    candidates flagged cold, and its gradients for the table and B equal RecModel's."""
    model = make_model(ds, tiny_backbone, id_residual=True, ffa=True)
    perturb_lora(model, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.id_emb.normal_(generator=g)
        model.item_bias.normal_(generator=g)
        model.warm[:5] = False  # cold items: text only, no residual, no bias
    context, cands, prof = _batch(model, seed=6)
    cands[1, 2] = 0  # a cold item among the candidates
    as_cold = torch.zeros_like(cands, dtype=torch.bool)
    as_cold[0, 1:4] = True  # dropout-flagged candidates: text only for them
    scorer = CandidateScorer(model, tower=tower)
    assert scorer.id_emb is model.id_emb
    got = scorer(context, cands, prof, as_cold)
    loss = candidate_loss(got, context, cands)
    grads = torch.autograd.grad(loss, [model.id_emb, model.lora_layer().lora_B["default"].weight])

    text = model.text_embeddings()
    items = model.item_embeddings(text)
    users = model.user_embeddings(items, context, prof)
    rows = []
    for b in range(cands.shape[0]):
        flags = torch.zeros(len(model.item_texts), dtype=torch.bool)
        flags[cands[b][as_cold[b]]] = True
        cand = model.candidate_embeddings(text, items, flags)
        rows.append(model.scores(users[b : b + 1], cand, flags)[0, cands[b]])
    want = torch.stack(rows)
    assert torch.allclose(got, want, atol=1e-4)
    want_grads = torch.autograd.grad(
        candidate_loss(want, context, cands),
        [model.id_emb, model.lora_layer().lora_B["default"].weight],
    )
    for a, b in zip(grads, want_grads, strict=True):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert grads[0][:5].abs().max() == 0  # cold rows get no gradient


def test_shared_negatives_are_one_data_independent_set_per_step():
    """One negative set per (key, step), whatever the batch holds; the target in column 0;
    each target's cold flag a function of that target (not of its position in the batch)."""
    from fedrec.shared.model.candidates import shared_candidates

    kw = dict(n_items=500, negatives=40, key=b"k" * 32, cold_dropout=0.5)
    a, ca = shared_candidates(torch.tensor([3, 9, 4]), step=2, **kw)
    b, cb = shared_candidates(torch.tensor([7, 3]), step=2, **kw)
    assert a.shape == (3, 41) and b.shape == (2, 41)
    assert torch.equal(a[:, 0], torch.tensor([3, 9, 4]))
    assert all(torch.equal(a[i, 1:], b[0, 1:]) for i in range(3))  # one set, data-independent
    assert torch.equal(ca[:, 1:], cb[:1, 1:].expand(3, -1))
    assert ca[0, 0] == cb[1, 0]  # target 3's flag, at rows 0 and 1
    c, _ = shared_candidates(torch.tensor([3]), step=3, **kw)
    d, _ = shared_candidates(torch.tensor([3]), step=2, **{**kw, "key": b"j" * 32})
    assert not torch.equal(c[0, 1:], a[0, 1:]) and not torch.equal(d[0, 1:], a[0, 1:])
    flags = torch.cat([shared_candidates(torch.arange(400), step=s, **kw)[1] for s in range(5)])
    assert 0.4 < flags.float().mean() < 0.6  # the configured rate
    # uniform over the catalog: many steps cover it
    seen = torch.cat(
        [shared_candidates(torch.tensor([0]), step=s, **kw)[0][0, 1:] for s in range(200)]
    )
    assert seen.unique().numel() > 490


def test_shared_negatives_touch_fewer_items_and_mask_collisions():
    from fedrec.shared.model.candidates import shared_candidates

    targets = torch.arange(16)
    context = torch.full((16, 4), -1)
    keyed, _ = keyed_candidates(targets, context, n_items=1000, negatives=50, key=b"k", step=0)
    shared, _ = shared_candidates(targets, n_items=1000, negatives=50, key=b"k", step=0)
    assert shared.unique().numel() <= 66 < keyed.unique().numel()
    # a shared negative equal to an example's target or context item is masked for that example
    context[0, -1] = int(shared[0, 1])
    shared[2, 0] = shared[2, 5]  # example 2's target is one of the shared negatives
    logits = torch.zeros(16, 51)
    masked = candidate_loss(logits, context, shared, reduction="none")
    assert masked[0] < masked[1]  # one fewer competitor for example 0 (a context item)
    assert masked[2] < masked[1]  # and for example 2 (its own target among the negatives)


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
def test_low_rank_product_gradients_are_autograds(needs):
    """The LoRA product with the reordered weight gradient: same value and gradients as
    ``scale * a @ w.T`` by plain autograd (gradcheck in float64, and against autograd)."""
    from fedrec.shared.model.candidates import low_rank_product

    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 5, generator=g, dtype=torch.float64, requires_grad=needs[0])
    w = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=needs[1])
    assert torch.autograd.gradcheck(lambda a_, w_: low_rank_product(a_, w_, 0.7), (a, w))
    out = torch.randn(37, 11, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(
        (low_rank_product(a, w, 0.7) * out).sum(), [t for t in (a, w) if t.requires_grad]
    )
    ref = torch.autograd.grad((0.7 * (a @ w.T) * out).sum(), [t for t in (a, w) if t.requires_grad])
    for x, y in zip(ours, ref, strict=True):
        assert torch.allclose(x, y, atol=1e-12)
