"""Ranking metrics against hand-computed values, edge cases, and a loop-based reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.shared import metrics as M
from fedrec.shared.evaluation import evaluate
from fedrec.shared.splitting import EvalSet


def test_hand_computed_single_relevant():
    # relevant item at rank 3 of the top 5
    hits = np.array([[0, 0, 1, 0, 0]], dtype=bool)
    n = np.array([1])
    assert M.hit_rate(hits, n, 5)[0] == 1.0 and M.hit_rate(hits, n, 2)[0] == 0.0
    assert M.ndcg(hits, n, 5)[0] == pytest.approx(1 / math.log2(4))  # 0.5
    assert M.mrr(hits, n, 5)[0] == pytest.approx(1 / 3)
    assert M.recall(hits, n, 5)[0] == 1.0


def test_hand_computed_several_relevant():
    # 3 relevant items, hits at ranks 1 and 4; K = 2 caps the ideal at 2 items
    hits = np.array([[1, 0, 0, 1]], dtype=bool)
    n = np.array([3])
    ideal4 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert M.ndcg(hits, n, 4)[0] == pytest.approx((1 + 1 / math.log2(5)) / ideal4)
    assert M.ndcg(hits, n, 2)[0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert M.recall(hits, n, 4)[0] == pytest.approx(2 / 3)
    assert M.recall(hits, n, 2)[0] == pytest.approx(1 / 2)  # hits / min(|rel|, K)


def test_empty_relevant_set_is_undefined_and_skipped():
    hits = np.zeros((2, 3), dtype=bool)
    hits[1, 0] = True
    vals = M.ndcg(hits, np.array([0, 1]), 3)
    assert math.isnan(vals[0]) and vals[1] == 1.0
    assert M.mean(vals) == 1.0
    assert math.isnan(M.mean(np.array([np.nan])))


def test_k_larger_than_catalog():
    scores = np.array([[0.1, 0.9, 0.5]])
    ranked = M.rank_items(scores, 10)
    assert ranked.tolist() == [[1, 2, 0]]
    hits = ranked == 0
    assert M.recall(hits, np.array([1]), 10)[0] == 1.0
    assert M.ndcg(hits, np.array([1]), 10)[0] == pytest.approx(1 / math.log2(4))


def test_ties_break_by_ascending_item_index():
    scores = np.array([[1.0, 2.0, 2.0, 1.0, 2.0]])
    assert M.rank_items(scores, 5).tolist() == [[1, 2, 4, 0, 3]]


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        M.rank_items(np.array([[0.0, np.nan]]), 1)


def test_auc_hand_computed():
    # 5 candidates, relevant at ranks 0 and 3: 3 negatives; pairs right: 3 + 1 = 4 of 6
    assert M.auc([np.array([0, 3])], np.array([5]))[0] == pytest.approx(4 / 6)
    assert math.isnan(M.auc([np.array([0])], np.array([1]))[0])  # no negative: undefined


class Fixed:
    def __init__(self, scores):
        self.scores = scores

    def score(self, users, history, profiles, warm):
        return self.scores[users]


def reference(scores, es, k):
    """Slow, obvious: sort candidate ids by (-score, id) in Python, then count."""
    out = {"ndcg": [], "recall": [], "auc": []}
    for q in range(len(es)):
        s = scores[es.users[q]]
        cands = [i for i in range(s.shape[0]) if i not in set(es.exclude[q].tolist())]
        if es.candidates is not None:
            cands = [i for i in cands if i in set(es.candidates.tolist())]
        order = sorted(cands, key=lambda i: (-s[i], i))
        rel = set(es.relevant[q].tolist())
        dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(order[:k]) if i in rel)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        out["ndcg"].append(dcg / idcg)
        out["recall"].append(sum(i in rel for i in order[:k]) / min(len(rel), k))
        pos = [r for r, i in enumerate(order) if i in rel]
        neg = len(order) - len(pos)
        right = sum(sum(order[j] not in rel for j in range(p + 1, len(order))) for p in pos)
        out["auc"].append(right / (len(pos) * neg))
    return {m: float(np.mean(v)) for m, v in out.items()}


@pytest.mark.parametrize("pool", [False, True])
def test_evaluator_matches_slow_reference(pool):
    rng = np.random.default_rng(1)
    n_users, n_items = 30, 40
    scores = rng.integers(0, 5, size=(n_users, n_items)).astype(float)  # many ties
    candidates = np.arange(0, n_items, 2) if pool else np.arange(n_items)
    excl, rel = [], []
    for _ in range(n_users):
        perm = rng.permutation(candidates)  # relevant and excluded items are disjoint
        excl.append(perm[:5])
        rel.append(np.sort(perm[5 : 5 + int(rng.integers(1, 4))]))
    es = EvalSet(
        name="t",
        users=np.arange(n_users),
        history=excl,
        exclude=excl,
        relevant=rel,
        warm=np.ones(n_users, dtype=bool),
        candidates=candidates if pool else None,
    )
    got = evaluate(Fixed(scores), es, ks=(10,), batch_size=7)
    ref = reference(scores, es, 10)
    assert got["NDCG@10"] == pytest.approx(ref["ndcg"])
    assert got["Recall@10"] == pytest.approx(ref["recall"])
    assert got["AUC"] == pytest.approx(ref["auc"])
