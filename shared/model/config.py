"""Model and training settings: one typed, validated object each (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from fedrec.shared.settings import SettingWarning, parse_fields


def _check(cond: bool, key: str, value: object, need: str) -> None:
    if not cond:
        raise ValueError(f"config key '{key}' = {value!r} is invalid: {need}")


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Build a config dataclass from a dict (the one settings parser,
    :func:`fedrec.shared.settings.parse_fields`); unknown keys raise naming the key."""
    return parse_fields(cls, data, where=where)


USER_TOWERS = ("recency", "additive")
EXAMPLES = ("sequence", "set")


@dataclass(frozen=True)
class ModelConfig:
    """The recommender's shape.

    ``lora_r``/``lora_alpha``: LoRA on the backbone's last layer's FFN output projection (see
    :mod:`fedrec.shared.model.towers` for why that layer). ``ffa``: FFA-LoRA, A frozen at its
    seeded init and only B trained. ``history_len``: how many most recent items the user tower
    reads. ``id_residual``: a learned per-item vector added to the text embedding of items seen
    in training (cold items fall back to text). ``item_bias``: a learned per-item score offset.
    ``train_scale``: learn the score scale (else it stays ``init_scale``). ``cold_dropout``: during
    training, the fraction of catalog items scored as if cold (text
    only: no ID residual, no bias) on the candidate side, so that the model learns to rank
    items it has no ID for against users whose history it does (protocol B, new items).
    ``item_factors``: ``k`` > 0 adds a learned per-item ``k``-vector ``f_i`` (warm items only) and
    the term ``<sum_j w_j f_{h_j}, f_i>`` to the score (the history's recency weights ``w``): a
    low-rank collaborative part (FISM-style item-item factors) that is ``n_items * k`` numbers,
    small enough to travel under user-level DP, unlike the ``(n_items, dim)`` ID table.
    ``factor_init``: the std of their seeded random init (a zero init would never move: the
    term's gradient in ``f`` is proportional to ``f``). ``profile_factors``: with item factors
    and profiles, the profile also enters the factor space: ``u_f = sum_j w_j f_{h_j} + P p``
    (``P`` a learned ``k x dim`` map of the unit profile embedding, zero at init), so
    ``<P p, f_i>`` is a learned rank-k profile-by-item preference (what a cold user's profile
    says about each item beyond the text similarity).
    ``factor_context``: with item factors, the history side reads a second per-item table
    ``c_j`` (seeded random like ``f``): ``<sum_j w_j c_{h_j}, f_i>``, an asymmetric
    "given these, then that" transition instead of FISM's symmetric similarity (central
    training only: the DP candidate path refuses it).
    ``item_offsets``: ``k`` > 0 adds a learned per-item ``k``-vector ``g_i`` (warm items only,
    zero at init) and the term ``<P^T u, g_i>`` to the score, ``u`` the user vector and ``P`` the
    top-``k`` principal directions of the frozen catalog text embeddings (public, as the catalog
    user map's): an item's own offset from its text, seen through the user's position in the
    catalog's main directions. Unlike the item factors it is linear in the learned table, so the
    first gradient already moves it (``g_i`` gathers the users that chose item ``i``), and only the
    candidate side is per item: ``n_items * k`` numbers that can travel under user-level DP.
    ``user_map``: ``r`` > 0 adds a learned linear map on the history part of the user vector,
    ``s -> s + (s P) Q`` with ``s = sum_j w_j e_{h_j}``, ``P`` a seeded random ``(dim, r)`` basis
    (frozen, entries of variance 1/r) and ``Q`` a learned ``(r, dim)`` map, zero at init (the
    model starts as the plain tower). It learns where in the item space a user's next item lies
    given the items before it (a transition, not a similarity: ``<s + sPQ, e_i>`` is not
    symmetric in the items), with ``r * dim`` shared numbers that every example's gradient
    reaches, unlike per-item tables; it works on text, so it also maps cold items' vectors.
    ``user_map_space``: ``free`` (the above) or ``catalog``: ``s -> s + (s P) M P^T`` with ``P``
    the top-``r`` principal directions of the frozen catalog text embeddings (public data; an
    orthonormal ``(dim, r)`` basis) and ``M`` a learned ``r x r`` map, zero at init: a
    transition inside the subspace where the catalog varies most, with ``r^2`` numbers, whose
    noise under DP enters the user vector with ``sqrt(r)`` instead of ``sqrt(dim)``.
    ``user_tower``: how history and profile combine (see :mod:`fedrec.shared.model.towers`):
    ``recency`` renormalizes the weights over the items present and the sum to unit length;
    ``additive`` keeps the weights over all ``history_len`` slots and does not renormalize, so a
    short or empty history gives a short user vector, and the weight a profile or a few items
    get is the one training found (cold users). ``profile_template``: how a user's profile fields
    become the profile text the model reads, e.g. ``"A {age}-year-old {gender} {occupation}."``
    ("" = the data set's own template), see
    :func:`fedrec.shared.model.run_central.with_profile_template`.
    """

    backbone: str = "minilm"  # minilm (the built-in default), smollm2, or a local HF model folder
    max_length: int = 48  # tokens per item text
    lora_r: int = 8
    lora_alpha: float = 16.0
    ffa: bool = False
    history_len: int = 50
    use_profile: bool = True  # read the user's profile text
    id_residual: bool = True
    item_bias: bool = True
    init_scale: float = 20.0
    train_scale: bool = True
    cold_dropout: float = 0.0
    user_tower: str = "recency"
    item_factors: int = 0
    factor_init: float = 0.1
    profile_factors: bool = False
    factor_context: bool = False
    item_offsets: int = 0
    user_map: int = 0
    user_map_space: str = "free"
    profile_template: str = ""
    seed: int = 0  # seed of the model's init

    def __post_init__(self) -> None:
        _check(
            self.user_tower in USER_TOWERS, "user_tower", self.user_tower, " or ".join(USER_TOWERS)
        )
        _check(0 <= self.cold_dropout < 1, "cold_dropout", self.cold_dropout, "0 <= p < 1")
        _check(8 <= self.max_length <= 512, "max_length", self.max_length, "8..512 tokens")
        _check(1 <= self.lora_r <= 256, "lora_r", self.lora_r, "1..256")
        _check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "> 0")
        _check(1 <= self.history_len <= 1000, "history_len", self.history_len, "1..1000")
        _check(0 <= self.item_factors <= 256, "item_factors", self.item_factors, "0..256")
        _check(0 <= self.item_offsets <= 256, "item_offsets", self.item_offsets, "0..256")
        _check(
            not (self.item_offsets and self.item_factors),
            "item_offsets",
            self.item_offsets,
            "0 when item_factors > 0 (one per-item term at a time)",
        )
        _check(0 <= self.user_map <= 1024, "user_map", self.user_map, "0..1024 (a rank)")
        _check(
            self.user_map_space in ("free", "catalog"),
            "user_map_space",
            self.user_map_space,
            "free or catalog",
        )
        _check(0 < self.factor_init <= 1, "factor_init", self.factor_init, "0 < std <= 1")
        _check(
            not self.profile_factors or (self.item_factors > 0 and self.use_profile),
            "profile_factors",
            self.profile_factors,
            "needs item_factors > 0 and use_profile = true",
        )
        _check(
            not self.factor_context or self.item_factors > 0,
            "factor_context",
            self.factor_context,
            "needs item_factors > 0",
        )
        _check(0 < self.init_scale <= 100, "init_scale", self.init_scale, "0 < scale <= 100")


