"""Shared fixtures: tiny seeded synthetic data and a tiny random BERT built in the test itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrec.shared.data.synthetic import FILLER, TOPICS, generate


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """The tests' text-embedding and catalog caches (``$FEDREC_CACHE``) live in a temporary
    folder of the session, not in the user's ``~/.cache/fedrec``: a test run leaves nothing
    behind and never reads a stale file written by an earlier run or by the user's own runs.
    Processes the tests start (Flower's, the CLI's) inherit it. A test that needs another
    folder sets its own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDREC_CACHE", str(tmp_path_factory.mktemp("fedrec-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "synth", n_users=60, n_items=90, seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with a word-level vocabulary covering the synthetic texts."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER) | set(TOPICS))
    words += ["genre", "age", "likes", "many", "things", ".", ",", ":"] + [
        str(i) for i in range(100)
    ]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_wide_encoder(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random BERT on the same tokenizer, 48 wide (the tiny backbone is 32): a second
    encoder, e.g. the one a cold prior reads."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-wide-bert")
    for f in tiny_backbone.iterdir():
        if "token" in f.name:
            shutil.copy(f, root / f.name)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_backbone)),
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_llama(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (decoder) sharing the tiny word-level tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    root = tmp_path_factory.mktemp("tiny-llama")
    for f in tiny_backbone.iterdir():
        if "token" in f.name:
            shutil.copy(f, root / f.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_backbone)),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaModel(config).save_pretrained(root)
    return root
