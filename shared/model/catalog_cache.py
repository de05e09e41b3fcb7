"""Frozen per-token states of the public catalog text, computed once.

LoRA sits only on the backbone's LAST layer's FFN output projection (``output.dense``). The
inputs of that projection, ``x`` (the FFN's intermediate activation, 1536 wide in MiniLM), and the
rest of that layer's residual sum, ``dense(x) + attention_output``, do not depend on the adapter,
so for catalog texts (public) they are computed once here. The adapted item embedding is then

    h = LayerNorm(base + scaling * B(A(x)))        per token, (n_tokens, hidden)
    e = mean of h over the item's tokens            (n_items, hidden)

which is exactly the backbone's output with the adapter on (test: ``test_model.py``), at a cost
of ``r * (1536 + 384)`` multiply-adds per token instead of a full transformer pass. That makes a
full-catalog softmax affordable on a 2-core CPU at every step.

Tokens are stored packed (no padding): ``segment[t]`` is the item index of token ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class CatalogCache:
    x: torch.Tensor  # (n_tokens, intermediate) input of the adapted projection
    base: torch.Tensor  # (n_tokens, hidden) dense(x) + bias + attention_output, base weights
    segment: torch.Tensor  # (n_tokens,) int64 item index of each token
    counts: torch.Tensor  # (n_items,) float tokens per item

    @property
    def n_items(self) -> int:
        return int(self.counts.shape[0])

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.x, self.base, self.segment))


def last_ffn_output(model: Any) -> Any:
    """The last transformer layer's ``BertOutput``-style module (``dense`` + ``LayerNorm``)."""
    return model.encoder.layer[-1].output


@torch.no_grad()
def build_catalog_cache(
    model: Any,
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    texts: list[str],
    *,
    max_length: int,
    batch_size: int = 256,
) -> CatalogCache:
    """Run the frozen base model over ``texts`` once and keep the last layer's FFN inputs.

    ``model`` must be the base encoder without an active adapter (the inputs captured here do
    not depend on it, but ``base`` uses the projection's base weights only).
    """
    out_mod = last_ffn_output(model)
    dense = out_mod.dense
    base_dense = getattr(dense, "base_layer", dense)  # a PEFT-wrapped Linear keeps its base
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["x"], captured["attn"] = args[0], args[1]

    handle = out_mod.register_forward_pre_hook(hook)
    xs, bases, segs = [], [], []
    was_training = model.training
    model.eval()
    # Batches of similar length waste little on padding; rows are mapped back by `order`.
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ]
    order = torch.as_tensor(sorted(range(len(texts)), key=lambda i: lengths[i]), dtype=torch.long)
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
            model(**tok)
            mask = tok["attention_mask"].bool()  # (batch, tokens)
            x = captured["x"][mask]  # (n_tok, intermediate)
            base = base_dense(captured["x"])[mask] + captured["attn"][mask]  # (n_tok, hidden)
            rows = rows_here.unsqueeze(1).expand_as(mask)
            xs.append(x)
            bases.append(base)
            segs.append(rows[mask])
    finally:
        handle.remove()
        model.train(was_training)
    segment = torch.cat(segs)
    by_item = torch.argsort(segment, stable=True)  # tokens grouped by item, in item order
    xs, bases, segment = [torch.cat(xs)[by_item]], [torch.cat(bases)[by_item]], segment[by_item]
    counts = torch.bincount(segment, minlength=len(texts)).float()
    return CatalogCache(torch.cat(xs), torch.cat(bases), segment, counts)
