"""``diagnose_clipping``: the per-example norms it records before DP-SGD's clip are the real
ones, split into the right groups, and the patches it makes are undone."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer

import fedrec.client.local_train as lt
from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import train_round
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.simulations import diagnose_clipping as dc

from .test_dp_training import _cfg, _data
from .test_model import ds, make_model  # noqa: F401 - fixture re-export


def test_group_names():
    assert dc.group_of("_module.tower.weight") == "lora_B"
    assert dc.group_of("_module.bias.weight") == "item_bias"
    assert dc.group_of("fac.weight") == "item_factors"
    assert dc.group_of("backbone.encoder.layer.3.attention.query.lora_B.default.weight") == "lora_B"
    assert dc.group_of("model.layers.0.proj.weight") == "model.layers.proj"


def test_records_the_per_example_norms_of_a_known_gradient():
    """A linear layer under loss sum(w . x_i + b): example i's gradient is (x_i, 1), so its
    weight's squared norm is |x_i|^2 and its bias's 1, before any clipping."""
    torch.manual_seed(0)
    x = torch.randn(7, 4) * 3
    originals = (lt.GradSampleModule, DPOptimizer.clip_and_accumulate)
    with dc.recording() as rec:
        lin = torch.nn.Linear(4, 1)
        module = lt.GradSampleModule(lin, loss_reduction="sum")
        opt = DPOptimizer(
            torch.optim.SGD(lin.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=7,
            loss_reduction="sum",
        )
        module(x).sum().backward()
        opt.step()
    assert len(rec.rows) == 7 and rec.clip == 1.0
    for i, row in enumerate(rec.rows):
        assert row["weight"] == pytest.approx(float(x[i].pow(2).sum()), rel=1e-5)
        assert row["bias"] == pytest.approx(1.0)
    out = dc.report(rec)
    norms = (x.pow(2).sum(1) + 1).sqrt()
    assert out["clipped_fraction"] == pytest.approx(float((norms > 1).float().mean()))
    assert out["norm"]["p50"] == pytest.approx(float(norms.median()), rel=1e-5)
    w = out["groups"]["weight"]["mean_share"]
    assert w == pytest.approx(float((x.pow(2).sum(1) / norms**2).mean()), rel=1e-5)
    assert w + out["groups"]["bias"]["mean_share"] == pytest.approx(1.0)
    # the optimizer still clipped as Opacus does (no noise here): the summed clipped gradients
    g = torch.cat([x, torch.ones(7, 1)], dim=1)
    clipped = (g * (1.0 / norms).clamp(max=1.0).unsqueeze(1)).sum(0)
    got = torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad.reshape(-1)])
    assert torch.allclose(got, clipped, atol=1e-5)
    # the patches are undone: the very objects from before
    assert (lt.GradSampleModule, DPOptimizer.clip_and_accumulate) == originals


def test_the_patches_are_undone_when_the_round_fails():
    originals = (lt.GradSampleModule, DPOptimizer.clip_and_accumulate)
    with pytest.raises(RuntimeError, match="boom"), dc.recording():
        assert DPOptimizer.clip_and_accumulate is not originals[1]
        raise RuntimeError("boom")
    assert lt.GradSampleModule is originals[0]
    assert DPOptimizer.clip_and_accumulate is originals[1]


def test_a_real_round_records_every_sampled_example(ds, tiny_backbone):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True)
    scorer = CandidateScorer(model)
    sizes: list[int] = []
    scorer.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    cfg = _cfg(backbone=str(tiny_backbone), local_steps=3, physical_batch=2)
    with dc.recording() as rec:
        res = train_round(scorer, _data(ds), cfg, MemoryStore(), seed=0)
    assert res.trained and res.steps == 3
    assert len(sizes) > res.steps  # physical batches: more forward passes than steps
    assert len(rec.rows) == sum(sizes) > 0  # every physical batch's examples, once
    out = dc.report(rec)
    assert {"lora_B", "item_bias"} <= set(out["groups"])
    assert not [g for g in out["groups"] if g.startswith("unnamed")]
    assert sum(g["mean_share"] for g in out["groups"].values()) == pytest.approx(1.0)
    assert out["clip"] == cfg.max_grad_norm


def test_nothing_recorded_is_an_error():
    with pytest.raises(ValueError, match="dp=true"):
        dc.report(dc.NormRecorder())