@dataclass(frozen=True)
class TrainConfig:
    """Central training: epochs over all examples, Adam, best epoch kept by validation NDCG@10.

    ``examples``: ``sequence`` (next item from the items before it, the warm protocol's task) or
    ``set`` (an item from a random subset of the user's other items, of random size, resampled
    every epoch: the cold protocols' task, where the items to find lie anywhere in the user's
    timeline); see :mod:`fedrec.shared.model.examples`. ``set_max_context``: the largest context
    a ``set`` example draws (0 = ``history_len``). ``mask_positives``: leave all of the user's
    training items out of each example's softmax, not only its context (they are not
    negatives; set-style prediction). ``holdout`` (protocols B and C only,
    which have no validation queries): the fraction of trained items (B) or users (C) held out
    of training as pseudo-cold ones, to choose the best epoch on (see
    :func:`fedrec.shared.splitting.holdout_split`); 0 = train on everything, keep the last epoch.
    ``cold_prior``: after training, give items never trained a popularity predicted from their
    text, this many logits per unit of log count (:mod:`fedrec.shared.model.cold_prior`; it
    reads the training counts, so central training only); 0 = none. ``cold_prior_backbone``:
    the encoder whose embeddings of the catalog texts that regression reads ('' = the model's
    own frozen backbone; e.g. ``mpnet``): the federation's ``cold-prior-backbone``.
    ``segment_prior`` (protocol C only; ``age``, ``gender`` or ``age,gender``): after training,
    rank new users by ``segment_weight`` x log of their segment's item distribution in the
    training data plus the model's score, the federated ``segment-prior``'s scorer with exact
    counts (:mod:`fedrec.shared.federation.segments`); "" = none.
    """

    epochs: int = 8  # passes over the training examples
    batch_size: int = 512  # examples per step
    lr: float = 2e-3  # Adam learning rate of the adapter and head
    lr_id: float = 5e-3  # Adam learning rate of the per-item tables (ID vectors, item factors)
    weight_decay: float = 0.0  # Adam weight decay
    patience: int = 2  # epochs without a better validation NDCG@10 before stopping
    max_steps: int = 0  # 0 = no cap; a cap is for smoke runs
    examples: str = "sequence"
    set_max_context: int = 0
    mask_positives: bool = False
    holdout: float = 0.0
    cold_prior: float = 0.0
    cold_prior_backbone: str = ""
    segment_prior: str = ""
    segment_weight: float = 100.0
    seed: int = 0  # seed of the example order and negatives

    def __post_init__(self) -> None:
        _check(self.examples in EXAMPLES, "examples", self.examples, " or ".join(EXAMPLES))
        _check(self.set_max_context >= 0, "set_max_context", self.set_max_context, ">= 0")
        _check(0 <= self.holdout < 1, "holdout", self.holdout, "0 <= fraction < 1")
        _check(0 <= self.cold_prior <= 100, "cold_prior", self.cold_prior, "0..100")
        _check(
            not self.cold_prior_backbone or self.cold_prior > 0,
            "cold_prior_backbone",
            self.cold_prior_backbone,
            "'' unless cold_prior > 0 (it says which encoder the cold prior reads)",
        )
        _check(0 < self.segment_weight <= 1e6, "segment_weight", self.segment_weight, "(0, 1e6]")
        fields = [f.strip() for f in self.segment_prior.split(",") if f.strip()]
        _check(
            all(f in ("age", "gender") for f in fields) and len(set(fields)) == len(fields),
            "segment_prior",
            self.segment_prior,
            "a comma list of the profile fields age, gender (each once), or '' for none",
        )
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(1 <= self.batch_size <= 65536, "batch_size", self.batch_size, "1..65536")
        _check(0 < self.lr < 1, "lr", self.lr, "0 < lr < 1")
        _check(0 < self.lr_id < 1, "lr_id", self.lr_id, "0 < lr_id < 1")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.patience >= 1, "patience", self.patience, ">= 1")
        _check(self.max_steps >= 0, "max_steps", self.max_steps, ">= 0")
        if self.max_steps and self.epochs > 1:
            warnings.warn(
                f"max_steps={self.max_steps} caps training; epochs={self.epochs} may not all run",
                SettingWarning,
                stacklevel=2,
            )


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
