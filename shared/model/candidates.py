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

On a LayerNorm backbone (MiniLM, BERT-style) the item tower is :class:`LoRAItemTower`: it embeds
each distinct item of the batch once from the packed token cache (an item's vector does not
depend on which example asks for it) and gives Opacus each example's gradient of B (and of A with
FedAvg-LoRA) in closed form from the gradient at the example's item vectors, instead of letting
Opacus' Linear sampler work through the ``(batch, L + M, T, dim)`` token activations and
gradients. Same numbers (``tests/test_candidates.py`` compares the per-example gradients
with the token path and with one backward pass per example); its speed against the token path
is measured by ``simulations/bench_dp_step.py``.

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

import hashlib
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.autograd.function import once_differentiable

from fedrec.shared.model.catalog_cache import adapter_site
from fedrec.shared.model.towers import RecModel


class Gather(nn.Module):
    """``forward(idx)`` -> ``weight[idx]`` for a shared parameter indexed by its first dimension
    (item bias, recency logits, item factors)."""

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
    b = activations[0].shape[0]
    idx = activations[0].reshape(b, -1)  # (batch, m)
    tail = layer.weight.shape[1:]
    grads = backprops.reshape(b, idx.shape[1], *tail)  # (batch, m, *tail)
    out = torch.zeros(b, *layer.weight.shape, dtype=grads.dtype)  # repeated rows accumulate
    return {
        layer.weight: out.index_put_((torch.arange(b).unsqueeze(1), idx), grads, accumulate=True)
    }


