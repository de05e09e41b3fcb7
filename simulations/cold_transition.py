"""Cold users (protocol C): two linear references that say what a profile and three items carry.

Run: ``python -m fedrec.simulations.cold_transition [--out FILE]`` (ML-100K from ``FEDREC_DATA``).

Profile-conditioned popularity (``pp``, :mod:`fedrec.shared.baselines.profile_popularity`) is the
bar protocol C sets for the model. Before asking a model to pass it, this measures how far a
simple, well-regularized learner that sees the same inputs gets:

* **k = 0 (a profile only): a log-linear profile model.** ``logit(i | p) = b_i + sum_f W[f=v_f,
  i]``: a softmax regression from the one-hot profile fields to the catalog, fitted by full-
  softmax maximum likelihood on every training interaction with an L2 penalty ``lam``. It pools
  the fields additively where ``pp`` counts their crossed segments.
* **k = 3 (a profile and the first items): a low-rank transition on ``pp``'s prior.**
  ``logit(i | p, h) = a * log pp(i | p) + sum_{j in h} <E_j, F_i>`` with ``E, F`` (items x
  ``rank``) and ``a`` learned, trained as the query is asked: each training user's first three
  interactions predict the rest (full softmax, the given items masked out). With ``E = F = 0`` it
  is ``pp``; what it learns is what the items add beyond the profile's segment.

Both choose ``lam`` on the pseudo-cold users of :func:`fedrec.shared.splitting.holdout_split`
(10 % of the trained users, seed 1, as the suite's ``pp`` baseline and ``C-central`` do), with
``pp``'s fields and shrinkage as the suite chooses them; the chosen ``lam`` is refitted on all
training users and scored once on the test users. Neither is private or federated: they are
references for the model, not part of it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.shared.baselines.profile_popularity import ProfilePopularity, _band_edges
from fedrec.shared.baselines.runner import tune_profile_popularity
from fedrec.shared.data import Dataset, load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.rundir import versions, write_json
from fedrec.shared.splitting import EvalSet, Split, holdout_split, make_split
from fedrec.simulations.blend_prior import FLOOR

LAMBDAS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def log_prior(pp: ProfilePopularity, users: np.ndarray) -> np.ndarray:
    """(len(users), n_items) ``log(pp(i | segment of u) + FLOOR)`` for user indices ``users``
    (the floor: an item no one in a segment took, as the blend's)."""
    empty = [np.empty(0, dtype=np.int64)] * len(users)
    p = pp.score(users, empty, [None] * len(users), np.zeros(len(users), dtype=bool))
    return np.log(p + FLOOR).astype(np.float32)


def profile_onehot(
    split: Split, user_fields: dict[int, dict[str, str]], fields: Sequence[str], bands: int = 5
) -> np.ndarray:
    """(n_users, n_features) one-hot of each user's ``fields`` (numbers in quantile bands of the
    trained users' values, as :class:`ProfilePopularity` bands them); a missing value has none."""
    raw = [user_fields.get(int(u), {}) for u in split.user_ids]
    trained = np.unique(split.train_user)
    edges = {
        f: _band_edges([raw[u][f] for u in trained if str(raw[u].get(f, "")).strip()], bands)
        for f in fields
    }
    cols: dict[tuple[str, str], int] = {}
    keys: list[list[tuple[str, str]]] = []
    for r in raw:
        key = []
        for f in fields:
            v = str(r.get(f, "")).strip()
            if not v:
                continue
            e = edges[f]
            if e is not None:
                v = f"band{int(np.searchsorted(e, float(v), side='right'))}"
            key.append((f, v))
            cols.setdefault((f, v), len(cols))
        keys.append(key)
    x = np.zeros((len(raw), len(cols)), dtype=np.float32)
    for u, key in enumerate(keys):
        for fv in key:
            x[u, cols[fv]] = 1.0
    return x


def _counts(split: Split) -> tuple[np.ndarray, np.ndarray]:
    users = np.unique(split.train_user)
    c = np.zeros((split.n_users, split.n_items), dtype=np.float32)
    np.add.at(c, (split.train_user, split.train_item), 1.0)
    return users, c


class ProfileLogLinear:
    """``b_i + x_p W``: softmax regression from one-hot profile fields to items (k = 0)."""

    def __init__(
        self,
        split: Split,
        user_fields: dict[int, dict[str, str]],
        fields: Sequence[str],
        lam: float,
    ) -> None:
        x = profile_onehot(split, user_fields, fields)
        users, c = _counts(split)
        xt, ct = torch.from_numpy(x[users]), torch.from_numpy(c[users])
        n = ct.sum()
        b = torch.log(ct.sum(0) + 1.0).requires_grad_(True)
        w = torch.zeros(x.shape[1], split.n_items, requires_grad=True)
        opt = torch.optim.LBFGS([b, w], max_iter=300, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            nll = -(ct * torch.log_softmax(b + xt @ w, dim=1)).sum() / n
            loss = nll + lam * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.x, self.b, self.w = torch.from_numpy(x), b.detach(), w.detach()

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        return (self.b + self.x[np.asarray(users)] @ self.w).numpy()


def first_items(split: Split, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, given, rest)``: each trained user (sorted) as the query is asked, its first
    ``k`` training items as a (users, items) 0/1 row of ``given`` and the others as ``rest``
    (a repeat of a given item left out, as at test)."""
    users = np.unique(split.train_user)
    given = np.zeros((users.shape[0], split.n_items), dtype=np.float32)
    rest = np.zeros_like(given)
    for r, u in enumerate(users.tolist()):  # train arrays are in per-user time order
        items = split.train_item[split.train_user == u]
        given[r, items[:k]] = 1.0
        rest[r, items[k:]] = 1.0
        rest[r, items[:k]] = 0.0
    return users, given, rest


class TransitionOnPrior:
    """``a * log pp(i | p) + sum_{j in h} <E_j, F_i>``, trained first-``k`` -> rest (k = 3)."""

    def __init__(
        self,
        split: Split,
        pp: ProfilePopularity,
        lam: float,
        *,
        rank: int = 16,
        k: int = 3,
        seed: int = 0,
        max_iter: int = 200,
        tied: bool = False,
    ) -> None:
        """``tied``: one factor table for the given items and the candidates (``E = F``, the
        symmetric FISM form fedrec's ``model.item_factors`` has) instead of two."""
        self.pp = pp
        n = split.n_items
        users, given, rest = first_items(split, k)
        prior = torch.from_numpy(log_prior(pp, users))
        g, t = torch.from_numpy(given), torch.from_numpy(rest)
        mask = g.bool()
        gen = torch.Generator().manual_seed(seed)
        e = (0.01 * torch.randn(n, rank, generator=gen)).requires_grad_(True)
        f = e if tied else (0.01 * torch.randn(n, rank, generator=gen)).requires_grad_(True)
        a = torch.tensor(1.0, requires_grad=True)
        params = [e, a] if tied else [e, f, a]
        total = t.sum()
        opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            z = (a * prior + (g @ e) @ f.T).masked_fill(mask, -1e9)
            nll = -(t * torch.log_softmax(z, dim=1)).sum() / total
            loss = nll + lam * ((e**2).sum() + (f**2).sum())  # tied: 2 lam |E|^2
            loss.backward()
            return loss

        opt.step(closure)
        self.e, self.f, self.a = e.detach(), f.detach(), float(a.detach())

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        s = self.a * log_prior(self.pp, np.asarray(users))
        for b, h in enumerate(history):
            if len(h):
                s[b] += ((self.e[torch.as_tensor(np.asarray(h))].sum(0)) @ self.f.T).numpy()
        return s


def by_history_length(es: EvalSet, k: int) -> EvalSet:
    """The queries of ``es`` whose history has ``k`` items."""
    idx = [q for q in range(len(es)) if len(es.history[q]) == k]
    return EvalSet(
        name=f"{es.name}_k{k}",
        users=es.users[idx],
        history=[es.history[q] for q in idx],
        exclude=[es.exclude[q] for q in idx],
        relevant=[es.relevant[q] for q in idx],
        warm=es.warm[idx],
        candidates=es.candidates,
        profiles=[es.profiles[q] for q in idx] if es.profiles else [],
    )


def _ndcg(model: Any, es: EvalSet) -> float:
    return round(float(evaluate(model, es, ks=(10,), with_auc=False)["NDCG@10"]), 4)


def holdout(
    ds: Dataset,
) -> tuple[Split, Split, ProfilePopularity, ProfilePopularity, dict[str, Any], str]:
    """Protocol C's split, its pseudo-cold holdout (10 % of the trained users, seed 1) and
    profile-popularity at the suite's fields and shrinkage, fitted on the holdout's training
    users and on all of them: ``(split, fit, pp_fit, pp, params, where they were tuned)``."""
    split = make_split(ds, "C")
    fit = holdout_split(split, 0.1, [ds.user_text(int(u)) for u in split.user_ids], seed=1)
    assert fit.valid is not None
    params, _, where = tune_profile_popularity(ds, split, split)
    fields = list(params["fields"])
    pp_fit = ProfilePopularity(fit, ds.user_fields, fields=fields, shrink=params["shrink"])
    pp = ProfilePopularity(split, ds.user_fields, fields=fields, shrink=params["shrink"])
    return split, fit, pp_fit, pp, params, where


def run(ds: Dataset, log: Any = print) -> dict[str, Any]:
    split, fit, pp_fit, pp, params, where = holdout(ds)
    assert fit.valid is not None
    v0, v3 = by_history_length(fit.valid, 0), by_history_length(fit.valid, 3)
    out: dict[str, Any] = {
        "profile_popularity": {
            "params": params,
            "tuned_on": where,
            "valid": {"k=0": _ndcg(pp_fit, v0), "k=3": _ndcg(pp_fit, v3)},
            "test": {k: _ndcg(pp, split.tests[k]) for k in ("k=0", "k=3")},
        },
        "holdout": "10 % of the trained users (seed 1), their k = 0 and k = 3 queries",
    }
    log(f"profile-popularity {params}: {out['profile_popularity']}")
    all_fields = sorted({f for v in ds.user_fields.values() for f in v} - {"zip_code"})
    for name, k, valid, build in (
        ("profile_loglinear", "k=0", v0,
         lambda sp, p, lam: ProfileLogLinear(sp, ds.user_fields, all_fields, lam)),
        ("transition_on_prior", "k=3", v3, lambda sp, p, lam: TransitionOnPrior(sp, p, lam)),
        ("transition_on_prior_tied", "k=3", v3,
         lambda sp, p, lam: TransitionOnPrior(sp, p, lam, tied=True)),
    ):  # fmt: skip
        trace = []
        for lam in LAMBDAS:
            trace.append({"lam": lam, "valid_NDCG@10": _ndcg(build(fit, pp_fit, lam), valid)})
            log(f"{name} lam {lam:g}: valid {k} NDCG@10 {trace[-1]['valid_NDCG@10']}")
        best = max(trace, key=lambda t: t["valid_NDCG@10"])  # first best on ties
        final = build(split, pp, best["lam"])
        out[name] = {
            "query": k,
            "trace": trace,
            "chosen_lam": best["lam"],
            "test": {kk: _ndcg(final, split.tests[kk]) for kk in ("k=0", "k=3")},
        }
        if name == "profile_loglinear":
            out[name]["fields"] = all_fields
        log(f"{name}: lam {best['lam']:g} chosen on validation; test {out[name]['test']}")
    out["versions"] = versions()
    return out


def main(argv: list[str] | None = None) -> None:
    from fedrec.shared.federation.data_and_model import resolve_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = run(load_dataset(resolve_data_dir("ml-100k")))
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
