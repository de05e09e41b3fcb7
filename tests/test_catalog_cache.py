"""The catalog cache on disk: read back exactly, keyed by everything it depends on, rebuilt
when the file is bad."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fedrec.shared.backbone import load_backbone
from fedrec.shared.data import load_dataset
from fedrec.shared.model import catalog_cache as cc


@pytest.fixture(scope="module")
def parts(synth_dir, tiny_backbone):
    base, tok = load_backbone(tiny_backbone)
    texts = load_dataset(synth_dir).item_texts()
    return base, tok, texts


def _same(a: cc.CatalogCache, b: cc.CatalogCache) -> bool:
    fa, fb = cc._fields(a), cc._fields(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("compact", [False, True])
def test_second_load_reads_the_file_and_equals_the_build(parts, tmp_path, monkeypatch, compact):
    base, tok, texts = parts
    project = None
    if compact:
        torch.manual_seed(3)
        project = nn.Linear(base.config.intermediate_size, 4, bias=False)
    built = cc.build_catalog_cache(base, tok, texts, max_length=16, project=project)
    first = cc.load_or_build_catalog_cache(
        base, tok, texts, max_length=16, project=project, directory=tmp_path
    )
    assert _same(first, built) and len(list(tmp_path.glob("*.pt"))) == 1

    def no_build(*_a, **_k):
        raise AssertionError("rebuilt although the file was there")

    monkeypatch.setattr(cc, "build_catalog_cache", no_build)
    again = cc.load_or_build_catalog_cache(
        base, tok, texts, max_length=16, project=project, directory=tmp_path
    )
    assert _same(again, built)


def test_key_follows_weights_texts_length_and_projection(parts):
    base, tok, texts = parts
    key = cc.catalog_cache_key(base, tok, texts, max_length=16)
    assert key == cc.catalog_cache_key(base, tok, list(texts), max_length=16)  # deterministic
    assert key != cc.catalog_cache_key(base, tok, texts, max_length=8)
    assert key != cc.catalog_cache_key(
        base, tok, [*texts[:-1], texts[-1] + " genre"], max_length=16
    )
    w = base.encoder.layer[0].attention.self.query.weight
    with torch.no_grad():
        w[0, 0] += 1e-3
    try:
        assert key != cc.catalog_cache_key(base, tok, texts, max_length=16)
    finally:
        with torch.no_grad():
            w[0, 0] -= 1e-3
    torch.manual_seed(0)
    a = nn.Linear(base.config.intermediate_size, 4, bias=False)
    with_a = cc.catalog_cache_key(base, tok, texts, max_length=16, project=a)
    assert with_a != key
    with torch.no_grad():
        a.weight[0, 0] += 1.0
    assert with_a != cc.catalog_cache_key(base, tok, texts, max_length=16, project=a)


@pytest.mark.parametrize("damage", ["garbage", "nan", "wrong-counts", "missing-field"])
def test_a_bad_file_is_rebuilt_and_replaced(parts, tmp_path, caplog, damage):
    base, tok, texts = parts
    good = cc.load_or_build_catalog_cache(base, tok, texts, max_length=16, directory=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    fields = {k: v.clone() for k, v in cc._fields(good).items()}
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        if damage == "nan":
            fields["base"][0, 0] = float("nan")
        elif damage == "wrong-counts":
            fields["counts"][0] += 1
        else:
            del fields["x"]
        torch.save(fields, path)
    with caplog.at_level(logging.WARNING, logger="fedrec.model"):
        got = cc.load_or_build_catalog_cache(base, tok, texts, max_length=16, directory=tmp_path)
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text
    assert _same(got, good)
    assert _same(cc._from_fields(torch.load(path, weights_only=True), None), good)  # replaced


def test_an_unwritable_directory_still_gives_the_cache(parts, tmp_path, caplog):
    base, tok, texts = parts
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="fedrec.model"):
        got = cc.load_or_build_catalog_cache(
            base, tok, texts, max_length=16, directory=blocker / "catalog"
        )
    assert "not written" in caplog.text
    assert _same(got, cc.build_catalog_cache(base, tok, texts, max_length=16))


def test_a_block_that_norms_the_mlp_output_is_refused():
    """Gemma 2/3 norm the MLP's output before the residual: base + a linear change does not
    describe that block, so the adapter site refuses it (it used to be taken as Llama's)."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        cc.adapter_site(Gemma3TextModel(config))


def test_build_refuses_a_site_that_misreads_the_block(tiny_llama, synth_dir, monkeypatch):
    """A cache whose norm(base) is not the model's own output is refused when built, naming
    the model: the check that catches any block the site misreads."""
    base, tok = load_backbone(tiny_llama)
    texts = load_dataset(synth_dir).item_texts()[:8]
    cc.build_catalog_cache(base, tok, texts, max_length=16)  # the true site passes
    real = cc.adapter_site

    def wrong(model):  # noqa: ANN001, ANN202 - the residual taken from the wrong module
        site = real(model)
        return cc.AdapterSite(
            target=site.target,
            proj=site.proj,
            norm=site.norm,
            residual_module=model.layers[-1].input_layernorm,
            residual_arg=0,
        )

    monkeypatch.setattr(cc, "adapter_site", wrong)
    with pytest.raises(ValueError, match="LlamaModel: the catalog cache does not reproduce"):
        cc.build_catalog_cache(base, tok, texts, max_length=16)
