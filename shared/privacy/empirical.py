"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023): the
canaries, the attack's scores and the statistics. The audit run itself (a simulation with the
canaries) is :mod:`fedrec.simulations.empirical_audit`.

``fedrec audit RUN --empirical`` re-runs RUN's federation (same config, same code path, real
Flower simulation, real Opacus DP-SGD) with ``m`` canaries and tests how well an attacker who
sees only the final global model can tell which canaries were trained on.

Canaries. Each canary is a new catalog item with random text (so nothing but the canary's own
interaction can move its embedding or its item bias). Each canary is assigned to one client,
chosen uniformly, and independently with probability 1/2 it is *included*: the client inserts
ONE INTERACTION with the canary item into its (first) user's history, after that user's last
one, and builds its examples from the result with the same example builder as always. That is
exactly the unit and adjacency the statement claims: under disjoint examples the canary adds
its slot's example or replaces it (as its target), so the test covers the replacement the
accounting is for, not an appended example. Clients only receive the canaries included for them
(the ``audit-canaries`` run-config file); the in/out assignment stays with the auditor. The
plan's fixed context of real items is the attacker's guess of a context (used only without an
item bias).

Attack. The membership score of a canary is what training moved that only the canary can move:
its item's bias in the global model (a white-box attack on the released model; without an item
bias, the canary's logit given its context minus the untrained model's). Reported:
ROC AUC of the score between included and excluded canaries, TPR at 1 % FPR, and the one-run
lower bound on epsilon.

Lower bound. The auditor guesses "in" for the ``k+`` highest scores and "out" for the ``k-``
lowest (``k-`` = 0 or ``k+``), abstaining on the rest; ``r = k+ + k-`` guesses, ``v``
correct. If the training is (eps, delta)-DP, P[v >= observed] is at most
``P[Binomial(r, q) >= v] + 2 m delta max_i P[v - i <= Binomial(r, q) < v] / i``, with
``q = e^eps / (1 + e^eps)`` (their Theorem for (eps, delta)). The bound is the largest eps whose
p-value is below ``1 - confidence``. The guess sizes are a fixed list declared here, and the
confidence level is split across them (Bonferroni), so picking the best one afterwards does not
overstate the bound. The bound can never exceed what ``m`` canaries can show even with every
guess right (``ceiling`` in the report): with 1000 canaries about 4.4 at 95 %, so an
audit of a run at epsilon 8 can only ever show a bound below 8; its value is in the contrast with
the same run without DP. A bound
above the run's own epsilon means the DP implementation leaks more than it claims: a bug.

Caveat: canaries assigned to a client that is never sampled cannot be detected; they lower the
attack's power, never its validity.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)  # k+ = k- = fraction * m, declared in advance
_WORDS = (
    "amber basalt cobalt dune ember fjord garnet harbor indigo jasper kelp lichen marble nectar "
    "onyx pumice quartz raven sable tundra umber velvet willow xenon yarrow zephyr acorn bramble "
    "cinder delta"
).split()


# --- the statistics ------------------------------------------------------------------------------
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] under (eps, delta)-DP with ``m`` canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(scipy.stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    pmf = scipy.stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float) -> float:
    """The largest eps with ``p_value(...) < level`` (0 if even eps = 0 cannot be rejected)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, hi * 2
        if hi > 200:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < level else (lo, mid)
    return lo


def membership_stats(scores: np.ndarray, included: np.ndarray) -> dict[str, float]:
    """ROC AUC (ties count 1/2) and TPR at 1 % FPR of ``scores`` for ``included``."""
    pos, neg = scores[included], scores[~included]
    if len(pos) == 0 or len(neg) == 0:
        return {"auc": float("nan"), "tpr_at_1pct_fpr": float("nan")}
    ranks = scipy.stats.rankdata(np.concatenate([pos, neg]))
    auc = (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    threshold = np.quantile(neg, 0.99, method="higher")
    return {"auc": float(auc), "tpr_at_1pct_fpr": float(np.mean(pos > threshold))}


def one_run_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Best Bonferroni-corrected lower bound over the declared guesses, and the ceiling.

    Declared guesses, for each fraction f: "in" for the top f*m scores only, and "in" for the
    top f*m with "out" for the bottom f*m. (Top-only suits canaries of clients that never
    trained: they look exactly like excluded ones, so "out" guesses on them are coin flips.)
    """
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    plans = [(max(1, int(f * m)), b) for f in GUESS_FRACTIONS for b in (False, True)]
    plans = [(k, b) for k, b in plans if (2 * k if b else k) <= m]
    level = (1 - confidence) / len(plans)
    best: dict[str, Any] = {"epsilon": 0.0, "guesses": 0, "correct": 0}
    ceiling = 0.0
    for k, both in plans:
        top = order[:k]
        v, r = int(included[top].sum()), k
        if both:
            v, r = v + int((~included[order[m - k :]]).sum()), 2 * k
        eps = epsilon_lower_bound(m, r, v, delta, level)
        ceiling = max(ceiling, epsilon_lower_bound(m, r, r, delta, level))
        if eps > best["epsilon"]:
            best = {"epsilon": eps, "guesses": r, "correct": v}
    return {**best, "ceiling": ceiling, "confidence": confidence, "canaries": m}


