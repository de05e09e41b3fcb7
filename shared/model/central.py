"""Central (non-federated, non-private) training: the reference upper bound for fedrec.

Loss: full softmax over the whole catalog per example (the catalog is public and, thanks to the
cached item tower, cheap to embed at every step), the example's own context items masked out
(evaluation excludes known items too). Each example's loss depends only on that example and the
public catalog: no in-batch negatives, so the same loss is valid per example under DP-SGD.

Run: ``fedrec train-central --protocol A --out runs/central-A`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.shared.backbone import load_backbone
from fedrec.shared.evaluation import evaluate
from fedrec.shared.model.config import ModelConfig, TrainConfig
from fedrec.shared.model.examples import right_aligned, sequence_examples, set_examples
from fedrec.shared.model.towers import RecModel
from fedrec.shared.splitting import Split


def example_loss(
    model: RecModel,
    items: torch.Tensor,
    context: torch.Tensor,
    targets: torch.Tensor,
    profiles: torch.Tensor | None,
    *,
    reduction: str = "mean",
    text: torch.Tensor | None = None,
    as_cold: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-catalog softmax cross-entropy; ``context`` (batch, L) is masked out of the softmax.

    ``offset`` (batch, n_items): a fixed log-prior added to the logits (e.g. the log of the
    user's segment popularity), so that the model learns only what is left over it.

    With ``as_cold`` (n_items,) bool and the items' ``text`` embeddings, the flagged items are
    scored as cold items are (text only, no bias) on the candidate side. ``positives`` (batch,
    n_items) bool: more items to mask out (the user's other items, which are not negatives).
    """
    users = model.user_embeddings(items, context, profiles)  # (batch, dim)
    if as_cold is not None and text is not None:
        candidates = model.candidate_embeddings(text, items, as_cold)
        logits = model.scores(users, candidates, as_cold)  # (batch, n_items)
    else:
        logits = model.scores(users, items)  # (batch, n_items)
    if offset is not None:
        logits = logits + offset
    known = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(context.shape[0]).unsqueeze(1).expand_as(context)
    valid = context >= 0
    known[rows[valid], context[valid]] = True
    if positives is not None:
        known |= positives
    known[torch.arange(targets.shape[0]), targets] = False  # a repeated item stays a target
    return F.cross_entropy(logits.masked_fill(known, -torch.inf), targets, reduction=reduction)


