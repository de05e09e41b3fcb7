"""Per-example candidate scoring: the recommender in a form Opacus can make differentially private.

Central training scores every example against the whole catalog with one shared item-tower pass
(:func:`fedrec.shared.model.central.example_loss`). Opacus' per-sample gradients need every
trainable layer to see a batch-first input, one row per example, and the shared catalog pass has
no example dimension. So DP training uses :class:`CandidateScorer`: each example carries its own
candidate set (its target at position 0 plus ``negatives`` items drawn uniformly from the public
catalog) and its own context items, and their item-tower inputs are gathered per example from the
frozen catalog cache, padded to ``T`` tokens::

    tokens   (batch, L + M, T, inter)   [fedavg]  or  (batch, L + M, T, r)  [ffa: A(x) cached]
    items    (batch, L + M, dim)        adapted, mean-pooled, unit
    user     (batch, dim)               recency-weighted context (+ gated profile), unit
    logits   (batch, M)                 scale * <user, item> + bias

The trainable tensors are the SAME Parameter objects as the :class:`~.towers.RecModel`'s (LoRA A/B,
item bias, recency logits, scale, profile gate), wrapped in small modules with Opacus grad
samplers registered below, so a DP step updates the model that inference and the server use. The
scores equal ``RecModel.scores`` on the same items (test: ``tests/test_dp_training.py``).

Why uniform negatives: they are public and drawn independently of any user's data, so each
example's loss depends only on that example (no in-batch negatives, which would couple examples
and break per-sample DP). Uniform sampling adds only a constant to every logit's log-proposal, so
the sampled softmax needs no correction. Negatives that collide with the target or the context
are masked out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from fedrec.shared.model.catalog_cache import adapter_site
from fedrec.shared.model.towers import RecModel


class Gather(nn.Module):
    """``forward(idx)`` -> ``weight[idx]`` for a shared 1-D parameter (item bias, recency)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx]


