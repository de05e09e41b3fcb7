"""Choose the cold prior's weight on pseudo-cold items held out of training (protocol B).

Run: ``python -m fedrec.simulations.cold_prior RUN [--out FILE]`` for a ``train-central
--protocol B`` run folder with its model (``model/``) trained with ``train.holdout`` > 0 and no
cold prior of its own.

The holdout's pseudo-cold items (:func:`fedrec.shared.splitting.holdout_split`) never reached the
model and are not counted, exactly as the real cold items. For every weight ``w`` in
:data:`WEIGHTS` the prior (:mod:`fedrec.shared.model.cold_prior`; its ridge strength chosen by
cross-validation over the remaining trained items) is attached with that weight and the
pseudo-cold validation queries are scored; the chosen ``w`` is the validation argmax of NDCG@10
(fedrec's selection metric; first best on ties). Then train the reported model on all training
data with ``--set train.cold_prior=w``. The protocol's test queries are scored too, only to
report them (this model trained on less data than the final one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import attach_cold_prior, frozen_features
from fedrec.shared.model.run_central import with_profile_template
from fedrec.shared.rundir import versions, write_json
from fedrec.shared.splitting import holdout_split, make_split

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class PriorAlone:
    """The prior's value per item as a :class:`~fedrec.shared.evaluation.Scorer` (the same for
    every query; a baseline: text-predicted popularity without the model)."""

    def __init__(self, prior: np.ndarray) -> None:
        self.prior = prior

    def score(self, users, history, profiles, warm) -> np.ndarray:  # noqa: ANN001
        return np.tile(self.prior, (len(users), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a train-central --protocol B run with train.holdout")
    ap.add_argument("--out", type=Path, help="results file (default RUN/cold_prior.json)")
    args = ap.parse_args()
    cfg_path = args.run / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{cfg_path}: not a readable train-central run ({err})") from None
    train = cfg.get("train", {})
    if cfg.get("command") != "train-central" or cfg.get("protocol") != "B":
        raise SystemExit(f"{args.run}: needs a train-central run of protocol B")
    if not float(train.get("holdout", 0)) > 0:
        raise SystemExit(
            f"{args.run}: train.holdout is 0, so there are no pseudo-cold items to choose the "
            "weight on; train with --set train.holdout=0.2"
        )
    if float(train.get("cold_prior", 0)) > 0:
        raise SystemExit(f"{args.run}: trained with a cold prior already; train without one")
    ds = with_profile_template(
        load_dataset(resolve_data_dir(cfg.get("dataset", "ml-100k"))),
        cfg["model"].get("profile_template", ""),
    )
    split = make_split(ds, "B")
    profiles = [ds.user_text(int(u)) for u in split.user_ids]
    fit = holdout_split(split, float(train["holdout"]), profiles, seed=int(train["seed"]) + 1)
    assert fit.valid is not None
    model, _meta = load_model(args.run)
    counts = np.bincount(fit.train_item, minlength=len(ds.item_ids))
    if ((counts > 0) != model.warm.numpy()).any():
        raise SystemExit(f"{args.run}: its trained items are not the holdout split's")
    feats = frozen_features(model)
    bank = ProfileBank(model)
    rows: list[dict[str, Any]] = []
    prior: dict[str, Any] = {}
    for w in WEIGHTS:
        prior = attach_cold_prior(model, w, counts=counts, features=feats)
        scorer = ModelScorer(model, bank)
        valid = evaluate(scorer, fit.valid, ks=(10,), with_auc=False)
        test = {n: evaluate(scorer, es, ks=(10,), with_auc=False) for n, es in split.tests.items()}
        row = {
            "w": w,
            "valid": {k: round(v, 5) for k, v in valid.items()},
            "test_report_only": {
                n: {k: round(v, 5) for k, v in m.items()} for n, m in test.items()
            },
        }
        rows.append(row)
        print(
            f"w {w:>5}: valid NDCG@10 {valid['NDCG@10']:.4f} Recall@10 {valid['Recall@10']:.4f}"
            + "".join(f" | test {n} Recall@10 {m['Recall@10']:.4f}" for n, m in test.items()),
            flush=True,
        )
    best = max(rows, key=lambda r: float(r["valid"]["NDCG@10"]))  # first best wins ties
    # the prior alone (the model ignored): what text-predicted popularity ranks by itself
    attach_cold_prior(model, 1.0, counts=counts, features=feats)
    alone = PriorAlone(model.cold_prior_items.double().numpy())
    valid = evaluate(alone, fit.valid, ks=(10,), with_auc=False)
    test = {n: evaluate(alone, es, ks=(10,), with_auc=False) for n, es in split.tests.items()}
    prior_alone = {
        "valid": {k: round(v, 5) for k, v in valid.items()},
        "test_report_only": {n: {k: round(v, 5) for k, v in m.items()} for n, m in test.items()},
    }
    print(
        f"prior alone: valid NDCG@10 {valid['NDCG@10']:.4f} Recall@10 {valid['Recall@10']:.4f}"
        + "".join(f" | test {n} Recall@10 {m['Recall@10']:.4f}" for n, m in test.items())
    )
    result = {
        "run": str(args.run),
        "validation": f"{len(fit.valid)} queries on the pseudo-cold items of train.holdout "
        f"{train['holdout']} (seed {int(train['seed']) + 1})",
        "ridge": {k: prior[k] for k in ("lambda", "cv_mse", "trained_items", "target")},
        "weights": rows,
        "chosen": best["w"],
        "prior_alone": prior_alone,
        "versions": versions(),
    }
    out = args.out or args.run / "cold_prior.json"
    write_json(out, result)
    print(f"chosen on validation: w {best['w']}; wrote {out}")


if __name__ == "__main__":
    main()