class ModelScorer:
    """A trained model as a :class:`~fedrec.shared.evaluation.Scorer` (item vectors fixed)."""

    def __init__(
        self,
        model: RecModel,
        profile_of: Callable[[str], torch.Tensor],
        offset: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """``offset(users)``: a fixed (batch, n_items) log-prior added to the scores, the one
        the model was trained with (see :func:`example_loss`)."""
        model.eval()
        with torch.no_grad():
            self.items = model.item_embeddings()
        self.model = model
        self.profile_of = profile_of
        self.offset = offset

    @torch.no_grad()
    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        ctx = torch.as_tensor(right_aligned(history, self.model.cfg.history_len))
        use = self.model.cfg.use_profile
        prof = torch.stack(
            [self.profile_of(p) if p and use else torch.zeros(self.model.dim) for p in profiles]
        )
        u = self.model.user_embeddings(self.items, ctx, prof)
        scores = self.model.scores(u, self.items).numpy()
        return scores if self.offset is None else scores + self.offset(np.asarray(users))


@dataclass
class ProfileBank:
    """Frozen-backbone embeddings of profile texts, computed once per distinct text."""

    model: RecModel
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def add(self, texts: Sequence[str | None]) -> None:
        new = sorted({t for t in texts if t and t not in self.cache})
        for s in range(0, len(new), 256):
            emb = self.model.encode_texts(new[s : s + 256], adapted=False)
            self.cache.update(zip(new[s : s + 256], emb, strict=True))

    def __call__(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            self.add([text])
        return self.cache[text]


def build_model(split: Split, item_texts: list[str], cfg: ModelConfig) -> RecModel:
    base, tokenizer = load_backbone(cfg.backbone)
    return RecModel(base, tokenizer, item_texts, cfg, warm_items=np.unique(split.train_item))


def trainable_state(model: RecModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_central(
    model: RecModel,
    split: Split,
    user_profiles: Sequence[str | None],
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] = lambda _m: None,
    on_step: Callable[[int, int, float], None] | None = None,
    offsets: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``split``'s training data; keep the best validation epoch.

    ``offsets`` (n_users, n_items): a fixed log-prior per user index added to the logits in
    training and validation (:func:`example_loss`).

    Without validation queries (protocols B and C, unless ``train.holdout`` carved some out of the
    training data: :func:`fedrec.shared.splitting.holdout_split`) it runs all ``cfg.epochs`` and
    keeps the last: early stopping on training loss would measure nothing useful.

    ``user_profiles[u]``: profile text of user index u (or None). Returns the training trace.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    histories = split.train_histories()
    positives = None
    if cfg.mask_positives:  # (n_users, n_items): each user's training items
        positives = torch.zeros(split.n_users, len(model.item_texts), dtype=torch.bool)
        for u, h in enumerate(histories):
            positives[u, torch.as_tensor(h, dtype=torch.long)] = True
    users, targets, context = sequence_examples(histories, model.cfg.history_len)
    bank = ProfileBank(model)
    bank.add(user_profiles)
    zero = torch.zeros(model.dim)
    prior = None if offsets is None else torch.as_tensor(offsets, dtype=torch.float32)
    prof = torch.stack([bank(p) if p else zero for p in user_profiles])  # (n_users, dim)
    # the per-item tables (ID residuals, item factors, item offsets) at their own learning rate
    tables = (model.id_emb, model.item_fac, model.item_fac_ctx, model.item_off)
    id_params = [p for p in tables if p is not None]
    others = [
        p for p in model.parameters() if p.requires_grad and all(p is not q for q in id_params)
    ]
    groups = [{"params": others, "lr": cfg.lr}]
    if id_params:
        groups.append({"params": id_params, "lr": cfg.lr_id})
    opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    n = targets.shape[0]
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    trace: dict[str, Any] = {"examples": int(n), "epochs": [], "best_epoch": None}
    has_valid = split.valid is not None and len(split.valid) > 0
    best, best_state, bad, step = -float("inf"), trainable_state(model), 0, 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if cfg.examples == "set":  # a fresh random context per example each epoch
            users, targets, context = set_examples(
                histories, model.cfg.history_len, rng, cfg.set_max_context
            )
        perm = rng.permutation(n)
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            text = model.text_embeddings()  # (n_items, dim), fresh each step
            items = model.item_embeddings(text)
            as_cold = None
            if model.cfg.cold_dropout > 0:
                as_cold = torch.rand(len(model.item_texts)) < model.cfg.cold_dropout
            loss = example_loss(
                model,
                items,
                torch.as_tensor(context[idx]),
                torch.as_tensor(targets[idx]),
                prof[users[idx]] if model.cfg.use_profile else None,
                text=text,
                as_cold=as_cold,
                positives=None if positives is None else positives[users[idx]],
                offset=None if prior is None else prior[users[idx]],
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, epoch, losses[-1])
            if cfg.max_steps and step >= cfg.max_steps:
                break
        entry: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)), "steps": step}
        if has_valid:
            assert split.valid is not None
            scorer = ModelScorer(model, bank, None if offsets is None else lambda us: offsets[us])
            m = evaluate(scorer, split.valid, ks=(10,), with_auc=False)
            entry["valid_NDCG@10"] = round(m["NDCG@10"], 5)
            entry["valid_HR@10"] = round(m["HR@10"], 5)
            score = m["NDCG@10"]
        else:
            score = float(epoch)  # no validation queries (B, C): all epochs, keep the last
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        trace["epochs"].append(entry)
        log(f"epoch {epoch}: " + ", ".join(f"{k} {v}" for k, v in entry.items() if k != "epoch"))
        if score > best:
            best, best_state, bad = score, trainable_state(model), 0
            trace["best_epoch"] = epoch
        else:
            bad += 1
            if bad >= cfg.patience:
                log(f"stopping: no validation gain for {bad} epochs")
                break
        if cfg.max_steps and step >= cfg.max_steps:
            break
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in best_state:
                p.copy_(best_state[name])
    trace["seconds"] = round(time.perf_counter() - t0, 1)
    trace["profile_bank"] = bank
    return trace


__all__ = ["ModelScorer", "ProfileBank", "build_model", "example_loss", "train_central"]
