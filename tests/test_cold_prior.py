"""The cold prior: a popularity predicted from an item's text, for items never trained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedrec.shared.data import load_dataset
from fedrec.shared.inference import Recommender
from fedrec.shared.model.artifacts import ModelFileError, load_model, save_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import (
    attach_cold_prior,
    clear_cold_prior,
    fit_text_prior,
    frozen_features,
)
from fedrec.shared.splitting import protocol_a, protocol_b
from fedrec.simulations.cold_prior import WEIGHTS

from .test_cli import fedrec
from .test_model import make_model, perturb_lora


def test_ridge_recovers_a_linear_popularity_on_items_it_never_saw():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    beta = rng.normal(size=12) * 3
    counts = np.floor(np.expm1(np.clip(x @ beta + 2 + rng.normal(0, 0.1, 400), 0, None)))
    trained = np.arange(400) < 300
    counts[~trained] = 0  # cold items have no interactions: what is known of them is their text
    truth = x @ beta + 2
    prior = fit_text_prior(x, np.log1p(counts), trained & (counts > 0))
    pred = prior.predict(x[~trained])
    fine = truth[~trained] > 1  # where the floor did not censor the target
    assert np.corrcoef(pred[fine], truth[~trained][fine])[0, 1] > 0.95
    assert prior.lam == min(prior.cv_mse, key=lambda k: prior.cv_mse[k])


def test_ridge_refuses_bad_input():
    x = np.zeros((20, 4))
    with pytest.raises(ValueError, match="same items"):
        fit_text_prior(x, np.ones(19), np.ones(19, dtype=bool))
    with pytest.raises(ValueError, match="at least 10"):
        fit_text_prior(x, np.ones(20), np.arange(20) < 5)
    with pytest.raises(ValueError, match="> 0"):
        fit_text_prior(x, np.ones(20), np.ones(20, dtype=bool), lambdas=(0.0,))


@pytest.fixture
def cold_model(synth_dir, tiny_backbone):
    """A tiny model whose last 30 % of items were never trained, with a trained-looking head."""
    ds = load_dataset(synth_dir)
    model = make_model(ds, tiny_backbone)
    n = len(ds.item_ids)
    warm = torch.arange(n) < int(0.7 * n)
    perturb_lora(model, seed=5)
    with torch.no_grad():
        model.warm.copy_(warm)
        model.item_bias.normal_(0, 0.3)
        model.id_emb.normal_(0, 0.1)
    counts = np.where(warm.numpy(), np.arange(n) % 7 + 1, 0)
    return ds, model, counts


def test_prior_moves_only_never_trained_items_centred_on_the_trained(cold_model):
    ds, model, counts = cold_model
    warm = model.warm.clone()
    before = model.biases().clone()
    feats = frozen_features(model)
    info = attach_cold_prior(model, 2.0, counts=counts, features=feats)
    after = model.biases()
    assert torch.equal(after[warm], before[warm])  # trained items untouched
    assert bool((after[~warm] != before[~warm]).all())
    # the stored linear function gives the catalog's values, and averages 0 on trained items
    lin = torch.as_tensor(feats, dtype=torch.float32) @ model.cold_prior[:-1] + model.cold_prior[-1]
    assert torch.allclose(lin[~warm], model.cold_prior_items[~warm], atol=1e-5)
    assert abs(float(lin[warm].mean())) < 1e-4
    # the weight scales it; weight 0 removes it
    prior1 = model.cold_prior_items.clone()
    attach_cold_prior(model, 1.0, counts=counts, features=feats)
    assert torch.allclose(prior1, 2 * model.cold_prior_items, atol=1e-5)
    attach_cold_prior(model, 0.0, counts=counts, features=feats)
    assert torch.equal(model.biases(), before)
    assert info["cold_items"] == int((~warm).sum()) and info["weight"] == 2.0


def test_bias_target_predicts_the_models_own_bias_for_cold_items(cold_model):
    """Without counts the prior regresses the learned item bias (post-processing): a bias that is
    a linear function of the frozen text is carried over to the cold items, uncentred."""
    _, model, _ = cold_model
    feats = frozen_features(model)
    warm = model.warm.numpy()
    rng = np.random.default_rng(1)
    beta = rng.normal(size=feats.shape[1])
    truth = feats @ beta + 0.7
    saved = model.item_bias.detach().clone()
    try:
        with torch.no_grad():
            model.item_bias.copy_(torch.as_tensor(truth * warm, dtype=torch.float32))
        info = attach_cold_prior(model, 1.0, features=feats)
        got = model.cold_prior_items.double().numpy()[~warm]
        assert np.corrcoef(got, truth[~warm])[0, 1] > 0.9
        assert abs(got.mean() - truth[~warm].mean()) < 0.5 * truth[~warm].std()  # not centred
        assert "learned item bias" in info["target"]
        assert not model.cold_prior_items[torch.as_tensor(warm)].any()
    finally:
        with torch.no_grad():
            model.item_bias.copy_(saved)
            attach_cold_prior(model, 0.0, features=feats)


def test_prior_is_fitted_without_dropout_even_right_after_training(cold_model):
    """A model fresh from training is in train mode: the frozen features must still be the
    deterministic eval-mode ones, and the stored function must reproduce the stored values."""
    _, model, counts = cold_model
    model.eval()
    attach_cold_prior(model, 1.0, counts=counts)
    want = model.cold_prior_items.clone()
    model.train()
    attach_cold_prior(model, 1.0, counts=counts)
    assert model.training  # left as it was
    assert torch.equal(model.cold_prior_items, want)
    model.eval()
    frozen = model.encode_texts(model.item_texts, adapted=False)
    cold = ~model.warm
    assert torch.allclose(model.cold_prior_of(frozen)[cold], want[cold], atol=1e-5)


def test_federation_config_needs_the_item_bias_for_a_prior():
    from fedrec.shared.federation.config import FedConfig

    with pytest.raises(ValueError, match="needs item-bias"):
        FedConfig(cold_prior=1.0, item_bias=False)
    assert FedConfig(cold_prior=1.0).cold_prior == 1.0


def test_federation_config_ties_the_prior_encoder_to_a_prior():
    from fedrec.shared.federation.config import FedConfig

    with pytest.raises(ValueError, match="cold-prior-backbone.*unless cold-prior > 0"):
        FedConfig(cold_prior_backbone="mpnet")
    assert FedConfig(cold_prior=1.0, cold_prior_backbone="mpnet").cold_prior_backbone == "mpnet"


def test_prior_on_another_encoder_is_its_ridge_and_serves_new_items_by_it(
    cold_model, tiny_backbone, tiny_wide_encoder, tmp_path
):
    """A prior read by another encoder (48 wide, the model is 32): the cold items get the ridge
    prediction from that encoder's embeddings (recomputed here), the function is stored at its
    width with its encoder, survives save and load, and a new item added at serving time is
    embedded by that encoder (its bias equals a catalog item's with the same text); clearing
    returns the model to its own width."""
    from fedrec.shared.backbone import TextEncoder

    ds, model, _ = cold_model
    warm = model.warm.numpy()
    wide = str(tiny_wide_encoder)
    info = attach_cold_prior(model, 1.0, backbone=wide)
    assert info["backbone"] == wide
    assert model.cold_prior_backbone == wide and model.cold_prior.numel() == 49
    feats = TextEncoder(wide).encode(model.item_texts)
    ridge = fit_text_prior(feats, model.item_bias.detach().double().numpy(), warm)
    want = torch.as_tensor(ridge.predict(feats) * ~warm, dtype=torch.float32)
    assert torch.allclose(model.cold_prior_items, want, atol=1e-4)
    assert model.cold_prior_items[~model.warm].abs().sum() > 0
    wide_items = model.cold_prior_items.clone()
    attach_cold_prior(model, 1.0, backbone=str(model.cfg.backbone))  # its own name: its own
    assert model.cold_prior_backbone == "" and model.cold_prior.numel() == 33
    own_items = model.cold_prior_items.clone()
    attach_cold_prior(model, 1.0, backbone=f"{tiny_backbone}/")  # its own folder, spelt otherwise
    assert model.cold_prior_backbone == "" and torch.equal(model.cold_prior_items, own_items)
    assert not torch.allclose(model.cold_prior_items, wide_items, atol=1e-3)
    attach_cold_prior(model, 1.0, backbone=wide)

    run = tmp_path / "run"
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, run, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    loaded, meta = load_model(run)
    assert meta["cold_prior_backbone"] == wide and loaded.cold_prior_backbone == wide
    assert torch.equal(loaded.cold_prior, model.cold_prior)
    assert torch.equal(loaded.cold_prior_items, model.cold_prior_items)
    rec = Recommender.load(run)
    cold = int(np.flatnonzero(~warm)[0])
    rec.add_items({10_000: ds.item_texts()[cold]})
    got = float(rec.bias[rec.position[10_000]])
    assert got == pytest.approx(float(model.cold_prior_items[cold]), abs=1e-4)

    # serving with another encoder under that name, or without it: a clear error, no wrong bias
    good = dict(meta)
    meta["cold_prior_backbone_fingerprint"] = "0" * 16
    (run / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fitted on encoder .* fingerprint"):
        Recommender.load(run).add_items({10_001: ds.item_texts()[cold]})
    meta = {**good, "cold_prior_backbone": str(tmp_path / "gone")}
    (run / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="cold prior reads the encoder"):
        Recommender.load(run).add_items({10_001: ds.item_texts()[cold]})
    meta["cold_prior_backbone"] = 7
    (run / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="'cold_prior_backbone' must be a string"):
        load_model(run)
    clear_cold_prior(model)
    assert model.cold_prior_backbone == "" and model.cold_prior.numel() == 33
    assert not model.cold_prior.any() and not model.cold_prior_items.any()
    with pytest.raises(ValueError, match="does not fit"):
        model.set_cold_prior(torch.zeros(49), model.cold_prior_items)  # 48 wide, no encoder


def test_prior_refuses_counts_of_other_items(cold_model):
    _, model, counts = cold_model
    with pytest.raises(ValueError, match="do not match"):
        attach_cold_prior(model, 1.0, counts=np.roll(counts, 1))
    with pytest.raises(ValueError, match="counts for"):
        attach_cold_prior(model, 1.0, counts=counts[:-1])
    with pytest.raises(ValueError, match="finite"):
        attach_cold_prior(model, float("nan"), counts=counts)


def test_saved_prior_scores_cold_and_new_items_in_inference(cold_model, tmp_path):
    ds, model, counts = cold_model
    attach_cold_prior(model, 1.5, counts=counts)
    run = tmp_path / "run"
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, run, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    loaded, _ = load_model(run)
    assert torch.equal(loaded.cold_prior, model.cold_prior)
    assert torch.equal(loaded.cold_prior_items, model.cold_prior_items)
    rec = Recommender.load(run)
    # a never-trained catalog item: the recommender's score is the evaluation scorer's
    q = protocol_a(ds).tests["test"]
    ref = ModelScorer(model, ProfileBank(model)).score(
        q.users[:1], q.history[:1], [None], q.warm[:1]
    )
    hist = [int(ds.item_ids[i]) for i in q.history[0]]
    cold_ids = [int(ds.item_ids[i]) for i in np.flatnonzero(~model.warm.numpy())]
    got = {r.item_id: r.score for r in rec.recommend(history=hist, k=len(ds.item_ids) - len(hist))}
    pos = {int(i): k for k, i in enumerate(ds.item_ids)}
    # the recommender carries the prior itself (not only agreement with the scorer)
    prior = model.cold_prior_items[[pos[i] for i in cold_ids]]
    assert prior.abs().sum() > 0
    assert torch.allclose(rec.bias[[rec.position[i] for i in cold_ids]], prior, atol=1e-6)
    for i in cold_ids:
        if i in got:
            assert got[i] == pytest.approx(float(ref[0, pos[i]]), abs=1e-4)
    # a new item gets the prior of its text, as a catalog item with the same text would
    text = ds.item_texts()[pos[cold_ids[0]]]
    rec.add_items({10_000: text})
    new = rec.bias[rec.position[10_000]]
    assert float(new) == pytest.approx(float(model.cold_prior_items[pos[cold_ids[0]]]), abs=1e-4)


def test_a_run_without_prior_loads_as_none_and_a_bad_one_is_refused(cold_model, tmp_path):
    ds, model, counts = cold_model
    attach_cold_prior(model, 1.0, counts=counts)
    run = tmp_path / "run"
    titles = [ds.item_fields[int(i)]["title"] for i in ds.item_ids]
    save_model(model, run, item_ids=[int(i) for i in ds.item_ids], titles=titles)
    head = load_file(str(run / "model" / "head.safetensors"))
    old = tmp_path / "old"
    shutil.copytree(run, old)
    save_file({k: v for k, v in head.items() if not k.startswith("cold_prior")},
              str(old / "model" / "head.safetensors"))  # fmt: skip
    loaded, _ = load_model(old)  # written before the prior existed
    assert not loaded.cold_prior.any() and not loaded.cold_prior_items.any()
    save_file({k: v for k, v in head.items() if k != "cold_prior_items"},
              str(old / "model" / "head.safetensors"))  # fmt: skip
    with pytest.raises(ModelFileError, match="not all of"):
        load_model(old)
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    items = head["cold_prior_items"].clone()
    items[0] = 1.0  # item 0 is trained
    save_file({**head, "cold_prior_items": items}, str(bad / "model" / "head.safetensors"))
    with pytest.raises(ModelFileError, match="non-zero on trained items"):
        load_model(bad)
    save_file({**head, "cold_prior": head["cold_prior"][:-1].contiguous()},
              str(bad / "model" / "head.safetensors"))  # fmt: skip
    with pytest.raises(ModelFileError, match="mis-shaped"):
        load_model(bad)


def test_train_central_attaches_the_prior_from_its_training_counts(
    synth_dir, tiny_backbone, tmp_path
):
    run = tmp_path / "central"
    r = fedrec(
        "train-central", "--protocol", "B", "--data", synth_dir, "--out", run, "--no-baselines",
        "--set", f"model.backbone={tiny_backbone}", "--set", "model.max_length=16",
        "--set", "train.epochs=1", "--set", "train.batch_size=64", "--set", "train.cold_prior=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    info = metrics["model"]["cold_prior"]
    ds = load_dataset(synth_dir)
    split = protocol_b(ds)
    assert info["weight"] == 1.0 and info["cold_items"] == len(split.cold_items)
    model, _ = load_model(run)
    cold = np.zeros(len(ds.item_ids), dtype=bool)
    cold[split.cold_items] = True
    assert np.array_equal(~model.warm.numpy(), cold)
    assert bool(model.cold_prior_items[torch.as_tensor(cold)].abs().sum() > 0)
    assert not bool(model.cold_prior_items[~torch.as_tensor(cold)].any())
    r = fedrec("train-central", "--data", synth_dir, "--out", tmp_path / "bad",
               "--set", "train.cold_prior=-1")  # fmt: skip
    assert r.returncode == 2 and "cold_prior" in r.stderr and "Traceback" not in r.stderr


def test_train_central_prior_on_another_encoder_scores_its_own_beside_it(
    synth_dir, tiny_backbone, tiny_wide_encoder, tmp_path
):
    """train.cold_prior_backbone: the counts' regression reads the other encoder, the saved model
    keeps it, and the same model with its own backbone's prior is scored beside it; an encoder
    that is not there fails before training, naming the setting, with nothing written."""
    run = tmp_path / "central"
    common = ["--protocol", "B", "--data", synth_dir, "--no-baselines",
              "--set", f"model.backbone={tiny_backbone}", "--set", "model.max_length=16",
              "--set", "train.epochs=1", "--set", "train.batch_size=64",
              "--set", "train.cold_prior=1"]  # fmt: skip
    r = fedrec("train-central", *common, "--out", run,
               "--set", f"train.cold_prior_backbone={tiny_wide_encoder}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "metrics.json").read_text())["model"]["cold_prior"]
    assert info["backbone"] == str(tiny_wide_encoder)
    assert info["own_backbone"]["backbone"] == str(tiny_backbone)
    assert set(info["own_backbone"]["metrics"]) == {"cold_items"}
    model, _ = load_model(run)
    assert model.cold_prior_backbone == str(tiny_wide_encoder)
    assert model.cold_prior.numel() == 48 + 1
    missing = tmp_path / "no-such-encoder"
    r = fedrec("train-central", *common, "--out", tmp_path / "bad",
               "--set", f"train.cold_prior_backbone={missing}")  # fmt: skip
    assert r.returncode == 2 and "train setting cold_prior_backbone" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()


def test_text_popularity_baseline_scores_trained_by_count_and_cold_by_text(
    synth_dir, tiny_backbone
):
    from fedrec.shared.baselines import run_baselines
    from fedrec.shared.baselines.text_popularity import TextPopularity

    ds = load_dataset(synth_dir)
    split = protocol_b(ds)
    base = TextPopularity(split, ds.item_texts(), backbone=str(tiny_backbone))
    counts = np.bincount(split.train_item, minlength=split.n_items)
    trained = counts > 0
    assert np.allclose(base.scores[trained], np.log1p(counts[trained]))
    cold = split.cold_items
    assert np.ptp(base.scores[cold]) > 0  # the text tells cold items apart
    r = run_baselines(ds, "B", names=["text-popularity"], backbone=str(tiny_backbone))
    entry = r["baselines"]["text-popularity"]
    assert entry["params"]["lambda"] == base.prior.lam
    assert 0 <= entry["metrics"]["cold_items"]["Recall@10"] <= 1


def test_weight_selection_script_runs_on_a_holdout_run_and_refuses_a_run_without_one(
    synth_dir, tiny_backbone, tmp_path
):
    run = tmp_path / "holdout"
    common = ("--protocol", "B", "--data", synth_dir, "--no-baselines",
              "--set", f"model.backbone={tiny_backbone}", "--set", "model.max_length=16",
              "--set", "train.epochs=1", "--set", "train.batch_size=64")  # fmt: skip
    r = fedrec("train-central", *common, "--out", run, "--set", "train.holdout=0.2")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cold_prior.json"
    r = subprocess.run(
        [sys.executable, "-m", "fedrec.simulations.cold_prior", str(run), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["w"] for row in res["weights"]] == list(WEIGHTS)
    best = max(res["weights"], key=lambda row: row["valid"]["NDCG@10"])
    assert res["chosen"] == best["w"] and res["ridge"]["lambda"] > 0
    assert set(res["prior_alone"]["valid"]) >= {"NDCG@10", "Recall@10"}
    # data that cannot be found: what to pass, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "fedrec.simulations.cold_prior", str(run), "--out", str(out),
         "--data", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode != 0 and "pass --data" in r.stderr and "Traceback" not in r.stderr
    # a run without holdout has nothing to choose on: a clear refusal, no traceback
    plain = tmp_path / "plain"
    assert fedrec("train-central", *common, "--out", plain).returncode == 0
    r = subprocess.run(
        [sys.executable, "-m", "fedrec.simulations.cold_prior", str(plain)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode != 0 and "train.holdout is 0" in r.stderr
    assert "--set train.holdout=0.2" in r.stderr and "Traceback" not in r.stderr


def test_own_backbone_is_the_same_folder_whatever_its_spelling(
    tiny_backbone, tiny_wide_encoder, tmp_path
):
    """The paired comparison and the saved model treat a prior as read by the model's own
    backbone for '', its name, the packaged model's folder for 'minilm', or a link to its folder;
    another encoder or a name that does not resolve is not its own."""
    from types import SimpleNamespace

    from fedrec.shared.backbone import resolve_backbone
    from fedrec.shared.model.cold_prior import own_backbone

    minilm = SimpleNamespace(cfg=SimpleNamespace(backbone="minilm"))
    assert own_backbone(minilm, "") and own_backbone(minilm, "minilm")
    assert own_backbone(minilm, str(resolve_backbone("minilm")))
    assert not own_backbone(minilm, str(tiny_wide_encoder))
    assert not own_backbone(minilm, str(tmp_path / "gone"))
    tiny = SimpleNamespace(cfg=SimpleNamespace(backbone=str(tiny_backbone)))
    link = tmp_path / "link"
    link.symlink_to(tiny_backbone, target_is_directory=True)
    assert own_backbone(tiny, str(link)) and own_backbone(tiny, f"{tiny_backbone}/")
    assert not own_backbone(tiny, "minilm")
