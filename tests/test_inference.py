"""The shared inference module: load a run, rank, cold start, new items, explanations, errors."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from fedrec.shared.data import load_dataset
from fedrec.shared.inference import Recommender
from fedrec.shared.model.artifacts import ModelFileError, save_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.examples import right_aligned
from fedrec.shared.splitting import protocol_a

from .test_model import make_model, perturb_lora


@pytest.fixture(scope="module")
def trained_run(synth_dir, tiny_backbone, tmp_path_factory):
    ds = load_dataset(synth_dir)
    model = make_model(ds, tiny_backbone)
    perturb_lora(model, seed=3)
    with torch.no_grad():
        model.item_bias.normal_(0, 0.3)
        model.id_emb.normal_(0, 0.1)
        model.pos_logits.copy_(torch.linspace(-1, 1, model.cfg.history_len))
    run = tmp_path_factory.mktemp("run")
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, run, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    return run, model, ds


def test_load_scores_like_the_trained_model(trained_run):
    run, model, ds = trained_run
    rec = Recommender.load(run)
    sp = protocol_a(ds)
    q = sp.tests["test"]
    ref = ModelScorer(model, ProfileBank(model)).score(
        q.users[:5], q.history[:5], [None] * 5, q.warm[:5]
    )
    for b in range(5):
        hist_ids = [int(ds.item_ids[i]) for i in q.history[b]]
        got = rec.recommend(history=hist_ids, k=5)
        s = ref[b].copy()
        s[q.history[b]] = -np.inf
        top = np.argsort(-s, kind="stable")[:5]
        assert [r.item_id for r in got] == [int(ds.item_ids[i]) for i in top]
        assert np.allclose([r.score for r in got], s[top], atol=1e-4)
    assert list((run / "index").glob("*.pt"))  # the item index is cached on disk


def test_adapter_is_standard_peft(trained_run, tiny_backbone):
    from peft import PeftModel
    from transformers import AutoModel

    run, model, _ = trained_run
    base = AutoModel.from_pretrained(tiny_backbone)
    with warnings.catch_warnings():  # peft 0.21 + transformers 5: a deprecation between the two
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        peft_model = PeftModel.from_pretrained(base, run / "adapter")
    name = "base_model.model.encoder.layer.1.output.dense.lora_B.default.weight"
    ours = model.backbone.get_parameter(name)
    assert torch.equal(peft_model.get_parameter(name), ours)


def test_explanations_decompose_the_score(trained_run):
    run, _, ds = trained_run
    rec = Recommender.load(run)
    hist = [int(i) for i in ds.item_ids[:4]]
    recs = rec.recommend(history=hist, k=3, explain=True)
    for r in recs:
        assert r.because and all(0 <= b["share"] <= 1 for b in r.because)
        assert {b["item_id"] for b in r.because if "item_id" in b} <= set(hist)
        assert sum(b["share"] for b in r.because) <= 1.0 + 1e-6
    # shares are exact fractions of |terms|: recompute one by hand
    m = rec.model
    i = rec.position[recs[0].item_id]
    ctx = torch.tensor([rec.position[h] for h in hist])
    w = torch.softmax(m.pos_logits[-len(hist) :], 0)
    parts = w.unsqueeze(1) * rec.items[ctx]
    contrib = m.log_scale.exp() * (parts @ rec.items[i]) / parts.sum(0).norm()
    assert np.isclose(float(contrib.sum() + rec.bias[i]), recs[0].score, atol=1e-4)
    top = recs[0].because[0]
    total = float(contrib.abs().sum() + rec.bias[i].abs())
    assert np.isclose(top["share"], float(contrib.abs().max()) / total, atol=2e-3)


def test_cold_start_profile_query_and_few_items(trained_run):
    run, _, ds = trained_run
    rec = Recommender.load(run)
    a = rec.cold_start(query="galaxy rocket astronaut", k=5, explain=True)
    b = rec.cold_start(query="wedding love kiss", k=5)
    assert [r.item_id for r in a] != [r.item_id for r in b]
    assert a[0].because[0]["query"] == "galaxy rocket astronaut"
    c = rec.cold_start(profile="Age 30, likes space.", history=[int(ds.item_ids[0])], k=5)
    assert int(ds.item_ids[0]) not in [r.item_id for r in c]


def test_new_items_rank_at_once_and_keep_id_order(trained_run):
    run, _, ds = trained_run
    rec = Recommender.load(run)
    new_id = int(ds.item_ids.max()) + 10
    rec.add_items({new_id: "Galaxy Rocket Astronaut Orbit. Genre: space"})
    ranked = [
        r.item_id
        for r in rec.cold_start(query="galaxy rocket astronaut orbit", k=len(rec.item_ids))
    ]
    assert new_id in ranked
    assert list(rec.item_ids) == sorted(rec.item_ids)
    rec.add_items({0: "Haunted Ghost Crypt. Genre: horror"})  # smaller than every id
    assert rec.item_ids[0] == 0 and rec.titles[0].startswith("Haunted")
    with pytest.raises(ValueError, match="already in the catalog"):
        rec.add_items({new_id: "again"})
    with pytest.raises(ValueError, match="empty"):
        rec.add_items({new_id + 1: "  "})


def test_bad_requests(trained_run):
    run, _, ds = trained_run
    rec = Recommender.load(run)
    with pytest.raises(KeyError, match="item id 99999"):
        rec.recommend(history=[99999])
    with pytest.raises(ValueError, match="non-empty history"):
        rec.recommend(history=[])
    with pytest.raises(ValueError, match="k=0"):
        rec.recommend(history=[int(ds.item_ids[0])], k=0)
    with pytest.raises(ValueError, match="profile, a query"):
        rec.cold_start()


def test_mismatched_or_missing_adapter(trained_run, tmp_path):
    run, _, _ = trained_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    cfg = json.loads((bad / "adapter" / "adapter_config.json").read_text())
    cfg["r"] = 4
    (bad / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="rank r=4"):
        Recommender.load(bad)
    meta = json.loads((bad / "model" / "model.json").read_text())
    meta["backbone_fingerprint"] = "0" * 16
    (bad / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="fingerprint"):
        Recommender.load(bad)
    with pytest.raises(ModelFileError, match="not a trained fedrec run"):
        Recommender.load(tmp_path / "nothing")


def test_batch_scores_match_single_requests(trained_run):
    run, _, ds = trained_run
    rec = Recommender.load(run)
    hists = [[int(i) for i in ds.item_ids[s : s + 3]] for s in (0, 10, 20)]
    batch = rec.score_batch(hists)
    for b, h in enumerate(hists):
        top = rec.recommend(history=h, k=5)
        s = batch[b].copy()
        s[[rec.position[i] for i in h]] = -np.inf
        assert [r.item_id for r in top] == [
            int(rec.item_ids[i]) for i in np.argsort(-s, kind="stable")[:5]
        ]
    with pytest.raises(KeyError, match="history 1"):
        rec.score_batch([[int(ds.item_ids[0])], [123456]])


def test_additive_tower_scores_and_explanations_match_the_model(synth_dir, tiny_backbone, tmp_path):
    ds = load_dataset(synth_dir)
    model = make_model(ds, tiny_backbone, user_tower="additive")
    perturb_lora(model, seed=4)
    with torch.no_grad():
        model.item_bias.normal_(0, 0.3)
        model.pos_logits.copy_(torch.linspace(-1, 1, model.cfg.history_len))
        model.profile_gate.fill_(0.2)
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, tmp_path, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    rec = Recommender.load(tmp_path)
    assert rec.model.cfg.user_tower == "additive"
    sp = protocol_a(ds)
    q = sp.tests["test"]
    bank = ProfileBank(model)
    profiles = ["Age 30, engineer.", None, "Age 61, retired."]
    for b, profile in enumerate(profiles):
        hist = q.history[b][:3]
        ref = ModelScorer(model, bank).score(q.users[b : b + 1], [hist], [profile], q.warm[:1])[0]
        got = rec.cold_start(
            profile=profile or "", history=[int(ds.item_ids[i]) for i in hist], k=4, explain=True
        )
        s = ref.copy()
        s[hist] = -np.inf
        top = np.argsort(-s, kind="stable")[:4]
        assert [r.item_id for r in got] == [int(ds.item_ids[i]) for i in top]
        assert np.allclose([r.score for r in got], s[top], atol=1e-4)
        assert all(0 <= x["share"] <= 1 for r in got for x in r.because)
    # a profile alone: the item bias, tilted by the short profile term, decides
    alone = rec.cold_start(profile="Age 30, engineer.", k=3)
    ref = ModelScorer(model, bank).score(
        q.users[:1], [np.empty(0, np.int64)], ["Age 30, engineer."], q.warm[:1]
    )[0]
    assert [r.item_id for r in alone] == [
        int(ds.item_ids[i]) for i in np.argsort(-ref, kind="stable")[:3]
    ]


@pytest.mark.parametrize("umap,space", [(0, "free"), (3, "free"), (3, "catalog")])
def test_item_factors_score_rank_and_explain_like_the_model(
    synth_dir, tiny_backbone, tmp_path, umap, space
):
    """A model with item factors (and a user map): recommend, score_batch and explanations
    match RecModel's scores, an untrained (cold) history item adds nothing, and new items get
    no factor term."""
    ds = load_dataset(synth_dir)
    model = make_model(
        ds,
        tiny_backbone,
        item_factors=4,
        factor_init=0.5,
        profile_factors=True,
        user_map=umap,
        user_map_space=space,
    )
    perturb_lora(model, seed=5)
    with torch.no_grad():
        if umap:
            model.user_map.normal_(0, 0.5)
        model.profile_fac.normal_(0, 0.5)
        model.item_bias.normal_(0, 0.3)
        model.pos_logits.copy_(torch.linspace(-1, 1, model.cfg.history_len))
    cold = int(np.flatnonzero(model.warm.numpy())[0])
    model.warm[cold] = False  # a history item the federation never trained
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, tmp_path, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    rec = Recommender.load(tmp_path)
    assert rec.fac is not None and float(rec.fac[cold].abs().sum()) == 0.0
    q = protocol_a(ds).tests["test"]
    scorer = ModelScorer(model, ProfileBank(model))
    hists = [np.concatenate([[cold], q.history[b][:4]]) for b in range(3)]
    ref = scorer.score(q.users[:3], hists, [None] * 3, q.warm[:3])
    batch = rec.score_batch([[int(ds.item_ids[i]) for i in h] for h in hists])
    assert np.allclose(batch, ref, atol=1e-4)
    for b, h in enumerate(hists):
        got = rec.recommend(history=[int(ds.item_ids[i]) for i in h], k=5, explain=True)
        s = ref[b].copy()
        s[h] = -np.inf
        top = np.argsort(-s, kind="stable")[:5]
        assert [r.item_id for r in got] == [int(ds.item_ids[i]) for i in top]
        assert np.allclose([r.score for r in got], s[top], atol=1e-4)
        assert all(0 <= x["share"] <= 1 for r in got for x in r.because)
    with torch.no_grad():
        text_only = (
            model.log_scale.exp()
            * model.user_embeddings(
                scorer.items, torch.as_tensor(right_aligned(hists[:1], model.cfg.history_len))
            )[:, : model.dim]
            @ scorer.items.T
            + model.biases()
        )
    assert not np.allclose(text_only.numpy()[0], ref[0], atol=1e-3)  # factors change scores
    # a profile (alone, and with items): its factor term as the model computes it
    for items in ([], hists[1][1:3]):
        prof = "Age 30, engineer."
        ref_p = scorer.score(q.users[:1], [np.asarray(items, np.int64)], [prof], q.warm[:1])[0]
        got = rec.cold_start(
            profile=prof, history=[int(ds.item_ids[i]) for i in items], k=4, explain=True
        )
        s = ref_p.copy()
        s[list(items)] = -np.inf
        top = np.argsort(-s, kind="stable")[:4]
        assert [r.item_id for r in got] == [int(ds.item_ids[i]) for i in top]
        assert np.allclose([r.score for r in got], s[top], atol=1e-4)
    new_id = int(ds.item_ids.max()) + 10
    rec.add_items({new_id: "Galaxy Rocket Astronaut Orbit. Genre: space"})
    assert float(rec.fac[rec.position[new_id]].abs().sum()) == 0.0
    after = rec.score_batch([[int(ds.item_ids[i]) for i in hists[0]]])[0]
    old = [rec.position[int(i)] for i in ds.item_ids]
    assert np.allclose(after[old], ref[0], atol=1e-4)  # old items' scores unchanged
    # an inserted smaller id shifts every position; a new item in a history has no factors:
    # score_batch must index its own (re-sorted) rows, and agree with recommend
    rec.add_items({int(ds.item_ids.min()) - 1: "Haunted Ghost Crypt. Genre: horror"})
    hist = [new_id, *[int(ds.item_ids[i]) for i in hists[1]]]
    batch = rec.score_batch([hist])[0]
    got = rec.recommend(history=hist, k=5)
    s = batch.copy()
    s[[rec.position[i] for i in hist]] = -np.inf
    top = np.argsort(-s, kind="stable")[:5]
    assert [r.item_id for r in got] == [int(rec.item_ids[i]) for i in top]
    assert np.allclose([r.score for r in got], s[top], atol=1e-4)


@pytest.mark.parametrize("profile", [False, True])
def test_item_offsets_score_rank_and_explain_like_the_model(
    synth_dir, tiny_backbone, tmp_path, profile
):
    """A model with item offsets: recommend, score_batch and the explanations' shares match
    RecModel's scores after a save and load (the catalog basis is rebuilt, not stored), a cold
    candidate gets no offset, and a new item gets none."""
    ds = load_dataset(synth_dir)
    model = make_model(ds, tiny_backbone, item_offsets=3, use_profile=profile)
    perturb_lora(model, seed=6)
    with torch.no_grad():
        model.item_off.normal_(0, 2.0)
        model.item_bias.normal_(0, 0.3)
        model.pos_logits.copy_(torch.linspace(-1, 1, model.cfg.history_len))
    cold = int(np.flatnonzero(model.warm.numpy())[1])
    model.warm[cold] = False
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, tmp_path, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    rec = Recommender.load(tmp_path)
    assert rec.fac is None and rec.off is not None
    assert float(rec.off[cold].abs().sum()) == 0.0 and float(model.item_off[cold].abs().sum()) > 0
    assert torch.allclose(rec.model.offset_basis, model.offset_basis, atol=1e-5)
    q = protocol_a(ds).tests["test"]
    scorer = ModelScorer(model, ProfileBank(model))
    hists = [q.history[b][:5] for b in range(3)]
    ref = scorer.score(q.users[:3], hists, [None] * 3, q.warm[:3])
    with torch.no_grad():
        items = scorer.items
        users = model.user_embeddings(
            items, torch.as_tensor(right_aligned(hists, model.cfg.history_len))
        )
        plain = model.log_scale.exp() * users[:, : model.dim] @ items.T + model.biases()
    assert not np.allclose(plain.numpy(), ref, atol=1e-2)  # the offsets change the scores
    batch = rec.score_batch([[int(ds.item_ids[i]) for i in h] for h in hists])
    assert np.allclose(batch, ref, atol=1e-4)
    for b, h in enumerate(hists):
        got = rec.recommend(history=[int(ds.item_ids[i]) for i in h], k=5, explain=True)
        s = ref[b].copy()
        s[h] = -np.inf
        top = np.argsort(-s, kind="stable")[:5]
        assert [r.item_id for r in got] == [int(ds.item_ids[i]) for i in top]
        assert np.allclose([r.score for r in got], s[top], atol=1e-4)
        assert all(0 <= x["share"] <= 1 for r in got for x in r.because)
    new_id = int(ds.item_ids.max()) + 10
    rec.add_items({new_id: "Galaxy Rocket Astronaut Orbit. Genre: space"})
    assert float(rec.off[rec.position[new_id]].abs().sum()) == 0.0
    after = rec.score_batch([[int(ds.item_ids[i]) for i in hists[0]]])[0]
    old = [rec.position[int(i)] for i in ds.item_ids]
    assert np.allclose(after[old], ref[0], atol=1e-4)
