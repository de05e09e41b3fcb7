"""Fit, tune and evaluate every baseline on one protocol's split; the result goes to metrics.json.

Tuning: each collaborative baseline's grid is searched on protocol A's validation queries
(NDCG@10), whatever protocol is evaluated, so test data never chooses a hyper-parameter. The
chosen values are then refit on the evaluated protocol's training data.

Empty histories (protocol C, k = 0): a collaborative model has no input at all then; it falls
back to popularity, and the result says so (``"empty_history": "popularity fallback"``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedrec.shared.baselines.itemknn import ItemKNN
from fedrec.shared.baselines.matrix_factorization import ALS, BPR
from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.baselines.profile_popularity import GRID_SHRINK, ProfilePopularity, field_sets
from fedrec.shared.baselines.random_scores import RandomScores
from fedrec.shared.baselines.text_popularity import TextPopularity
from fedrec.shared.baselines.zeroshot import ZeroShotText
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.data.errors import DataError
from fedrec.shared.evaluation import Scorer, evaluate
from fedrec.shared.splitting import Split, holdout_split, make_split, protocol_a

BASELINES = (
    "random",
    "popularity",
    "profile-popularity",
    "text-popularity",
    "itemknn",
    "als",
    "bpr",
    "zeroshot",
)

GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "itemknn": {"neighbors": [20, 50, 100, 200, 400, 800]},
    "als": {"factors": [32, 64, 128], "regularization": [0.01, 0.1, 1.0], "alpha": [1.0, 5.0]},
    "bpr": {
        "factors": [32, 64, 128],
        "learning_rate": [0.01, 0.05],
        "regularization": [0.001, 0.01],
    },
}
FACTORIES: dict[str, Callable[..., Scorer]] = {"itemknn": ItemKNN, "als": ALS, "bpr": BPR}


class PopularityFallback:
    """Scores queries with an empty history by popularity, the rest by ``inner``."""

    def __init__(self, inner: Scorer, popularity: Popularity) -> None:
        self.inner, self.popularity = inner, popularity

    def score(self, users, history, profiles, warm) -> np.ndarray:  # noqa: ANN001 - Scorer
        out = np.array(self.inner.score(users, history, profiles, warm), dtype=np.float64)
        empty = [b for b, h in enumerate(history) if h.shape[0] == 0]
        if empty:
            out[empty] = self.popularity.scores
        return out


SEEDED = ("als", "bpr")  # the tuned baselines whose initialization is random
SEED_MOVES = (*SEEDED, "random")  # every baseline whose fit `fedrec baselines --seed` moves


def _seeded(name: str, seed: int) -> dict[str, int]:
    return {"seed": seed} if name in SEEDED else {}


def grid(name: str) -> list[dict[str, Any]]:
    keys = list(GRIDS[name])
    combos = itertools.product(*GRIDS[name].values())
    return [dict(zip(keys, values, strict=True)) for values in combos]


def tune(
    name: str, tuning_split: Split, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best parameters by validation NDCG@10 on ``tuning_split`` (protocol A), and the trace;
    a seeded model (ALS, BPR) is fitted with ``seed`` at every setting."""
    assert tuning_split.valid is not None, "tuning needs protocol A's validation queries"
    if len(tuning_split.valid) == 0:
        raise DataError(
            f"baseline {name!r} is tuned on protocol A's validation queries (each user's "
            "second-to-last item), and this data set has none: no user has 3 interactions",
            fix="Leave it out (--only popularity,random,zeroshot need no tuning) or use a data "
            "set with longer histories.",
        )
    trace: list[dict[str, Any]] = []
    for params in grid(name):
        model = FACTORIES[name](tuning_split, **params, **_seeded(name, seed))
        ndcg = evaluate(model, tuning_split.valid, ks=(10,), with_auc=False)["NDCG@10"]
        trace.append({"params": params, "valid_NDCG@10": round(ndcg, 5)})
    best = max(trace, key=lambda t: float(t["valid_NDCG@10"]))  # first best wins ties
    return dict(best["params"]), trace