class Project(nn.Module):
    """``forward(x)`` -> ``x @ weight.T`` for a shared ``(k, dim)`` map (the profile factors)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@register_grad_sampler(Project)
def _project_grad_sample(
    layer: Project, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    return {layer.weight: torch.einsum("bk,bd->bkd", backprops, activations[0])}


@register_grad_sampler(Broadcast)
def _broadcast_grad_sample(
    layer: Broadcast, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    return {layer.weight: backprops.reshape(backprops.shape[0], *layer.weight.shape)}


class LoRAItemTower(nn.Module):
    """``forward(items (batch, k))`` -> ``(batch, k, dim)`` adapted unit item vectors.

    Per catalog token ``z = base + s * B a`` with ``a = A x``, ``h = LayerNorm(z)``, ``p = mean
    of h over the item's tokens``, ``e = p / |p|``. With FFA-LoRA (``a_weight=None``) ``A`` is
    frozen and ``feats`` holds ``a`` per token (cached); with FedAvg-LoRA ``feats`` holds ``x``
    (the FFN's intermediate activations, frozen) and ``a_weight`` is the trainable ``A``. The
    forward embeds each of the batch's distinct items once from the packed token cache (an item's
    vector does not depend on which example asks for it). Opacus calls
    :func:`_lora_tower_grad_sample` with ``g = dloss_b/de`` (batch, k, dim). With the item's
    ``w = gamma * (g - e (e.g)) / (|p| n)`` (``n`` tokens), ``w' = w - mean(w)``,
    ``xhat_t`` LayerNorm's normalised input, ``rstd_t`` its inverse std and
    ``c_t = xhat_t . w``, LayerNorm's backward gives
    ``dloss_b/dz_t = rstd_t (w' - xhat_t c_t / dim)``, so example b's gradients are::

        dB = s * sum_k [ w' S_a^T  -  (1/dim) sum_t c_t xhat_t (rstd_t a_t)^T ]
        dA = s * sum_k [ (B^T w') S_x^T  -  (1/dim) sum_t c_t (B^T xhat_t) (rstd_t x_t)^T ]

    with ``S_a = sum_t rstd_t a_t`` and ``S_x = sum_t rstd_t x_t`` over the item's tokens. The
    per-(example, item, token) tensors left are ``xhat`` (dim) and, for ``dA`` only, ``x``
    (gathered in chunks of examples); Opacus' Linear sampler needed the token activations and
    their gradients per (example, item) for both LoRA matrices instead.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        feats: torch.Tensor,  # (n_tokens, r) A(x) [ffa] or (n_tokens, inter) x [fedavg]
        base: torch.Tensor,  # (n_tokens, dim)
        segment: torch.Tensor,  # (n_tokens,) int64 item of each token, items in order
        counts: torch.Tensor,  # (n_items,) tokens per item
        norm: nn.LayerNorm,
        scaling: float,
        a_weight: nn.Parameter | None = None,  # the shared lora_A Parameter (r, inter), fedavg
    ) -> None:
        super().__init__()
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise ValueError(
                f"LoRAItemTower needs an affine LayerNorm after the adapter, got {type(norm)}"
            )
        want = weight.shape[1] if a_weight is None else a_weight.shape[1]
        if feats.shape[1] != want:
            raise ValueError(f"token features have width {feats.shape[1]}, expected {want}")
        self.weight = weight  # the shared lora_B Parameter (dim, r)
        self.a_weight = a_weight  # registered as this module's parameter when given
        # Plain attributes, not buffers: Opacus refuses trainable modules with buffers.
        self.feats, self.base = feats, base
        if not torch.equal(
            segment, torch.repeat_interleave(torch.arange(counts.shape[0]), counts.long())
        ):
            raise ValueError("the catalog cache's tokens are not packed in item order")
        self.counts = counts.long()  # tokens per item
        self.start = torch.cumsum(self.counts, 0) - self.counts  # first token per item
        self.ln_weight = norm.weight.detach()
        self.ln_bias = norm.bias.detach()
        self.eps = float(norm.eps)
        self.scaling = scaling
        self._saved: tuple[torch.Tensor, ...] | None = None
        # B seen at a round's start, and the whole catalog's forward at it (see start_round)
        self._start: torch.Tensor | None = None
        self._seen = 0  # clients that started from _start in this process
        self._at_start: _CatalogAtB | None = None

    def _state(self) -> list[torch.Tensor]:
        """The trainable tensors' current values (to tell whether a saved forward is stale)."""
        return [self.weight] if self.a_weight is None else [self.weight, self.a_weight]

    def tokens(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For unique items ``u`` (U,): their packed token indices, each token's row in ``u``
        and its slot within its item."""
        cu = self.counts[u]
        first = torch.cumsum(cu, 0) - cu
        row = torch.repeat_interleave(torch.arange(u.shape[0]), cu)
        slot = torch.arange(int(cu.sum())) - first[row]
        return self.start[u][row] + slot, row, slot

    def embed(
        self, u: torch.Tensor, tok: torch.Tensor, row: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``(x, a (tokens, r), z (tokens, dim), mu, rstd (tokens, 1), pooled (U, dim), e (U,
        dim))`` for unique items ``u`` (with their ``tokens(u)``), at the current A and B: ``x``
        (tokens, inter) is the tokens' frozen input of A with FedAvg-LoRA (else ``a`` itself),
        ``mu`` and ``rstd`` LayerNorm's mean and inverse std of ``z``."""
        # index_select, not feats[tok]: the same rows, about 5x faster on CPU at these sizes
        x = a = self.feats.index_select(0, tok)
        if self.a_weight is not None:
            a = low_rank_product(x, self.a_weight)
        z = self.base.index_select(0, tok) + low_rank_product(a, self.weight, self.scaling)
        # F.layer_norm's op, which also returns the statistics the grad sampler needs
        h, mu, rstd = torch.native_layer_norm(
            z, z.shape[-1:], self.ln_weight, self.ln_bias, self.eps
        )
        pooled = torch.zeros(u.shape[0], h.shape[1], dtype=h.dtype).index_add(0, row, h)
        pooled = pooled / self.counts[u].unsqueeze(1)
        return x, a, z, mu.detach(), rstd.detach(), pooled, F.normalize(pooled, dim=-1)

    def pooled(self, items: torch.Tensor) -> torch.Tensor:
        """``(batch, k, dim)`` mean-pooled adapted embeddings before normalization, by plain
        autograd (no per-example gradients: for training without DP, e.g. with an ID table)."""
        u, inv = torch.unique(items, return_inverse=True)
        tok, row, _ = self.tokens(u)
        return self.embed(u, tok, row)[5][inv]

    def start_round(self) -> None:
        """Called by a client before its first local step. In a simulation process that
        serves many clients of one round, each starts from the same global B: once this
        process has seen ``BUILD_AFTER`` clients start from one B, the whole catalog's forward
        at it is computed (:class:`_CatalogAtB`, about as long as 25 first steps), and every
        later first step at that B takes its item vectors from there and its gradient of B in
        closed form (no token-level graph). Not for FedAvg-LoRA (A trains too). A process that
        serves fewer clients than that per B (a device, a few silos per process) never builds
        it."""
        if self.a_weight is not None:
            return
        b = self.weight.detach()
        if self._at_start is not None and torch.equal(self._at_start.weight, b):
            return
        if self._start is not None and torch.equal(self._start, b):
            self._seen += 1
            if self._seen >= BUILD_AFTER:
                self._at_start = _CatalogAtB.build(self)
            return
        self._start, self._seen, self._at_start = b.clone(), 1, None

    def unit(self, u: torch.Tensor) -> torch.Tensor:
        """``(U, dim)`` adapted unit vectors of the distinct items ``u`` (U,), by plain autograd
        (nothing saved for the grad sampler); at a round's start B, from the catalog's cached
        forward (:meth:`start_round`)."""
        at = self._at_start
        if at is not None and self.a_weight is None and torch.equal(at.weight, self.weight):
            return _FromCatalog.apply(self.weight, u, self, at)
        tok, row, _ = self.tokens(u)
        return self.embed(u, tok, row)[6]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        # only the batch's distinct items: a small batch touches a small part of the catalog
        u, inv = torch.unique(items, return_inverse=True)
        tok, row, slot = self.tokens(u)
        x, a, z, mu, rstd, pooled, e = self.embed(u, tok, row)
        # what the grad sampler needs, at this forward's items, A and B (else it recomputes)
        self._saved = (items, u, inv, tok, row, slot, x, a.detach(), z.detach(), mu, rstd,
                       pooled.detach(), *(p.detach().clone() for p in self._state()))  # fmt: skip
        return e[inv]  # (batch, k, dim)


# Clients of one round seen starting from one B before a process builds the catalog at that B:
# the build costs about 25 first steps' worth of the token-level graph, and each later first
# step saves a few milliseconds (simulations/results/bench-round/README.md).
BUILD_AFTER = 16


class _CatalogAtB:
    """The whole catalog's item-tower forward at one B (FFA-LoRA: A frozen): unit vectors
    ``e`` and norms of the pooled vectors per item, and per token LayerNorm's normalised
    input ``xhat`` and inverse std ``rstd``, with ``s_a = sum_t rstd_t a_t`` per item: what
    :class:`_FromCatalog`'s backward needs (about 40 MB for ML-100K under MiniLM)."""

    def __init__(self, weight: torch.Tensor, e: torch.Tensor, norm: torch.Tensor,
                 xhat: torch.Tensor, rstd: torch.Tensor, s_a: torch.Tensor) -> None:  # fmt: skip
        self.weight, self.e, self.norm, self.xhat, self.rstd, self.s_a = (
            weight, e, norm, xhat, rstd, s_a,
        )  # fmt: skip

    @staticmethod
    def build(tower: LoRAItemTower) -> _CatalogAtB:
        with torch.no_grad():
            n = tower.counts.shape[0]
            u = torch.arange(n)
            row = torch.repeat_interleave(u, tower.counts)
            tok = torch.arange(row.shape[0])
            _x, a, z, mu, rstd, pooled, e = tower.embed(u, tok, row)
            xhat = (z - mu) * rstd
            s_a = torch.zeros(n, a.shape[1], dtype=a.dtype).index_add_(0, row, rstd * a)
            norm = pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
            return _CatalogAtB(tower.weight.detach().clone(), e, norm, xhat, rstd, s_a)


class _FromCatalog(torch.autograd.Function):
    """Unit item vectors ``(U, dim)`` of distinct items ``u`` read from a :class:`_CatalogAtB`
    at the current B, and B's gradient in closed form from the items' tokens: with ``g`` the
    gradient at ``e_i``, ``w_i = gamma * (g - e_i (e_i . g)) / (|p_i| n_i)``,
    ``w' = w - mean(w)`` and ``c_t = xhat_t . w_i``, LayerNorm's backward gives
    ``dB = s * sum_i [ w'_i s_a,i^T - (1/dim) sum_t c_t xhat_t (rstd_t a_t)^T ]`` (the formula
    of :func:`_lora_tower_grad_sample`, summed over the batch's distinct items)."""

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, u: torch.Tensor, tower: LoRAItemTower, at: _CatalogAtB
    ) -> torch.Tensor:
        ctx.tower, ctx.at = tower, at
        ctx.save_for_backward(u)
        return at.e.index_select(0, u)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (u,) = ctx.saved_tensors
        tower, at = ctx.tower, ctx.at
        e, norm = at.e.index_select(0, u), at.norm.index_select(0, u)
        g_pooled = (g - e * (e * g).sum(-1, keepdim=True)) / norm
        w = tower.ln_weight * g_pooled / tower.counts[u].unsqueeze(1)  # dloss/dxhat_t (U, dim)
        wc = w - w.mean(-1, keepdim=True)
        tok, row, _ = tower.tokens(u)
        xhat = at.xhat.index_select(0, tok)  # (tokens, dim)
        c = (xhat * w.index_select(0, row)).sum(-1, keepdim=True)  # (tokens, 1)
        ra = at.rstd.index_select(0, tok) * tower.feats.index_select(0, tok)  # (tokens, r)
        term1 = (at.s_a.index_select(0, u).T @ wc).T  # (dim, r); operand order: see below
        term2 = ((c * ra).T @ xhat).T  # (dim, r), the fast single-thread GEMM layout
        return tower.scaling * (term1 - term2 / xhat.shape[1]), None, None, None


class _LowRankProduct(torch.autograd.Function):
    """``scale * a @ w.T`` for a tall ``a`` (tokens, k) and a small ``w`` (out, k), whose weight
    gradient is computed as ``(a.T @ g).T`` instead of autograd's ``g.T @ a``: the same sum, but
    the latter's operand layout makes a single-thread CPU GEMM about 7x slower at fedrec's shapes
    (4,000 tokens x 384 x 8: 3.6 ms against 0.5 ms), and it ran at every local step."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(a, w)
        ctx.scale = scale
        return a @ (w.T * scale)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, w = ctx.saved_tensors
        ga = g @ (w * ctx.scale) if ctx.needs_input_grad[0] else None
        gw = (a.T @ g).T.contiguous() * ctx.scale if ctx.needs_input_grad[1] else None
        return ga, gw, None


def low_rank_product(a: torch.Tensor, w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * (a @ w.T)`` with a fast weight gradient (:class:`_LowRankProduct`)."""
    return _LowRankProduct.apply(a, w, scale)


# Per-(example, item, token) floats of x gathered at once for dA (about 64 MB in float32).
_CHUNK_FLOATS = 16 * 2**20


@register_grad_sampler(LoRAItemTower)
def _lora_tower_grad_sample(
    layer: LoRAItemTower, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    items = activations[0]  # (batch, k)
    g = backprops  # (batch, k, dim)
    state = layer._state()
    with torch.no_grad():
        saved = layer._saved
        if (
            saved is not None
            and torch.equal(saved[0], items)
            and all(torch.equal(s, p) for s, p in zip(saved[12:], state, strict=True))
        ):
            u, inv, tok, row, slot, x, a, z, mu, rstd, pooled = saved[1:12]
        else:
            u, inv = torch.unique(items, return_inverse=True)
            tok, row, slot = layer.tokens(u)
            x, a, z, mu, rstd, pooled, _ = layer.embed(u, tok, row)
        dim = z.shape[-1]
        t_max = int(slot.max()) + 1 if slot.numel() else 1
        xhat = torch.zeros(u.shape[0], t_max, dim, dtype=z.dtype)
        xhat[row, slot] = (z - mu) * rstd  # (U, T, dim), 0 on padding
        abar = torch.zeros(u.shape[0], t_max, a.shape[1], dtype=z.dtype)
        abar[row, slot] = rstd * a  # (U, T, r)
        norm = pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
        e = (pooled / norm)[inv]  # (batch, k, dim)
        g_pooled = (g - e * (e * g).sum(-1, keepdim=True)) / norm[inv]
        w = layer.ln_weight * g_pooled / layer.counts[u][inv].unsqueeze(-1)  # dloss/dxhat_t
        wc = w - w.mean(-1, keepdim=True)  # (batch, k, dim)
        xg = xhat[inv]  # (batch, k, T, dim): the one per-(example, item) token tensor of dB
        c = torch.einsum("bktd,bkd->bkt", xg, w)
        term1 = torch.einsum("bkd,bkr->bdr", wc, abar.sum(1)[inv])
        term2 = torch.einsum("bktd,bktr->bdr", xg, c.unsqueeze(-1) * abar[inv]) / dim
        out = {layer.weight: layer.scaling * (term1 - term2)}
        if layer.a_weight is not None:
            b_w = layer.weight  # (dim, r)
            xr = rstd * x  # (tokens, inter)
            s_x = torch.zeros(u.shape[0], xr.shape[1], dtype=xr.dtype).index_add(0, row, xr)
            term1_a = torch.einsum("bkr,bki->bri", wc @ b_w, s_x[inv])
            q = c.unsqueeze(-1) * (xhat @ b_w)[inv]  # (batch, k, T, r)
            # x of every (example, item, token) is the big tensor: gather it a few examples
            # at a time, padding slots point at token 0 with weight 0 (their xhat is 0)
            pad = torch.zeros(u.shape[0], t_max, dtype=torch.long)
            pad[row, slot] = torch.arange(tok.shape[0])
            per_example = max(1, items.shape[1] * t_max * xr.shape[1])
            step = max(1, _CHUNK_FLOATS // per_example)
            term2_a = torch.cat(
                [
                    torch.einsum("bktr,bkti->bri", q[i : i + step], xr[pad[inv[i : i + step]]])
                    for i in range(0, items.shape[0], step)
                ]
            )
            out[layer.a_weight] = layer.scaling * (term1_a - term2_a / dim)
    return out


class CandidateScorer(nn.Module):
    """Batch-first scoring of per-example candidate sets, sharing ``model``'s parameters.

    ``forward(context (batch, L), candidates (batch, M), profile (batch, dim) | None)`` returns
    logits ``(batch, M)``. Context is right-aligned item indices with -1 padding (as in
    :func:`~.examples.right_aligned`). With ``model.cfg.ffa`` the frozen ``A(x)`` is cached per
    token (r numbers instead of ``inter``). On a LayerNorm backbone the item tower is a
    :class:`LoRAItemTower` (FFA-LoRA and FedAvg-LoRA); ``tower=False`` keeps the token path (the
    reference the tower is tested and benchmarked against).
    """

    tok_x: torch.Tensor  # the token path only (not with a LoRAItemTower)
    user_map_basis: torch.Tensor  # with model.user_map only
    offset_basis: torch.Tensor  # with model.item_offsets only
    tok_base: torch.Tensor
    tok_mask: torch.Tensor
    warm: torch.Tensor

    def __init__(self, model: RecModel, *, tower: bool = True) -> None:
        super().__init__()
        if model.additive:
            raise ValueError(
                "DP training implements the recency user tower only; "
                "model.user_tower='additive' is for central training"
            )
        if model.item_fac_ctx is not None:
            raise ValueError(
                "DP training implements symmetric item factors only; "
                "model.factor_context=true is for central training"
            )
        cache = model.cache
        if cache is None:
            raise ValueError("CandidateScorer needs the model's catalog cache (with_cache=True)")
        self.ffa = bool(model.cfg.ffa)
        site = adapter_site(model.backbone.base_model.model)
        lora = site.proj
        lora_A: nn.Linear = lora.lora_A["default"]
        self.scaling = float(lora.scaling["default"])
        # LoRA before an affine LayerNorm (BERT-style backbones): the catalog tower. Otherwise
        # (an RMSNorm backbone, or tower=False) the token path with Opacus' own Linear sampler.
        norm = site.norm
        fast = (
            tower
            and isinstance(norm, nn.LayerNorm)
            and norm.weight is not None
            and norm.bias is not None
        )
        if not fast:
            self.lora_A = lora_A
            self.lora_B: nn.Linear = lora.lora_B["default"]
            self.norm = norm
        self.bias = Gather(model.item_bias) if model.item_bias is not None else None
        self.fac = Gather(model.item_fac) if model.item_fac is not None else None
        # item offsets (RecModel.item_off): <P^T u, g_i> with P the public catalog basis
        self.off = Gather(model.item_off) if model.item_off is not None else None
        if model.item_off is not None:
            self.register_buffer("offset_basis", model.offset_basis, persistent=False)
        self.profile_fac = Project(model.profile_fac) if model.profile_fac is not None else None
        # the per-item rows (factors or offsets) a round trains, (n_items,) bool; None = all.
        # The other rows enter the scores as they are but get no gradient (detached below, so
        # each example's gradient there is exactly 0) and local training puts them back after
        # every step (no noise): see top_rows and client.local_train
        self.rows: torch.Tensor | None = None
        # the per-item ID table (no-DP training only: Opacus has no per-example sampler for it,
        # and a GradSampleModule around this scorer refuses it, see client.local_train)
        self.id_emb: nn.Parameter | None = model.id_emb
        self.recency = Gather(model.pos_logits)
        # the user map (RecModel.map_history): s + Q-map of (s P), Q per example through Project
        self.user_map = Project(model.user_map) if model.user_map is not None else None
        self.user_map_catalog = model.cfg.user_map_space == "catalog"
        if model.user_map is not None:
            self.register_buffer("user_map_basis", model.user_map_basis, persistent=False)
        self.scale = Broadcast(model.log_scale)
        self.gate = Broadcast(model.profile_gate)
        self.use_profile = bool(model.cfg.use_profile)
        self.history_len = int(model.cfg.history_len)
        if not self.ffa and cache.x is None:
            raise ValueError("FedAvg-LoRA trains A: it needs a catalog cache that holds x")
        # (n_tokens, r | inter)
        feats = cache.a_of(lora_A).detach() if self.ffa else cast(torch.Tensor, cache.x)
        self.tower: LoRAItemTower | None = None
        if fast:
            self.tower = LoRAItemTower(
                lora.lora_B["default"].weight,
                feats,
                cache.base,
                cache.segment,
                cache.counts,
                norm,
                self.scaling,
                a_weight=None if self.ffa else cast(nn.Parameter, lora_A.weight),
            )
        else:
            # Pad the packed token cache to (n_items, T, .) once: gathers are then plain indexing.
            counts = cache.counts.long()
            start = torch.cumsum(counts, 0) - counts
            pos = torch.arange(cache.segment.shape[0]) - start[cache.segment]
            shape = (cache.n_items, int(counts.max()))
            x = torch.zeros(*shape, feats.shape[1])
            x[cache.segment, pos] = feats
            base = torch.zeros(*shape, cache.base.shape[1])
            base[cache.segment, pos] = cache.base
            mask = torch.zeros(*shape, dtype=torch.bool)
            mask[cache.segment, pos] = True
            self.register_buffer("tok_x", x, persistent=False)  # (n_items, T, r | inter)
            self.register_buffer("tok_base", base, persistent=False)  # (n_items, T, dim)
            self.register_buffer("tok_mask", mask, persistent=False)  # (n_items, T)
        self.register_buffer("warm", model.warm.clone(), persistent=False)
        self.n_items = cache.n_items

    def item_vectors(
        self, items: torch.Tensor, text_only: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``items`` (batch, k) indices >= 0 -> (batch, k, dim) adapted unit item vectors.

        Text only, or with an ID table ``normalize(text + id_emb)`` for warm items not flagged
        ``text_only`` (batch, k) (as :meth:`RecModel.item_embeddings` and
        :meth:`RecModel.candidate_embeddings`)."""
        if self.id_emb is None and self.tower is not None:
            return self.tower(items)
        pooled = self.tower.pooled(items) if self.tower is not None else self._pooled(items)
        if self.id_emb is not None:
            keep = self.warm[items] if text_only is None else self.warm[items] & ~text_only
            pooled = pooled + self.id_emb[items] * keep.unsqueeze(-1)
        return F.normalize(pooled, dim=-1)

    def _hooked(self) -> bool:
        """Whether a module of this scorer has forward hooks (Opacus' GradSampleModule adds
        them to every trainable one): the per-example gradients then need the batch-first
        path, where each example's inputs reach each module in its own row."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _pooled(self, items: torch.Tensor) -> torch.Tensor:
        """The token path's mean-pooled adapted text embeddings (batch, k, dim), not normalized."""
        x = self.tok_x[items]  # (batch, k, T, r | inter)
        low = x if self.ffa else self.lora_A(x)  # (batch, k, T, r)
        h = self.norm(self.tok_base[items] + self.scaling * self.lora_B(low))  # (batch, k, T, dim)
        m = self.tok_mask[items].unsqueeze(-1).to(h.dtype)  # (batch, k, T, 1)
        return (h * m).sum(2) / m.sum(2)

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
        pos = torch.arange(self.history_len - n_ctx, self.history_len).expand(b, -1)
        logits_w = self.recency(pos).masked_fill(~valid, -torch.inf)  # (batch, L)
        w = torch.nan_to_num(torch.softmax(logits_w, dim=1), nan=0.0)
        # Without per-example gradients (no Opacus hooks: user-level DP, no DP), the batch's
        # distinct items are embedded once and never expanded to (batch, L + M, dim): the
        # context sum and the candidate dot products are products with the (U, dim) table
        # (in a one-user step about 80 distinct items against 16 x 71 gathered rows). The same
        # numbers as the batch-first path below (tests/test_candidates.py).
        distinct = self.tower is not None and self.id_emb is None and not self._hooked()
        if distinct:
            assert self.tower is not None
            u, inv = torch.unique(both, return_inverse=True)
            table = self.tower.unit(u)  # (U, dim)
            mix = torch.zeros(b, u.shape[0], dtype=w.dtype).scatter_add(1, inv[:, :n_ctx], w)
            user = mix @ table  # (batch, dim)
        else:
            text_only = None
            if self.id_emb is not None and as_cold is not None:
                text_only = torch.cat([torch.zeros_like(context, dtype=torch.bool), as_cold], dim=1)
            vecs = self.item_vectors(both, text_only)
            ctx_vecs, cand_vecs = vecs[:, :n_ctx], vecs[:, n_ctx:]
            user = (w.unsqueeze(-1) * ctx_vecs).sum(1)  # (batch, dim)
        if self.user_map is not None:
            delta = self.user_map(user @ self.user_map_basis)
            if self.user_map_catalog:
                delta = delta @ self.user_map_basis.T
            user = user + delta
        if profile is not None and self.use_profile:
            user = user + self.gate(profile).unsqueeze(1) * profile
        user = F.normalize(user, dim=-1)
        if distinct:  # every example against every distinct item, then its own candidates
            dots = (user @ table.T).gather(1, inv[:, n_ctx:])  # (batch, M)
        else:
            # a multiply and a sum, not a batched matrix-vector product: on one CPU thread the
            # batched GEMV (forward and both backward products) took about 3x longer at a
            # one-user step's (16, 51, 384)
            dots = (cand_vecs * user.unsqueeze(1)).sum(-1)
        scores = self.scale(context).exp().unsqueeze(1) * dots  # (batch, M)
        keep = self.warm[candidates]  # (batch, M)
        if as_cold is not None:
            keep = keep & ~as_cold
        if self.bias is not None:
            scores = scores + self.bias(candidates) * keep
        if self.fac is not None:
            # as RecModel.scores: u_f = sum_j w_j f_{h_j} over warm context items
            fac = self._selected(self.fac(both), both)  # (batch, L + M, k)
            wf = w * self.warm[context.clamp(min=0)]
            uf = (wf.unsqueeze(-1) * fac[:, :n_ctx]).sum(1)  # (batch, k)
            if self.profile_fac is not None and profile is not None:
                uf = uf + self.profile_fac(F.normalize(profile, dim=-1))
            scores = scores + (fac[:, n_ctx:] @ uf.unsqueeze(-1)).squeeze(-1) * keep
        if self.off is not None:
            # as RecModel.scores: <P^T u, g_i> on warm candidates, u the unit user vector
            uo = user @ self.offset_basis  # (batch, k)
            off = self._selected(self.off(candidates), candidates)
            scores = scores + (off @ uo.unsqueeze(-1)).squeeze(-1) * keep
        return scores

    def _selected(self, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per-item ``rows`` (batch, k, d) gathered for ``items`` (batch, k), detached where the
        item is not among :attr:`rows` (no gradient flows to an unselected row)."""
        if self.rows is None:
            return rows
        return torch.where(self.rows[items].unsqueeze(-1), rows, rows.detach())


def top_rows(bias: torch.Tensor, n: int) -> torch.Tensor:
    """The per-item rows a round trains (``factor-rows`` n > 0): a (n_items,) bool mask of the n
    items with the highest ``bias`` (ties to the lower index), or of none while ``bias`` is
    constant (not trained yet: before the first aggregation every item's is 0, and a top-n
    would be the first n items of the catalog).

    Privacy: ``bias`` is the global model's learned item bias, which the server released to
    every client; the mask is a function of it alone, so choosing rows is post-processing and
    reads none of the client's data."""
    b = bias.detach().reshape(-1)
    mask = torch.zeros(b.shape[0], dtype=torch.bool)
    if n <= 0 or b.numel() == 0 or bool((b == b[0]).all()):
        return mask
    order = torch.argsort(-b, stable=True)
    mask[order[:n]] = True
    return mask


def keyed_candidates(
    targets: torch.Tensor,
    context: torch.Tensor,
    *,
    n_items: int,
    negatives: int,
    key: bytes,
    step: int,
    cold_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example candidates ``(batch, 1 + negatives)`` and cold-dropout mask (same shape, or
    None when ``cold_dropout`` is 0), each row a function of that example's own content
    (target and context), a secret ``key`` and the public ``step`` only.

    Under per-example DP-SGD every example's loss must depend on that example and public data
    alone: negatives drawn from one stream in batch order would shift every later example's
    negatives when one example is added or removed, and the change to the clipped sum would no
    longer be bounded by the clip norm. Here example ``i`` seeds its own generator with
    ``blake2b(key, step, target_i, context_i)``; the same example gets the same draws whatever
    else is in the batch (``tests/test_dp_training.py``). ``key`` is fresh OS randomness per
    round (the server must not know it). Two identical examples draw the same negatives, which
    is harmless: each still depends on itself only.
    """
    t = targets.numpy().astype(np.int64)
    c = context.numpy().astype(np.int64)
    neg = np.empty((t.shape[0], negatives), dtype=np.int64)
    cold = np.empty((t.shape[0], 1 + negatives), dtype=bool) if cold_dropout > 0 else None
    head = key + int(step).to_bytes(8, "little")
    for i in range(t.shape[0]):
        ctx = c[i][c[i] >= 0]  # the padding width depends on the batch: hash the items only
        digest = hashlib.blake2b(head + t[i].tobytes() + ctx.tobytes(), digest_size=16).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
        neg[i] = rng.integers(n_items, size=negatives)
        if cold is not None:
            cold[i] = rng.random(1 + negatives) < cold_dropout
    cands = torch.cat([targets.unsqueeze(1), torch.from_numpy(neg)], dim=1)
    return cands, (torch.from_numpy(cold) if cold is not None else None)


def shared_candidates(
    targets: torch.Tensor,
    *,
    n_items: int,
    negatives: int,
    key: bytes,
    step: int,
    cold_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidates ``(batch, 1 + negatives)``: each example's target, then ONE set of
    ``negatives`` items shared by the whole batch, drawn from ``blake2b(key, step)`` alone; the
    cold-dropout mask (same shape, or None): the negatives' flags shared from the same stream,
    each target's from ``blake2b(key, step, target)``.

    The draws depend on the secret per-round ``key`` and the public ``step`` only, never on the
    data, so each example's loss is still a function of that example and data-independent
    randomness (what per-example DP-SGD needs, as with :func:`keyed_candidates`). What changes is
    the cost: the item tower embeds each distinct item of a step once, and a batch of ``b``
    examples touches about ``b + negatives`` items (its targets, the shared set, the context)
    instead of about ``b * (1 + negatives)``. Every example of a step meets the same negatives:
    the gradient of one step is less diverse, not biased (each set is uniform over the catalog).
    """
    head = key + b"shared" + int(step).to_bytes(8, "little")
    digest = hashlib.blake2b(head, digest_size=16).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    neg = torch.from_numpy(rng.integers(n_items, size=negatives)).expand(targets.shape[0], -1)
    cands = torch.cat([targets.long().unsqueeze(1), neg], dim=1)
    cold = None
    if cold_dropout > 0:
        # the shared negatives' flags are shared too; a target's flag comes from its own item
        # (a row drawn by batch position would change when an example before it is added)
        cold = torch.empty(cands.shape, dtype=torch.bool)
        cold[:, 1:] = torch.from_numpy(rng.random(negatives) < cold_dropout)
        for i, t in enumerate(targets.tolist()):
            d = hashlib.blake2b(head + b"cold" + int(t).to_bytes(8, "little"), digest_size=8)
            cold[i, 0] = int.from_bytes(d.digest(), "little") / 2.0**64 < cold_dropout
    return cands, cold


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
