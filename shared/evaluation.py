"""Full-ranking evaluation of any scorer on an :class:`~fedrec.shared.splitting.EvalSet`.

A scorer maps a batch of queries to a score for every catalog item. The evaluator removes each
query's excluded items (and, for a candidate pool, every item outside it), ranks the rest
(descending score, ties by ascending item id), and averages the metrics of
:mod:`fedrec.shared.metrics` over queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from fedrec.shared import metrics as M
from fedrec.shared.splitting import EvalSet

DEFAULT_KS = (10, 20)


class Scorer(Protocol):
    """Anything that scores the catalog for a batch of queries."""

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        """``(batch, n_items)`` float scores; higher ranks first.

        ``users``: user indices; ``history``: item indices in time order; ``warm``: whether the
        user took part in training (a model may use learned per-user state only when True).
        """
        ...


def per_query_metrics(
    scores: np.ndarray,
    evalset: EvalSet,
    rows: slice,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    with_auc: bool = True,
) -> dict[str, np.ndarray]:
    """Per-query metric values for the queries ``rows`` of ``evalset`` given their scores.

    ``scores``: ``(batch, n_items)``, modified in place (excluded items set to ``-inf``).
    """
    n_items = scores.shape[1]
    idx = range(rows.start, rows.stop)
    if evalset.candidates is not None:
        outside = np.ones(n_items, dtype=bool)
        outside[evalset.candidates] = False
        scores[:, outside] = -np.inf
    rel_mask = np.zeros_like(scores, dtype=bool)
    for b, q in enumerate(idx):
        scores[b, evalset.exclude[q]] = -np.inf
        rel_mask[b, evalset.relevant[q]] = True
    rel_mask &= scores > -np.inf  # an excluded relevant item can never be retrieved
    n_rel = np.array([evalset.relevant[q].shape[0] for q in idx])
    ranked = M.rank_items(scores, max(ks))
    hits = np.take_along_axis(rel_mask, ranked, axis=1) & M.valid_mask(scores, ranked)
    out: dict[str, np.ndarray] = {}
    named = (("HR", M.hit_rate), ("NDCG", M.ndcg), ("MRR", M.mrr), ("Recall", M.recall))
    for k in ks:
        for name, fn in named:
            out[f"{name}@{k}"] = fn(hits, n_rel, k)
    if with_auc:
        order = M.rank_items(scores, n_items)  # full ranking; -inf items at the end
        positions = np.empty_like(order)
        np.put_along_axis(positions, order, np.arange(n_items)[None, :], axis=1)
        out["AUC"] = M.auc(
            [positions[b][rel_mask[b]] for b in range(len(idx))],
            (scores > -np.inf).sum(axis=1),
        )
    return out


def evaluate(
    scorer: Scorer,
    evalset: EvalSet,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    with_auc: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Mean metrics over the queries of ``evalset``; ``n_queries`` counts those with a target."""
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(evalset), batch_size):
        rows = slice(start, min(start + batch_size, len(evalset)))
        scores = np.asarray(
            scorer.score(
                evalset.users[rows],
                evalset.history[rows],
                evalset.profiles[rows] if evalset.profiles else [None] * (rows.stop - rows.start),
                evalset.warm[rows],
            ),
            dtype=np.float64,
        ).copy()
        parts.append(per_query_metrics(scores, evalset, rows, ks=ks, with_auc=with_auc))
        if on_batch is not None:
            on_batch(rows.stop - rows.start)
    if not parts:
        return {"n_queries": 0}
    summary = {name: M.mean(np.concatenate([p[name] for p in parts])) for name in parts[0]}
    summary["n_queries"] = int(sum(r.shape[0] > 0 for r in evalset.relevant))
    return summary