def tune_profile_popularity(
    ds: Dataset, split: Split, tuning_split: Split
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Profile fields and shrinkage by NDCG@10 on held-out training users: protocol C's
    pseudo-cold users (10 % of the trained users, seed 1, given 0 and 3 items as the test users
    are), else protocol A's validation queries. Never the test users."""
    if split.protocol == "C":
        profiles = [ds.user_text(int(u)) for u in split.user_ids]
        fit = holdout_split(split, 0.1, profiles, seed=1)
        where = "protocol C: 10 % of the trained users held out as cold (seed 1), NDCG@10"
    else:
        fit, where = tuning_split, "protocol A validation, NDCG@10"
    assert fit.valid is not None
    names = sorted({f for v in ds.user_fields.values() for f in v})
    trace: list[dict[str, Any]] = []
    for fields in field_sets(names):
        for shrink in GRID_SHRINK:
            model = ProfilePopularity(fit, ds.user_fields, fields=fields, shrink=shrink)
            ndcg = evaluate(model, fit.valid, ks=(10,), with_auc=False)["NDCG@10"]
            trace.append({"params": {"fields": list(fields), "shrink": shrink},
                          "valid_NDCG@10": round(ndcg, 5)})  # fmt: skip
    best = max(trace, key=lambda t: float(t["valid_NDCG@10"]))  # first best wins ties
    return dict(best["params"]), trace, where


def run_baselines(
    ds: Dataset,
    protocol: str,
    *,
    names: Sequence[str] = BASELINES,
    backbone: str = "minilm",
    log: Callable[[str], None] = lambda _msg: None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every named baseline, fitted on ``protocol``'s training data and evaluated on its tests.
    ``seed`` seeds the baselines whose model is random (random's scores, ALS's and BPR's
    initialization, in tuning and in the final fit); the others do not depend on it (the
    random draws some of them make, text-popularity's folds and protocol C's held-out users,
    have their own fixed seeds)."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    split = make_split(ds, protocol)
    tuning_split = split if protocol == "A" else protocol_a(ds)
    popularity = Popularity(split)
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        if name == "popularity":
            model: Scorer = popularity
        elif name == "random":
            model = RandomScores(split, seed=seed)
            entry["params"] = {"seed": seed}
        elif name == "profile-popularity":
            if not ds.user_fields:
                model = popularity
                entry["params"] = {"fields": [], "note": "no user profiles: global popularity"}
            else:
                log("profile-popularity: choosing profile fields and shrinkage on held-out users")
                params, trace, where = tune_profile_popularity(ds, split, tuning_split)
                entry.update(params=params, tuned_on=where, trace=trace)
                model = ProfilePopularity(split, ds.user_fields, fields=params["fields"],
                                          shrink=params["shrink"])  # fmt: skip
        elif name == "text-popularity":
            model = TextPopularity(split, ds.item_texts(), backbone=backbone)
            entry["params"] = {"lambda": model.prior.lam, "chosen_by": "5-fold CV on trained items"}
        elif name == "zeroshot":
            model = ZeroShotText(ds.item_texts(), backbone=backbone)
            entry["params"] = {"backbone": backbone, "pooling": "mean", "normalized": True}
        else:
            log(f"{name}: tuning {len(grid(name))} settings on protocol A validation")
            params, trace = tune(name, tuning_split, seed)
            entry.update(params=params, tuned_on="protocol A validation, NDCG@10", trace=trace)
            seeded = _seeded(name, seed)
            entry.update(seeded)
            model = PopularityFallback(FACTORIES[name](split, **params, **seeded), popularity)
            entry["empty_history"] = "popularity fallback"
        entry["metrics"] = {k: _rounded(evaluate(model, es)) for k, es in split.tests.items()}
        if split.valid is not None:
            entry["valid"] = _rounded(evaluate(model, split.valid))
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = entry
        log(f"{name}: {_headline(entry['metrics'])} ({entry['seconds']} s)")
    return {"protocol": protocol, "split": describe_split(split), "baselines": results}


def describe_split(split: Split) -> dict[str, Any]:
    return {
        "protocol": split.protocol,
        "n_users": split.n_users,
        "n_items": split.n_items,
        "n_train_interactions": int(split.train_item.shape[0]),
        "n_valid_queries": len(split.valid) if split.valid is not None else 0,
        "tests": {k: len(v) for k, v in split.tests.items()},
        "n_cold_items": None if split.cold_items is None else int(split.cold_items.shape[0]),
        "n_cold_users": None if split.cold_users is None else int(split.cold_users.shape[0]),
    }


def _rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()}


def _headline(metrics: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{k}: NDCG@10 {m['NDCG@10']:.4f} Recall@10 {m['Recall@10']:.4f}"
        for k, m in metrics.items()
    )