# --- the canaries ------------------------------------------------------------------------------
def write_canary_data(src: Path, dst: Path, m: int, rng: np.random.Generator) -> list[int]:
    """Copy the data folder ``src`` to ``dst`` with ``m`` canary items appended to items.tsv
    (new ids, random words in every text column). Returns the canary item ids."""
    from fedrec.shared.data.layout import ITEMS

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    lines = (dst / ITEMS).read_text(encoding="utf-8").rstrip("\n").split("\n")
    header = lines[0].split("\t")
    first = max(int(line.split("\t")[0]) for line in lines[1:]) + 1
    ids = list(range(first, first + m))
    extra = []
    for item in ids:
        cols = [str(item)]
        for name in header[1:]:
            if name == "year":
                cols.append(str(int(rng.integers(1920, 2000))))
            else:
                cols.append(" ".join(rng.choice(_WORDS, size=3)).title())
        extra.append("\t".join(cols))
    (dst / ITEMS).write_text("\n".join(lines + extra) + "\n", encoding="utf-8")
    return ids


def plan_canaries(
    canary_index: np.ndarray,
    real_items: np.ndarray,
    clients: list[str],
    context_len: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Assign each canary a client, an inclusion bit (1/2) and a context of real items."""
    m = len(canary_index)
    owner = rng.integers(0, len(clients), size=m)
    included = rng.random(m) < 0.5
    context = np.stack([rng.choice(real_items, size=context_len, replace=False) for _ in range(m)])
    return {
        "item": canary_index.tolist(),
        "client": [clients[i] for i in owner],
        "included": included.tolist(),
        "context": context.tolist(),
    }


def client_file(plan: dict[str, Any]) -> dict[str, Any]:
    """What clients get: only the included canaries, grouped by client, as interactions (the
    canary item; the client places it in its history: ``fedrec.client.runtime.with_canaries``)."""
    out: dict[str, list[int]] = {}
    for item, client, inc in zip(plan["item"], plan["client"], plan["included"], strict=True):
        if inc:
            out.setdefault(client, []).append(int(item))
    return {"unit": "interaction", "clients": out}


@torch.no_grad()
def canary_logits(model: Any, plan: dict[str, Any]) -> np.ndarray:
    """The model's logit for each canary item given its context."""
    from fedrec.shared.model.examples import right_aligned

    model.eval()
    items = model.item_embeddings()
    ctx = torch.as_tensor(
        right_aligned([np.asarray(c) for c in plan["context"]], model.cfg.history_len)
    )
    users = model.user_embeddings(items, ctx)
    logits = model.scores(users, items)  # (m, n_items)
    idx = torch.as_tensor(plan["item"])
    return logits[torch.arange(len(idx)), idx].numpy()


def canary_scores(model: Any, plan: dict[str, Any]) -> np.ndarray:
    """Membership score of each canary: how far training moved what only the canary can move.

    With an item bias (the default), the canary item's own bias: it starts at 0 and only the
    canary's example (as a target) pushes it up; as a sampled negative anywhere it moves down a
    little, included or not. Without one, the final model's logit minus the initial model's
    (same config and seed, untrained), which cancels what the random text alone gives it."""
    if getattr(model, "item_bias", None) is not None:
        return model.item_bias.detach().numpy()[np.asarray(plan["item"])].astype(np.float64)
    from fedrec.shared.backbone import load_backbone
    from fedrec.shared.model.towers import RecModel

    base, tok = load_backbone(model.cfg.backbone)
    initial = RecModel(base, tok, model.item_texts, model.cfg, with_cache=False)
    return canary_logits(model, plan) - canary_logits(initial, plan)
