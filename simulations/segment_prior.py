"""Cold users (protocol C): fedrec's central model trained on the residual over a segment prior.

Run: ``python -m fedrec.simulations.segment_prior [--out FILE] [--set key=value ...]``
(ML-100K from ``FEDREC_DATA``; the ``--set`` keys are ``train-central``'s ``model.*`` /
``train.*`` keys, applied over the suite's ``C-central`` settings).

The model's logits get a fixed offset, the log of the user's profile-conditioned popularity
(:class:`fedrec.shared.baselines.profile_popularity.ProfilePopularity`), in training, in the
epoch choice and at test: ``softmax(model + log pp)`` is proportional to ``softmax(model) * pp``,
so the model learns only what a user's profile text and first items add to the segment's
popularity. :mod:`fedrec.simulations.cold_transition` shows that three items carry such a residual
(a linear transition on the same prior: test NDCG@10 0.4913 at k = 3 against profile-
popularity's 0.4676).

Nothing is chosen on test users: ``pp``'s fields and shrinkage are the suite's baseline's
choice on the held-out training users (10 %, seed 1), the same users the epoch is chosen on
(``train.holdout=0.1``, ``train.seed`` 0). In training and validation ``pp`` counts the
interactions left after the holdout (what the model trains on); at test it counts every
training interaction, as the baseline does. Central and not private: a federated model would
need the segment counts released privately.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.shared.baselines.profile_popularity import ProfilePopularity
from fedrec.shared.baselines.runner import tune_profile_popularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.model.central import ModelScorer, build_model, train_central
from fedrec.shared.model.config import ModelConfig, TrainConfig, as_dict, from_dict
from fedrec.shared.model.run_central import parse_overrides, with_profile_template
from fedrec.shared.rundir import versions, write_json
from fedrec.shared.splitting import holdout_split, make_split
from fedrec.simulations.cold_transition import FLOOR as FLOOR  # the floor of log_prior
from fedrec.simulations.cold_transition import by_history_length
from fedrec.simulations.cold_transition import log_prior as user_log_prior

# the suite's C-central (simulations/suites/full.toml)
C_CENTRAL: dict[str, Any] = {
    "model.user_tower": "additive",
    "train.examples": "set",
    "train.set_max_context": 3,
    "model.profile_template": "A {age}-year-old {gender} {occupation}.",
    "train.lr": 0.0005,
    "train.lr_id": 0.001,
    "train.mask_positives": True,
    "train.holdout": 0.1,
}


def log_prior(pp: ProfilePopularity, n_users: int) -> np.ndarray:
    """(n_users, n_items) ``log(pp(i | segment of u) + FLOOR)`` for every user index."""
    return user_log_prior(pp, np.arange(n_users))


def settings_from(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as ``train-central`` reads them (:func:`parse_overrides`), keyed
    ``model.NAME`` / ``train.NAME`` as :data:`C_CENTRAL` is; values stay text until
    :func:`run` parses them into the configs."""
    model_sets, train_sets = parse_overrides(pairs)
    return {**{f"model.{k}": v for k, v in model_sets.items()},
            **{f"train.{k}": v for k, v in train_sets.items()}}  # fmt: skip


def run(sets: dict[str, Any], log: Any = print) -> dict[str, Any]:
    from fedrec.shared.federation.data_and_model import resolve_data_dir

    settings = {**C_CENTRAL, **sets}
    model_cfg = from_dict(
        ModelConfig,
        {k[6:]: v for k, v in settings.items() if k.startswith("model.")},
        where="model settings",
    )
    train_cfg = from_dict(
        TrainConfig,
        {k[6:]: v for k, v in settings.items() if k.startswith("train.")},
        where="train settings",
    )
    if train_cfg.holdout <= 0:
        raise SystemExit("train.holdout must be > 0: the epoch is chosen on held-out users")
    if train_cfg.holdout != 0.1 or train_cfg.seed != 0:
        raise SystemExit(
            "train.holdout must be 0.1 and train.seed 0: profile-popularity is tuned on the "
            "10 %, seed-1 holdout, and the epoch must be chosen on the same held-out users"
        )
    raw = load_dataset(resolve_data_dir("ml-100k"))
    params, _, where = tune_profile_popularity(raw, make_split(raw, "C"), make_split(raw, "C"))
    # the test queries carry the profile text the model trains on (the template's), as
    # run_central's do: the raw text has the zip code, which training never saw
    ds = with_profile_template(raw, model_cfg.profile_template)
    split = make_split(ds, "C")
    profiles = [ds.user_text(int(u)) for u in split.user_ids]
    fit = holdout_split(split, train_cfg.holdout, profiles, seed=train_cfg.seed + 1)
    fields, shrink = list(params["fields"]), float(params["shrink"])
    prior_fit = log_prior(ProfilePopularity(fit, raw.user_fields, fields=fields, shrink=shrink),
                          split.n_users)  # fmt: skip
    prior_all = log_prior(
        ProfilePopularity(split, raw.user_fields, fields=fields, shrink=shrink), split.n_users
    )
    log(f"profile-popularity {params} ({where})")
    t0 = time.perf_counter()
    model = build_model(fit, ds.item_texts(), model_cfg)
    trace = train_central(model, fit, profiles, train_cfg, log=log, offsets=prior_fit)
    bank = trace.pop("profile_bank")
    scorer = ModelScorer(model, bank, lambda us: prior_all[us])
    assert fit.valid is not None
    on_fit = ModelScorer(model, bank, lambda us: prior_fit[us])
    valid = evaluate(on_fit, fit.valid, ks=(10,))
    valid_by_k = {
        f"k={k}": evaluate(on_fit, by_history_length(fit.valid, k), ks=(10,)) for k in (0, 3)
    }
    out: dict[str, Any] = {
        "settings": {"model": as_dict(model_cfg), "train": as_dict(train_cfg)},
        "profile_popularity": params,
        "valid": valid,
        "valid_by_k": valid_by_k,
        "test": {k: evaluate(scorer, es) for k, es in split.tests.items()},
        "training": trace,
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": versions(),
    }
    log(
        "valid NDCG@10 {:.4f} (k=0 {:.4f}, k=3 {:.4f}); test NDCG@10 k=0 {:.4f}, k=3 {:.4f}".format(
            valid["NDCG@10"],
            valid_by_k["k=0"]["NDCG@10"],
            valid_by_k["k=3"]["NDCG@10"],
            out["test"]["k=0"]["NDCG@10"],
            out["test"]["k=3"]["NDCG@10"],
        )
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    try:
        sets = settings_from(args.sets)
    except ValueError as err:
        ap.error(str(err))
    result = run(sets)
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