class Broadcast(nn.Module):
    """``forward(ref)`` -> the shared scalar parameter expanded to ``ref``'s batch (batch,)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(ref.shape[0])


@register_grad_sampler(Gather)
def _gather_grad_sample(
    layer: Gather, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    idx = activations[0].reshape(activations[0].shape[0], -1)  # (batch, k)
    grads = backprops.reshape(backprops.shape[0], -1)  # (batch, k)
    out = torch.zeros(idx.shape[0], layer.weight.shape[0], dtype=grads.dtype)
    return {layer.weight: out.scatter_add_(1, idx, grads)}  # (batch, n)


@register_grad_sampler(Broadcast)
def _broadcast_grad_sample(
    layer: Broadcast, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    return {layer.weight: backprops.reshape(backprops.shape[0], *layer.weight.shape)}


class CandidateScorer(nn.Module):
    """Batch-first scoring of per-example candidate sets, sharing ``model``'s parameters.

    ``forward(context (batch, L), candidates (batch, M), profile (batch, dim) | None)`` returns
    logits ``(batch, M)``. Context is right-aligned item indices with -1 padding (as in
    :func:`~.examples.right_aligned`). With ``model.cfg.ffa`` the frozen ``A(x)`` is cached per
    token (r numbers instead of ``inter``), which is what makes FFA-LoRA cheap here.
    """

    tok_x: torch.Tensor
    tok_base: torch.Tensor
    tok_mask: torch.Tensor
    warm: torch.Tensor

    def __init__(self, model: RecModel) -> None:
        super().__init__()
        if model.id_emb is not None:
            raise ValueError(
                "DP training does not support model.id_residual=true: a per-item vector table "
                "is too large to send each round and to noise; set model.id_residual=false"
            )
        cache = model.cache
        if cache is None:
            raise ValueError("CandidateScorer needs the model's catalog cache (with_cache=True)")
        self.ffa = bool(model.cfg.ffa)
        site = adapter_site(model.backbone.base_model.model)
        lora = site.proj
        self.lora_A: nn.Linear = lora.lora_A["default"]
        self.lora_B: nn.Linear = lora.lora_B["default"]
        self.scaling = float(lora.scaling["default"])
        self.norm = site.norm
        self.bias = Gather(model.item_bias) if model.item_bias is not None else None
        self.recency = Gather(model.pos_logits)
        self.scale = Broadcast(model.log_scale)
        self.gate = Broadcast(model.profile_gate)
        self.use_profile = bool(model.cfg.use_profile)
        self.history_len = int(model.cfg.history_len)
        # Pad the packed token cache to (n_items, T, .) once: gathers are then plain indexing.
        n_items, counts = cache.n_items, cache.counts.long()
        t_max = int(counts.max())
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(cache.segment.shape[0]) - start[cache.segment]
        feats = self.lora_A(cache.x).detach() if self.ffa else cache.x  # (n_tokens, r | inter)
        x = torch.zeros(n_items, t_max, feats.shape[1])
        x[cache.segment, pos] = feats
        base = torch.zeros(n_items, t_max, cache.base.shape[1])
        base[cache.segment, pos] = cache.base
        mask = torch.zeros(n_items, t_max, dtype=torch.bool)
        mask[cache.segment, pos] = True
        self.register_buffer("tok_x", x, persistent=False)  # (n_items, T, r | inter)
        self.register_buffer("tok_base", base, persistent=False)  # (n_items, T, dim)
        self.register_buffer("tok_mask", mask, persistent=False)  # (n_items, T)
        self.register_buffer("warm", model.warm.clone(), persistent=False)
        self.n_items = n_items

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """``items`` (batch, k) indices >= 0 -> (batch, k, dim) adapted unit text embeddings."""
        x = self.tok_x[items]  # (batch, k, T, r | inter)
        low = x if self.ffa else self.lora_A(x)  # (batch, k, T, r)
        h = self.norm(self.tok_base[items] + self.scaling * self.lora_B(low))  # (batch, k, T, dim)
        m = self.tok_mask[items].unsqueeze(-1).to(h.dtype)  # (batch, k, T, 1)
        pooled = (h * m).sum(2) / m.sum(2)  # (batch, k, dim)
        return F.normalize(pooled, dim=-1)

    def forward(
        self,
        context: torch.Tensor,
        candidates: torch.Tensor,
        profile: torch.Tensor | None = None,
        as_cold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n_ctx = context.shape
        valid = context >= 0  # (batch, L)
        both = torch.cat([context.clamp(min=0), candidates], dim=1)  # (batch, L + M)
        vecs = self.item_vectors(both)
        ctx_vecs, cand_vecs = vecs[:, :n_ctx], vecs[:, n_ctx:]
        pos = torch.arange(self.history_len - n_ctx, self.history_len).expand(b, -1)
        logits_w = self.recency(pos).masked_fill(~valid, -torch.inf)  # (batch, L)
        w = torch.nan_to_num(torch.softmax(logits_w, dim=1), nan=0.0)
        user = (w.unsqueeze(-1) * ctx_vecs).sum(1)  # (batch, dim)
        if profile is not None and self.use_profile:
            user = user + self.gate(profile).unsqueeze(1) * profile
        user = F.normalize(user, dim=-1)
        scores = self.scale(context).exp().unsqueeze(1) * (cand_vecs @ user.unsqueeze(-1)).squeeze(
            -1
        )  # (batch, M)
        if self.bias is not None:
            keep = self.warm[candidates]  # (batch, M)
            if as_cold is not None:
                keep = keep & ~as_cold
            scores = scores + self.bias(candidates) * keep
        return scores


def sample_candidates(
    targets: torch.Tensor, n_items: int, negatives: int, generator: torch.Generator
) -> torch.Tensor:
    """``(batch, 1 + negatives)``: each target followed by uniform draws from the catalog."""
    neg = torch.randint(n_items, (targets.shape[0], negatives), generator=generator)
    return torch.cat([targets.unsqueeze(1), neg], dim=1)


def candidate_loss(
    logits: torch.Tensor, context: torch.Tensor, candidates: torch.Tensor, **kw: Any
) -> torch.Tensor:
    """Sampled softmax cross-entropy, target at column 0; colliding negatives masked out.

    A negative equal to the target or to one of the example's context items is not a negative
    (evaluation excludes known items too), so it is removed from the softmax.
    """
    collide = (candidates.unsqueeze(2) == context.unsqueeze(1)).any(2)  # (batch, M)
    collide |= candidates == candidates[:, :1]
    collide[:, 0] = False
    target = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits.masked_fill(collide, -torch.inf), target, **kw)
