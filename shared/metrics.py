"""Ranking metrics as pure, vectorized functions (their definitions are in the docstrings below).

Ranking order everywhere: descending score, ties broken by ascending item index (= item id).
Every metric takes ``hits``, a ``(n_queries, K)`` bool matrix (``hits[q, r]``: the item at rank
``r + 1`` of query q is relevant), and ``n_relevant``, shape ``(n_queries,)``. A query with no
relevant item has no defined value: it gets NaN, and :func:`mean` skips NaNs.

* HR@K: 1 if any relevant item is in the top K.
* Recall@K: hits in top K / min(|relevant|, K).
* NDCG@K: DCG over the top K (gain 1, discount log2(rank + 1)) / ideal DCG of min(|relevant|, K)
  relevant items.
* MRR@K: 1 / rank of the first relevant item in the top K, else 0.
* AUC: the fraction of (relevant, non-relevant candidate) pairs ranked in the right order.

Run the tests: ``pytest tests/test_metrics.py``.
"""

from __future__ import annotations

import numpy as np


def rank_items(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k item indices per row, ``(n, min(k, n_items))``: descending score, ties by index.

    ``-inf`` marks an item that may not be ranked (excluded or not a candidate); callers drop
    those with :func:`valid_mask`. NaN scores are a model bug and raise.
    """
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; the model produced invalid output")
    k = min(k, scores.shape[1])
    # A stable sort of the negated scores keeps ascending index order among equal scores.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def valid_mask(scores: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """``(n, k)`` bool: the ranked position holds a rankable item (score > -inf)."""
    return np.take_along_axis(scores, ranked, axis=1) > -np.inf


def _cut(hits: np.ndarray, k: int) -> np.ndarray:
    hits = hits[:, :k]
    if hits.shape[1] < k:  # K larger than the catalog: the missing ranks are misses
        hits = np.pad(hits, ((0, 0), (0, k - hits.shape[1])))
    return hits.astype(bool)


def _undefined(values: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(n_relevant) > 0, values, np.nan)


def hit_rate(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    return _undefined(_cut(hits, k).any(axis=1).astype(float), n_relevant)


def recall(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    denom = np.maximum(np.minimum(np.asarray(n_relevant), k), 1)
    return _undefined(_cut(hits, k).sum(axis=1) / denom, n_relevant)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # (k,) 1/log2(rank+1) for ranks 1..k


def ndcg(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    disc = _discounts(k)
    dcg = _cut(hits, k) @ disc
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(np.asarray(n_relevant), k)]
    return _undefined(dcg / np.where(ideal > 0, ideal, 1.0), n_relevant)


def mrr(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    h = _cut(hits, k)
    first = np.argmax(h, axis=1)
    return _undefined(np.where(h.any(axis=1), 1.0 / (first + 1), 0.0), n_relevant)


def auc(positions: list[np.ndarray], n_candidates: np.ndarray) -> np.ndarray:
    """Per query AUC from the 0-based ranks of its relevant items among its candidates.

    ``positions[q]``: ranks of the relevant items in the full ranking of query q's candidates
    (``n_candidates[q]`` of them). NaN when a query has no relevant or no non-relevant candidate.
    """
    out = np.full(len(positions), np.nan)
    for q, pos in enumerate(positions):
        n_rel = pos.shape[0]
        n_neg = int(n_candidates[q]) - n_rel
        if n_rel == 0 or n_neg <= 0:
            continue
        pos = np.sort(pos)
        negatives_above = pos - np.arange(n_rel)  # non-relevant items ranked before each one
        out[q] = float(np.sum(n_neg - negatives_above)) / (n_rel * n_neg)
    return out


def mean(values: np.ndarray) -> float:
    """Mean over queries with a defined value (NaN for none)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


METRICS = {"hr": hit_rate, "recall": recall, "ndcg": ndcg, "mrr": mrr}
