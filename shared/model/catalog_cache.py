"""Frozen per-token states of the public catalog text, computed once.

LoRA sits only on the backbone's LAST layer's FFN output projection (the "adapter site"):
``output.dense`` in a BERT-style encoder (MiniLM), ``mlp.down_proj`` in a Llama-style decoder
(SmolLM2). The projection's input ``x`` (the FFN's intermediate activation) and the residual it
is added to do not depend on the adapter, so for catalog texts (public) they are computed once
here as ``x`` and ``base = proj(x) + residual``. What follows the sum is a norm: the layer's
LayerNorm (BERT, post-norm) or the model's final RMSNorm (Llama, pre-norm). The adapted item
embedding is then

    h = norm(base + scaling * B(A(x)))             per token, (n_tokens, hidden)
    e = mean of h over the item's tokens            (n_items, hidden)

which is exactly the backbone's output with the adapter on (test: ``test_model.py``), at a cost
of ``r * (1536 + 384)`` multiply-adds per token instead of a full transformer pass. That makes a
full-catalog softmax affordable on a 2-core CPU at every step.

Tokens are stored packed (no padding): ``segment[t]`` is the item index of token ``t``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("fedrec.model")

# bumped whenever what build_catalog_cache computes changes: older files are then never read
CACHE_FORMAT = 1


@dataclass
class CatalogCache:
    # (n_tokens, intermediate) input of the adapted projection; None when only A(x) is kept
    x: torch.Tensor | None
    base: torch.Tensor  # (n_tokens, hidden) dense(x) + bias + attention_output, base weights
    segment: torch.Tensor  # (n_tokens,) int64 item index of each token
    counts: torch.Tensor  # (n_items,) float tokens per item
    # With a frozen LoRA A (FFA-LoRA) only A(x) is ever used: the cache then holds that,
    # (n_tokens, r), and the A it was computed with, and no x (``build_catalog_cache(project=)``)
    ax: torch.Tensor | None = None
    a_weight: torch.Tensor | None = None

    @property
    def n_items(self) -> int:
        return int(self.counts.shape[0])

    def nbytes(self) -> int:
        held = (self.x, self.base, self.segment, self.ax)
        return sum(t.element_size() * t.numel() for t in held if t is not None)

    def a_of(self, lora_a: nn.Linear) -> torch.Tensor:
        """``lora_a(x)`` per token: from ``ax`` (when A is the one it was computed with) or
        computed from ``x``."""
        if self.x is not None:
            return lora_a(self.x)
        assert self.ax is not None and self.a_weight is not None
        if not torch.equal(lora_a.weight, self.a_weight):
            raise RuntimeError(
                "the catalog cache holds A(x) for a frozen LoRA A (FFA-LoRA) and this A differs: "
                "A must not change under FFA-LoRA (build the model with ffa=false to train it)"
            )
        return self.ax


@dataclass
class AdapterSite:
    """Where the LoRA adapter goes in a backbone family, and what follows it."""

    target: str  # PEFT target_modules regex (the one projection)
    proj: Any  # the projection module (a PEFT Linear once the adapter is attached)
    norm: Any  # applied to (projection output + residual)
    residual_module: Any  # whose forward receives the residual ...
    residual_arg: int  # ... as this positional argument


def adapter_site(model: Any) -> AdapterSite:
    """The adapter site of a BERT-style encoder or a Llama-style decoder (``AutoModel`` output)."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer"):  # BERT, MiniLM, ...
        n, last = len(encoder.layer), encoder.layer[-1]
        return AdapterSite(
            target=rf".*encoder\.layer\.{n - 1}\.output\.dense",
            proj=last.output.dense,
            norm=last.output.LayerNorm,
            residual_module=last.output,  # BertOutput(hidden_states, input_tensor)
            residual_arg=1,
        )
    if hasattr(model, "layers") and hasattr(model, "norm"):  # Llama, SmolLM2, ...
        n, last = len(model.layers), model.layers[-1]
        if hasattr(last, "post_feedforward_layernorm"):
            # Gemma 2/3: the MLP's output is normed before the residual add, so the block's
            # output is not base + (a linear change of down_proj's output): no cached tower
            raise ValueError(
                f"backbone {type(model).__name__} is not supported: its last block norms the "
                "MLP output before the residual (post_feedforward_layernorm, as Gemma 2 and 3 "
                "do), which fedrec's cached item tower cannot express; use a BERT-style "
                "encoder (minilm, mpnet) or a Llama-style decoder (smollm2)"
            )
        return AdapterSite(
            target=rf".*layers\.{n - 1}\.mlp\.down_proj",
            proj=last.mlp.down_proj,
            norm=model.norm,
            # the MLP's residual is the input of the post-attention norm
            residual_module=last.post_attention_layernorm,
            residual_arg=0,
        )
    raise ValueError(
        f"backbone {type(model).__name__} is not supported: fedrec needs a BERT-style encoder "
        "(encoder.layer[i].output.dense) or a Llama-style decoder (layers[i].mlp.down_proj)"
    )


