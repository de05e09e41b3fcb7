"""Cold users (protocol C): can the low-rank transition of ``cold_transition`` be trained under DP?

Run: ``python -m fedrec.simulations.dp_transition [--out FILE] [--draws N]`` (ML-100K from
``FEDREC_DATA``; about 7.5 minutes on 2 cores).

``cold_transition`` found that a linear "first three items -> the rest" transition on
profile-popularity's log-prior lifts it at k = 3 (test NDCG@10 0.4913 against 0.4676), fitted
exactly and without privacy. This asks whether the same scorer survives DP-SGD, as a federation
of the suite's ten silos would train it, before anything is built into fedrec:

* **Scorer**: ``log pp(i | p) + sum_{j in h} <E_j, F_i>``, ``E, F`` items x 16; the prior's
  weight is fixed at 1 (only the transition is learned).
* **Examples**: one per training user (its first three items, its other items as the targets of
  one full softmax, averaged). An interaction is in exactly one example, so a guarantee for the
  example covers the interaction: changing one interaction replaces one example (the user stays),
  a change of at most ``2 C`` in the clipped sum (``C`` the clip of one example's gradient;
  removing a user's only interaction removes the example, as fedrec's unit excepts). The
  epsilons cover these releases only: the prior and the ``top`` rows are taken from exact
  counts here, treated as public (a federation would take them from a released count).
* **Training**: full-batch DP-SGD (every example every step, so the ten silos' summed clipped
  gradients are the central sum: ``T`` steps are ``T`` rounds of FedSGD), Gaussian noise of
  ``sigma C`` per coordinate. Two places for the noise:

  - ``central``: one draw on the sum, as a trusted server or secure aggregation with distributed
    noise would add it (the noise hidden in the masked sum; the calibration for dropped or
    colluding silos ignored here, so this is an upper bound for that route);
  - ``local``: each of the ten silos adds ``sigma C`` to its own sum (local DP, fedrec's
    ``dp-noise=client``), ``sqrt(10) sigma C`` on the sum.

  ``sigma`` for each (epsilon, T): the Gaussian mechanism at sensitivity ``2 C`` composed ``T``
  times, PLD (dp-accounting), delta 1e-5; the script recomputes each with RDP (dp-accounting) as a
  second accountant and records both.
* **Choice**: the learning rate (30), clip (0.1), rank (16) and initial scale (0.03) were set on
  the validation users from a few non-private and private probes; per (epsilon, place) the
  number of steps ``T`` is chosen on the mean validation NDCG@10 over the noise draws, then the
  scorer is refitted on all training users and scored on test (the mean over draws). The holdout
  is ``cold_transition``'s: 10 % of the trained users, seed 1, their k = 3 queries.

Nothing here is a fedrec mechanism: it is a measurement of whether one would be worth building.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import grad, vmap

from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.shared.data import Dataset, load_dataset
from fedrec.shared.rundir import versions, write_json
from fedrec.shared.splitting import Split
from fedrec.simulations.cold_transition import (
    TransitionOnPrior,
    _ndcg,
    by_history_length,
    first_items,
    holdout,
    log_prior,
)

DELTA = 1e-5
SILOS = 10
EPSILONS = (2.0, 4.0, 8.0)
STEPS = (5, 10, 20)
TOPS = (100, 300, 0)  # rows learned: the most popular items (0: every item)
PLACES = ("central", "local")
LR, CLIP, RANK, INIT, K = 30.0, 0.1, 16, 0.03, 3


def _eps(accountant: str, sigma: float, steps: int) -> float:
    """Epsilon at DELTA of ``steps`` Gaussian releases of noise ``sigma C`` at sensitivity
    ``2 C`` (one example replaced): a Gaussian event of multiplier ``sigma / 2``."""
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    acc = PLDAccountant() if accountant == "pld" else RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma / 2.0), steps)
    return float(acc.get_epsilon(DELTA))


def noise_multiplier(epsilon: float, steps: int) -> float:
    """The smallest ``sigma`` (to 1e-4 relative) whose PLD epsilon is at most ``epsilon``."""
    lo, hi = 0.01, 1000.0
    while hi / lo > 1.0001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if _eps("pld", mid, steps) <= epsilon else (mid, hi)
    return hi


def _examples(split: Split, pp: ProfilePopularity) -> tuple[torch.Tensor, ...]:
    users, given, rest = first_items(split, K)
    rest /= np.maximum(rest.sum(1, keepdims=True), 1.0)
    return (
        torch.from_numpy(log_prior(pp, users)),
        torch.from_numpy(given),
        torch.from_numpy(rest),
    )


def _loss(
    p: dict[str, torch.Tensor], prior: torch.Tensor, g: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    z = (prior + (g @ p["e"]) @ p["f"].T).masked_fill(g.bool(), -1e9)
    return -(r * torch.log_softmax(z, -1)).sum()


_per_example = vmap(grad(_loss), in_dims=(None, 0, 0, 0))


def rows(split: Split, top: int) -> torch.Tensor:
    """(n_items, 1) 1.0 for the ``top`` items with the most training interactions (every item
    when ``top`` is 0), ties by item index. Exact counts: not a private choice (a federation
    would take it from a released count, such as the segment prior's)."""
    keep = torch.ones(split.n_items, 1)
    if top:
        counts = np.bincount(split.train_item, minlength=split.n_items)
        keep.zero_()
        keep[np.argsort(-counts, kind="stable")[:top]] = 1.0
    return keep


def train(
    split: Split, pp: ProfilePopularity, steps: int, noise_std: float, seed: int, top: int
) -> TransitionOnPrior:
    """``steps`` full-batch steps of clipped gradients plus N(0, noise_std^2) per coordinate on
    the sum, only the ``top`` items' rows of E and F learned (the others stay 0, are not in an
    example's gradient or its clip, and get no noise: they are never released); returns the
    scorer (prior weight 1)."""
    prior, g, r = _examples(split, pp)
    n_ex = prior.shape[0]
    keep = rows(split, top)
    init = torch.Generator().manual_seed(0)  # the model's start: the same in every draw
    p = {
        "e": INIT * torch.randn(split.n_items, RANK, generator=init) * keep,
        "f": INIT * torch.randn(split.n_items, RANK, generator=init) * keep,
    }
    noise = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        total = {k: torch.zeros_like(v) for k, v in p.items()}
        for c in range(0, n_ex, 128):
            b = slice(c, c + 128)
            gr = {k: v * keep for k, v in _per_example(p, prior[b], g[b], r[b]).items()}
            m = gr["e"].shape[0]
            norm = torch.sqrt(sum((gr[k].reshape(m, -1) ** 2).sum(1) for k in gr))
            scale = (CLIP / (norm + 1e-12)).clamp(max=1.0)
            for k in gr:
                total[k] += (gr[k] * scale.view(m, 1, 1)).sum(0)
        for k in p:
            z = torch.randn(p[k].shape, generator=noise) * noise_std * keep
            p[k] = p[k] - LR * (total[k] + z) / n_ex
    out = TransitionOnPrior.__new__(TransitionOnPrior)
    out.pp, out.e, out.f, out.a = pp, p["e"], p["f"], 1.0
    return out


def run(ds: Dataset, draws: int, log: Any = print) -> dict[str, Any]:
    split, fit, pp_fit, pp, _, _ = holdout(ds)
    assert fit.valid is not None
    v3 = by_history_length(fit.valid, 3)
    out: dict[str, Any] = {
        "settings": {
            "lr": LR,
            "clip": CLIP,
            "rank": RANK,
            "init": INIT,
            "k": K,
            "delta": DELTA,
            "silos": SILOS,
            "draws": draws,
            "steps_grid": list(STEPS),
            "top_grid": list(TOPS),
        },  # fmt: skip
        "profile_popularity": {
            "valid_k3": _ndcg(pp_fit, v3),
            "test_k3": _ndcg(pp, split.tests["k=3"]),
            "test_k0": _ndcg(pp, split.tests["k=0"]),
        },
    }
    log(f"profile-popularity: {out['profile_popularity']}")
    no_noise = {}
    for top in TOPS:
        for t in STEPS:
            no_noise[f"top {top}, steps {t}"] = _ndcg(train(fit, pp_fit, t, 0.0, 0, top), v3)
    out["no_noise_valid_k3"] = no_noise
    log(f"no noise, valid k=3 (top 0: every item): {no_noise}")
    sigmas = {}
    for eps in EPSILONS:
        for t in STEPS:
            sigma = noise_multiplier(eps, t)
            sigmas[(eps, t)] = {
                "sigma": round(sigma, 4),
                "epsilon_pld": round(_eps("pld", sigma, t), 4),
                "epsilon_rdp": round(_eps("rdp", sigma, t), 4),
            }
    rows_out = []
    for eps in EPSILONS:
        for top in TOPS:
            for t in STEPS:
                row: dict[str, Any] = {"epsilon": eps, "top": top, "steps": t} | sigmas[(eps, t)]
                for place in PLACES:
                    std = row["sigma"] * CLIP * (math.sqrt(SILOS) if place == "local" else 1.0)
                    vals = [_ndcg(train(fit, pp_fit, t, std, s, top), v3) for s in range(draws)]
                    row[f"{place}_valid_k3"] = vals
                    row[f"{place}_valid_k3_mean"] = round(float(np.mean(vals)), 4)
                rows_out.append(row)
                log(
                    f"eps {eps:g} top {top} T {t}: sigma {row['sigma']:.3f} (rdp eps "
                    f"{row['epsilon_rdp']}); valid k=3 mean central "
                    f"{row['central_valid_k3_mean']}, local {row['local_valid_k3_mean']}"
                )
    out["grid"] = rows_out
    chosen = []
    for eps in EPSILONS:
        for place in PLACES:
            best = max(
                (r for r in rows_out if r["epsilon"] == eps),
                key=lambda r: r[f"{place}_valid_k3_mean"],  # noqa: B023 - used at once
            )
            std = best["sigma"] * CLIP * (math.sqrt(SILOS) if place == "local" else 1.0)
            test = [
                _ndcg(
                    train(split, pp, best["steps"], std, 1000 + s, best["top"]), split.tests["k=3"]
                )
                for s in range(draws)
            ]
            chosen.append(
                {
                    "epsilon": eps,
                    "place": place,
                    "top": best["top"],
                    "steps": best["steps"],
                    "valid_k3_mean": best[f"{place}_valid_k3_mean"],
                    "test_k3": test,
                    "test_k3_mean": round(float(np.mean(test)), 4),
                    "test_k3_min": min(test),
                    "test_k3_max": max(test),
                }
            )
            log(f"chosen {chosen[-1]}")
    out["chosen"] = chosen
    out["versions"] = versions()
    return out


def main(argv: list[str] | None = None) -> None:
    from fedrec.shared.federation.data_and_model import resolve_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--draws", type=int, default=5, help="noise draws per setting (default 5)")
    args = ap.parse_args(argv)
    if args.draws < 1:
        ap.error(f"--draws must be at least 1, got {args.draws}")
    torch.set_num_threads(2)
    result = run(load_dataset(resolve_data_dir("ml-100k")), args.draws)
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
