"""The recommender: a LoRA-adapted text item tower, a history/profile user tower, one score.

Item tower
    ``e_i = normalize(text_i + id_i)``: ``text_i`` is the mean-pooled output of the backbone with
    a LoRA adapter (PEFT) on its last layer's FFN output projection, computed from the frozen
    catalog cache (:mod:`.catalog_cache`); ``id_i`` is an optional learned residual, used only
    for items seen in training (``warm``), so a cold or new item falls back to its text.
User tower
    ``u = normalize(sum_j w_j e_{h_j} + g * p)`` over the ``history_len`` most recent history
    items ``h_j`` (time order), with ``w = softmax(position logits)`` learned per recency
    position (the model learns how much the last item matters versus older ones), and ``p`` the
    profile text embedding (frozen backbone) scaled by a learned gate ``g``. With
    ``model.user_map = r`` the history part ``s = sum_j w_j e_{h_j}`` first goes through a learned
    map ``s + (s P) Q`` (``P`` a frozen seeded ``(dim, r)`` basis, ``Q`` learned, zero at init):
    a transition from the items watched to where the next one lies in the item space.
    That is the default ``recency`` tower. Its final normalization gives a user with one item,
    or with only a profile, a vector as long as a user with fifty: the learned gate ``g`` (small,
    since with a history the profile is a slight tilt) is undone, and the profile alone decides
    the ranking of a new user. The ``additive`` tower, for cold users, is
    ``u = sum_j w_j e_{h_j} + g * normalize(p)`` with ``w`` the softmax over all ``history_len``
    slots (an empty slot keeps its share, as zero) and no normalization: how much a profile, or
    each item given, counts is what training found, not reset by a normalization. What carries
    a new user's ranking is then learned: in the trained protocol C models it is the profile
    term (every profile text shares a common direction in the frozen encoder's space, and
    training lines popular items up with it), while the item bias stays small (std 0.02).
    A free-text query is encoded by the adapted item tower, as if it were an item description.
Score
    ``s(u, i) = scale * <u, e_i> + b_i``, ``b_i`` an optional learned item bias (0 for items
    never trained). With no history and no profile, ``u = 0`` and the ranking is by ``b``.

Why LoRA on that one projection: see :mod:`.catalog_cache`; it turns the per-step item tower
from a transformer pass over the catalog into a small low-rank update per cached token.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from fedrec.shared.backbone import mean_pool
from fedrec.shared.model.catalog_cache import (
    CatalogCache,
    adapter_site,
    load_or_build_catalog_cache,
)
from fedrec.shared.model.config import ModelConfig


def lora_config(cfg: ModelConfig, target: str) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, takes float
        lora_dropout=0.0,
        target_modules=target,
        bias="none",
    )


class RecModel(nn.Module):
    """Backbone + LoRA (PEFT) + item/user towers over a fixed catalog of ``n_items`` texts."""

    warm: torch.Tensor  # (n_items,) bool buffer: item seen in training
    user_map_basis: torch.Tensor  # (dim, r) frozen buffer, with model.user_map = r only
    offset_basis: torch.Tensor  # (dim, k) frozen buffer, with model.item_offsets = k only
    cold_prior: torch.Tensor  # (dim + 1,) buffer: the cold prior's linear function, or 0
    cold_prior_items: torch.Tensor  # (n_items,) buffer: its value per never-trained item
    backbone: Any  # peft.PeftModel around the transformers encoder

    def __init__(
        self,
        base: Any,
        tokenizer,  # noqa: ANN001 - a transformers tokenizer
        item_texts: Sequence[str],
        cfg: ModelConfig,
        *,
        warm_items: np.ndarray | None = None,
        with_cache: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.item_texts = list(item_texts)
        n_items = len(self.item_texts)
        for p in base.parameters():
            p.requires_grad_(False)
        # Captured BEFORE the adapter is attached: the cached inputs do not depend on it.
        # Inference needs no cache: it embeds the catalog once by the plain path and keeps that.
        # With FFA-LoRA (A frozen) the cache keeps A(x), built after the adapter is attached.
        compact = with_cache and cfg.ffa
        self.cache: CatalogCache | None = (
            load_or_build_catalog_cache(base, tokenizer, self.item_texts, max_length=cfg.max_length)
            if with_cache and not compact
            else None
        )
        torch.manual_seed(cfg.seed)  # LoRA's A init is seeded: FFA-LoRA needs a shared A
        target = adapter_site(base).target
        with warnings.catch_warnings():
            # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecates; the
            # warning is about the two libraries, not about anything fedrec does or can fix.
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
            )
            self.backbone = get_peft_model(base, lora_config(cfg, target))
        lora = self.lora_layer()
        if cfg.ffa:
            lora.lora_A["default"].weight.requires_grad_(False)
        if compact:
            # the adapter site's input x is upstream of the adapter: attaching it first changes
            # nothing captured, and x is kept only as A(x) (never held whole: less memory)
            self.cache = load_or_build_catalog_cache(
                base,
                tokenizer,
                self.item_texts,
                max_length=cfg.max_length,
                project=lora.lora_A["default"],
            )
        dim = int(base.config.hidden_size)
        self.dim = dim
        warm = torch.zeros(n_items, dtype=torch.bool)
        if warm_items is not None:
            warm[torch.as_tensor(warm_items, dtype=torch.long)] = True
        self.register_buffer("warm", warm)
        self.id_emb = nn.Parameter(torch.zeros(n_items, dim)) if cfg.id_residual else None
        self.item_bias = nn.Parameter(torch.zeros(n_items)) if cfg.item_bias else None
        # the text-predicted popularity of items never trained (shared/model/cold_prior.py):
        # zeros until central training attaches one; (dim + 1) linear function of a frozen text
        # embedding, and its value for each catalog item (0 for trained ones)
        self.register_buffer("cold_prior", torch.zeros(int(base.config.hidden_size) + 1))
        self.register_buffer("cold_prior_items", torch.zeros(n_items))
        # '' = the prior reads this model's frozen backbone; else the name or folder of the
        # encoder it reads (its own width: ``cold_prior`` is then that encoder's dim + 1)
        self.cold_prior_backbone = ""
        self.cold_prior_fingerprint = ""  # that encoder's, when loaded from a saved model
        self.item_fac: nn.Parameter | None = None
        if cfg.item_factors:
            g = torch.Generator().manual_seed(cfg.seed + 1)
            init = torch.randn(n_items, cfg.item_factors, generator=g) * cfg.factor_init
            self.item_fac = nn.Parameter(init)
        self.item_fac_ctx: nn.Parameter | None = None  # (n_items, k): the history side's table
        if cfg.factor_context:
            g = torch.Generator().manual_seed(cfg.seed + 2)
            init = torch.randn(n_items, cfg.item_factors, generator=g) * cfg.factor_init
            self.item_fac_ctx = nn.Parameter(init)
        self.profile_fac: nn.Parameter | None = None  # (k, dim): the profile into factor space
        if cfg.profile_factors:
            self.profile_fac = nn.Parameter(
                torch.zeros(cfg.item_factors, int(base.config.hidden_size))
            )
        # item offsets: (n_items, k) learned, zero at init; P the catalog's top-k principal
        # directions (public), recomputed from the frozen catalog like the catalog user map's
        self.item_off: nn.Parameter | None = None
        if not cfg.item_offsets:
            self.register_buffer("offset_basis", None, persistent=False)
        else:
            self.register_buffer(
                "offset_basis", self._catalog_basis(cfg.item_offsets), persistent=False
            )
            self.item_off = nn.Parameter(torch.zeros(n_items, cfg.item_offsets))
        # the user map (map_history). ``free``: Q stored transposed, (dim, r), so that
        # ``x @ user_map.T`` maps the r-dim projection back (the federation's Project module),
        # P rebuilt from the seed. ``catalog``: M (r, r) and P the catalog's principal basis
        # (public), computed here and saved with the model.
        self.user_map: nn.Parameter | None = None
        if not cfg.user_map:
            self.register_buffer("user_map_basis", None, persistent=False)
        else:
            r = cfg.user_map
            if cfg.user_map_space == "catalog":
                basis = self._catalog_basis(r)
                self.user_map = nn.Parameter(torch.zeros(r, r))
            else:
                g = torch.Generator().manual_seed(cfg.seed + 2)
                basis = torch.randn(dim, r, generator=g) / float(np.sqrt(r))
                self.user_map = nn.Parameter(torch.zeros(dim, r))
            self.register_buffer("user_map_basis", basis, persistent=False)
        self.pos_logits = nn.Parameter(torch.zeros(cfg.history_len))
        self.profile_gate = nn.Parameter(torch.tensor(0.5 if cfg.use_profile else 0.0))
        self.profile_gate.requires_grad_(cfg.use_profile)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(cfg.init_scale))))
        self.log_scale.requires_grad_(cfg.train_scale)

    # --- the adapter -------------------------------------------------------------------------
    def lora_layer(self) -> Any:
        return adapter_site(self.backbone.base_model.model).proj

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The LoRA tensors that travel in federated rounds (A and B, or only B with FFA)."""
        lora = self.lora_layer()
        params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
        return [p for p in params if p.requires_grad]

    # --- item tower --------------------------------------------------------------------------
    def text_embeddings(self, batch_size: int = 256) -> torch.Tensor:
        """``(n_items, dim)`` adapted, mean-pooled catalog text embeddings: from the catalog
        cache, or without one (a loaded model) by full backbone passes in batches."""
        c = self.cache
        if c is None:
            texts = self.item_texts
            return torch.cat(
                [
                    self.encode_texts(texts[s : s + batch_size])
                    for s in range(0, len(texts), batch_size)
                ]
            )
        site = adapter_site(self.backbone.base_model.model)
        lora = site.proj
        delta = lora.lora_B["default"](c.a_of(lora.lora_A["default"])) * lora.scaling["default"]
        h = site.norm(c.base + delta)  # (n_tokens, dim)
        pooled = torch.zeros(c.n_items, h.shape[1], dtype=h.dtype).index_add_(0, c.segment, h)
        return pooled / c.counts.unsqueeze(1)

    def encode_texts(self, texts: Sequence[str], *, adapted: bool = True) -> torch.Tensor:
        """``(len(texts), dim)`` mean-pooled embeddings by a full backbone pass (plain path).

        ``adapted=False`` disables the LoRA adapter (the frozen backbone: profiles).
        """
        tok = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.cfg.max_length,
            return_tensors="pt",
        )
        if adapted:
            hidden = self.backbone(**tok).last_hidden_state
        else:
            # PEFT's disable_adapter() marks the adapter trainable again on exit, which would
            # unfreeze FFA-LoRA's A: keep every parameter's requires_grad as it was.
            flags = [(p, p.requires_grad) for p in self.parameters()]
            try:
                with self.backbone.disable_adapter():
                    hidden = self.backbone(**tok).last_hidden_state
            finally:
                for p, flag in flags:
                    p.requires_grad_(flag)
        return mean_pool(hidden, tok["attention_mask"])

    def item_embeddings(self, text: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_items, dim)`` unit item vectors: text (+ ID residual for warm items)."""
        text = self.text_embeddings() if text is None else text
        if self.id_emb is not None:
            text = text + self.id_emb * self.warm.unsqueeze(1)
        return F.normalize(text, dim=-1)

    def biases(self, as_cold: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_items,)`` learned offsets; 0 for items flagged ``as_cold``; for items never
        trained, the cold prior's text-predicted popularity (0 unless one is attached)."""
        prior = self.cold_prior_items  # 0 on trained items
        if self.item_bias is None:
            return prior.clone()
        keep = self.warm if as_cold is None else self.warm & ~as_cold
        return self.item_bias * keep + prior

    @torch.no_grad()
    def set_cold_prior(self, fn: torch.Tensor, items: torch.Tensor, backbone: str = "") -> None:
        """Store a cold prior: ``fn`` (width + 1) its linear function of a normalized text
        embedding of ``backbone`` ('' = this model's frozen backbone, width ``dim``), ``items``
        (n_items,) its value per catalog item (0 on trained ones)."""
        width = self.dim if not backbone else None
        if fn.ndim != 1 or fn.numel() < 2 or (width is not None and fn.numel() != width + 1):
            raise ValueError(
                f"cold prior: a linear function of {tuple(fn.shape)} does not fit "
                + (f"this model's {width}-wide embeddings" if width else "an embedding")
            )
        if items.shape != self.cold_prior_items.shape:
            raise ValueError(
                f"cold prior: {tuple(items.shape)} item values for {self.warm.numel()}"
            )
        self.cold_prior = fn.to(torch.float32).clone()  # a buffer: replaced, any width
        self.cold_prior_items.copy_(items)
        self.cold_prior_backbone = str(backbone)
        self.cold_prior_fingerprint = ""

    def cold_prior_of(self, frozen: torch.Tensor) -> torch.Tensor:
        """The cold prior's bias for new items from their frozen text embeddings ``frozen``
        (n, width) by the prior's encoder (:attr:`cold_prior_backbone`; this model's own frozen
        backbone when ''), normalized here; 0 when no prior is attached."""
        if frozen.shape[-1] + 1 != self.cold_prior.numel():
            raise ValueError(
                f"cold prior: embeddings {frozen.shape[-1]} wide, the prior reads "
                f"{self.cold_prior.numel() - 1} ({self.cold_prior_backbone or 'this model'})"
            )
        x = F.normalize(frozen, dim=-1)
        return x @ self.cold_prior[:-1] + self.cold_prior[-1]

    def candidate_embeddings(
        self, text: torch.Tensor, items: torch.Tensor, as_cold: torch.Tensor
    ) -> torch.Tensor:
        """``items`` with the rows flagged ``as_cold`` (n_items,) bool replaced by text only."""
        cold = F.normalize(text, dim=-1)
        return torch.where(as_cold.unsqueeze(1), cold, items)

    # --- user tower --------------------------------------------------------------------------
    @property
    def additive(self) -> bool:
        return self.cfg.user_tower == "additive"

    def history_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """``(batch, L)`` weights over right-aligned history slots; 0 where ``mask`` is False.

        ``recency`` tower: they sum to 1 over the items present; ``additive``: to the present
        slots' share of all ``history_len`` slots.
        """
        if self.additive:
            return torch.softmax(self.pos_logits, dim=0) * mask
        logits = self.pos_logits.expand(mask.shape[0], -1).masked_fill(~mask, -torch.inf)
        w = torch.softmax(logits, dim=1)
        return torch.nan_to_num(w, nan=0.0)  # an empty history: all weights 0

    @torch.no_grad()
    def _catalog_basis(self, r: int) -> torch.Tensor:
        """``(dim, r)`` orthonormal: the top-``r`` right singular vectors of the frozen (LoRA B
        still zero) unit catalog text embeddings, uncentered (the common direction included),
        in float64; each column's sign fixed so that its largest entry is positive."""
        if r > self.dim:
            raise ValueError(f"model.user_map={r} exceeds the backbone's width {self.dim}")
        texts = self.item_texts
        frozen = (
            self.text_embeddings()
            if self.cache is not None
            else torch.cat(
                [
                    self.encode_texts(texts[s : s + 256], adapted=False)
                    for s in range(0, len(texts), 256)
                ]
            )
        )
        e = F.normalize(frozen.double(), dim=-1)
        _, _, vh = torch.linalg.svd(e, full_matrices=False)
        basis = vh[:r].T  # (dim, r)
        flip = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        return (basis * flip).float()

    def map_history(self, s: torch.Tensor) -> torch.Tensor:
        """The user map on history vectors ``s`` (..., dim): ``s + (s P) Q`` (``s`` without one).

        Linear, so it can be applied to each history item's weighted term separately (the
        explanations) and the terms still sum to the mapped history vector."""
        if self.user_map is None:
            return s
        delta = (s @ self.user_map_basis) @ self.user_map.T
        if self.cfg.user_map_space == "catalog":
            delta = delta @ self.user_map_basis.T  # back from the subspace
        return s + delta

    def profile_term(self, profile: torch.Tensor) -> torch.Tensor:
        """The profile's part of the user vector, before any normalization."""
        return self.profile_gate * (F.normalize(profile, dim=-1) if self.additive else profile)

    def user_embeddings(
        self,
        items: torch.Tensor,
        history: torch.Tensor,
        profile: torch.Tensor | None = None,
        *,
        factors: bool = True,
    ) -> torch.Tensor:
        """``items`` (n_items, dim); ``history`` (batch, L) item indices right-aligned, -1 = pad;
        ``profile`` (batch, dim) or None. Returns (batch, dim): unit vectors (0 when empty) for
        the ``recency`` tower, vectors of norm <= 1 + gate for the ``additive`` one; with item
        factors, (batch, dim + k): the factor part ``sum_j w_j f_{h_j}`` (warm items only)
        appended, which :meth:`scores` splits off again. ``factors=False``: the text part only
        (``history`` may then index another catalog order, e.g. an inference index with added
        items)."""
        w = self.history_weights(history >= 0)  # (batch, L)
        e = items[history.clamp(min=0)]  # (batch, L, dim)
        u = self.map_history((w.unsqueeze(-1) * e).sum(1))  # (batch, dim)
        if profile is not None and self.cfg.use_profile:
            u = u + self.profile_term(profile)
        u = u if self.additive else F.normalize(u, dim=-1)
        if self.item_off is not None and factors:
            return torch.cat([u, u @ self.offset_basis], dim=1)
        if self.item_fac is None or not factors:
            return u
        idx = history.clamp(min=0)
        wf = w * self.warm[idx]  # a cold item's factors were never trained
        side = self.item_fac if self.item_fac_ctx is None else self.item_fac_ctx
        uf = (wf.unsqueeze(-1) * side[idx]).sum(1)
        if self.profile_fac is not None and profile is not None:
            uf = uf + F.normalize(profile, dim=-1) @ self.profile_fac.T
        return torch.cat([u, uf], dim=1)

    def factors(self, as_cold: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(n_items, k)`` item factors (or item offsets), 0 for items never trained or flagged
        ``as_cold``."""
        table = self.item_fac if self.item_fac is not None else self.item_off
        if table is None:
            return None
        keep = self.warm if as_cold is None else self.warm & ~as_cold
        return table * keep.unsqueeze(1)

    def scores(
        self, users: torch.Tensor, items: torch.Tensor, as_cold: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(batch, n_items)`` = scale * <u, e> + b (b = 0 for items flagged ``as_cold``), plus
        ``<u_f, f_i>`` with item factors (``users`` then carries ``u_f`` in its last k columns,
        as :meth:`user_embeddings` gives it), or ``<P^T u, g_i>`` with item offsets (the last k
        columns then carry ``P^T u``)."""
        fac = self.factors(as_cold)
        if fac is None:
            return self.log_scale.exp() * users @ items.T + self.biases(as_cold)
        text, uf = users[:, : self.dim], users[:, self.dim :]
        return self.log_scale.exp() * text @ items.T + self.biases(as_cold) + uf @ fac.T