@torch.no_grad()
def build_catalog_cache(
    model: Any,
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    texts: list[str],
    *,
    max_length: int,
    batch_size: int = 256,
    project: nn.Linear | None = None,
) -> CatalogCache:
    """Run the frozen base model over ``texts`` once and keep the adapter site's inputs.

    ``project``: a frozen LoRA A (FFA-LoRA). Then each batch's ``x`` is kept only as
    ``project(x)`` (``ax``; r numbers per token instead of the intermediate size), and the full
    ``x`` is never held.

    ``model`` must be the base model without an active adapter (the inputs captured here do
    not depend on it, but ``base`` uses the projection's base weights only).
    """
    site = adapter_site(model)
    base_proj = getattr(site.proj, "base_layer", site.proj)  # a PEFT Linear keeps its base
    captured: dict[str, torch.Tensor] = {}

    def take_x(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["x"] = args[0]

    def take_residual(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["residual"] = args[site.residual_arg]

    handles = [
        site.proj.register_forward_pre_hook(take_x),
        site.residual_module.register_forward_pre_hook(take_residual),
    ]
    modes = [(m, m.training) for m in model.modules()]  # restored exactly afterwards
    model.eval()
    lengths = torch.as_tensor(
        [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]],
        dtype=torch.long,
    )
    # The outputs are allocated once, tokens grouped by item in item order, and each batch
    # writes its rows in place: peak memory is the cache plus one batch's activations (not
    # two or three copies of the cache, as concatenating per-batch pieces would take).
    start_of = torch.cumsum(lengths, 0) - lengths  # first token row of each item
    n_tok = int(lengths.sum())
    x_out = torch.empty((n_tok, project.out_features if project else base_proj.in_features))
    base_out = torch.empty((n_tok, base_proj.out_features))
    segment = torch.repeat_interleave(torch.arange(len(texts)), lengths)
    # Batches of similar length waste little on padding.
    order = torch.argsort(lengths, stable=True)
    try:
        for start in range(0, len(texts), batch_size):
            rows_here = order[start : start + batch_size]
            tok = tokenizer(
                [texts[i] for i in rows_here.tolist()],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out = model(**tok)
            mask = tok["attention_mask"].bool()  # (batch, tokens)
            if not torch.equal(mask.sum(1), lengths[rows_here]):
                raise RuntimeError("tokenizer lengths differ between two calls on the same texts")
            # destination rows: item i's tokens at start_of[i] .. start_of[i] + len_i - 1
            pos = start_of[rows_here].unsqueeze(1) + torch.cumsum(mask, 1) - 1
            dest = pos[mask]
            x = captured["x"][mask]
            x_out[dest] = project(x) if project is not None else x
            base_out[dest] = (base_proj(captured["x"]) + captured["residual"])[mask]
            captured.clear()
            _check_reproduces(type(model).__name__, site.norm(base_out[dest]), out[0][mask])
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    counts = lengths.float()
    if project is not None:
        a = project.weight.detach().clone()
        return CatalogCache(None, base_out, segment, counts, ax=x_out, a_weight=a)
    return CatalogCache(x_out, base_out, segment, counts)


def _check_reproduces(name: str, cached: torch.Tensor, output: torch.Tensor) -> None:
    """The cache must give the backbone's own output at the adapter site with the adapter at
    zero (the site's norm of ``base``); else the tower trained on it is another model."""
    err = float((cached - output).abs().max()) if output.numel() else 0.0
    scale = float(output.abs().max()) if output.numel() else 0.0
    if not err <= 1e-3 * max(scale, 1e-6):
        raise ValueError(
            f"backbone {name}: the catalog cache does not reproduce the model's output (largest "
            f"difference {err:.3g} at values up to {scale:.3g}): its last block is not the "
            "BERT-style or Llama-style block fedrec's cached item tower expects (the adapted "
            "projection's output plus a residual, then the norm whose output the model returns)"
        )


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    buf: Any = flat.view(torch.uint8).numpy()  # an ndarray exposes the buffer protocol
    return memoryview(buf)


def catalog_cache_key(
    model: Any,
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    texts: list[str],
    *,
    max_length: int,
    project: nn.Linear | None = None,
) -> str:
    """What :func:`build_catalog_cache` depends on, hashed: every tensor of ``model`` (names,
    dtypes, shapes, bytes), the token ids of ``texts`` at ``max_length`` (so the tokenizer, the
    texts and the truncation), ``project``'s weight and the cache format."""
    h = hashlib.blake2b(f"fedrec-catalog-cache-v{CACHE_FORMAT}".encode(), digest_size=20)
    h.update(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    for row in ids:
        h.update(b"\1" + ",".join(map(str, row)).encode())
    if project is not None:
        h.update(b"\2project")
        h.update(_tensor_bytes(project.weight))
    return h.hexdigest()


def _fields(c: CatalogCache) -> dict[str, torch.Tensor]:
    out = {"base": c.base, "segment": c.segment, "counts": c.counts}
    for k in ("x", "ax", "a_weight"):
        if getattr(c, k) is not None:
            out[k] = getattr(c, k)
    return out


def _from_fields(d: dict[str, Any], project: nn.Linear | None) -> CatalogCache:
    """A cache read back from disk, checked for the shapes and values it must have."""
    want = {"base", "segment", "counts"} | ({"ax", "a_weight"} if project is not None else {"x"})
    if not isinstance(d, dict) or set(d) != want:
        raise ValueError(f"fields {sorted(d) if isinstance(d, dict) else type(d)}, not {want}")
    if not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise ValueError("a field is not a tensor")
    base, segment, counts = d["base"], d["segment"], d["counts"]
    n_tok = base.shape[0]
    if base.dim() != 2 or segment.shape != (n_tok,) or counts.dim() != 1:
        raise ValueError("inconsistent shapes")
    if int(counts.sum()) != n_tok or not torch.equal(
        segment, torch.repeat_interleave(torch.arange(counts.shape[0]), counts.long())
    ):
        raise ValueError("token counts and segments disagree")
    x = d.get("ax") if project is not None else d.get("x")
    assert x is not None
    if x.dim() != 2 or x.shape[0] != n_tok:
        raise ValueError("the adapter-site inputs have the wrong shape")
    if not (torch.isfinite(base).all() and torch.isfinite(x).all()):
        raise ValueError("non-finite values")
    if project is not None:
        if not torch.equal(d["a_weight"], project.weight.detach()):
            raise ValueError("computed with another LoRA A")
        return CatalogCache(None, base, segment, counts, ax=x, a_weight=d["a_weight"])
    return CatalogCache(x, base, segment, counts)


def load_or_build_catalog_cache(
    model: Any,
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    texts: list[str],
    *,
    max_length: int,
    project: nn.Linear | None = None,
    directory: Path | None = None,
) -> CatalogCache:
    """:func:`build_catalog_cache`, kept on disk under ``directory`` (default
    ``$FEDREC_CACHE/catalog``) by :func:`catalog_cache_key`: a client process (a simulated
    client's worker, an edge device after a restart) reads it instead of running the backbone
    over the whole catalog again (about 9 s of one core for MiniLM on ML-100K). A file that does
    not read back as a consistent cache is rebuilt and replaced; a directory that cannot be
    written only costs the rebuild next time."""
    if directory is None:
        from fedrec.shared.backbone import cache_home

        directory = cache_home() / "catalog"
    key = catalog_cache_key(model, tokenizer, texts, max_length=max_length, project=project)
    path = directory / f"{key}.pt"
    if path.is_file():
        try:
            return _from_fields(torch.load(path, map_location="cpu", weights_only=True), project)
        except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
            log.warning("catalog cache %s unreadable (%s): rebuilding it", path, err)
    cache = build_catalog_cache(model, tokenizer, texts, max_length=max_length, project=project)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(_fields(cache), tmp)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except OSError as err:
        log.warning("catalog cache not written to %s (%s): it is rebuilt next time", path, err)
    return cache
