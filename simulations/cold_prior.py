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
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.baselines.popularity import ConstantScorer
from fedrec.shared.evaluation import evaluate
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import attach_cold_prior, frozen_features
from fedrec.shared.rundir import versions, write_json
from fedrec.simulations.holdout_run import load_holdout_run

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _trained_with_prior(cfg: dict[str, Any]) -> str | None:
    """Why a run cannot be used here: it has a cold prior already (else None)."""
    if float(cfg.get("train", {}).get("cold_prior", 0)) > 0:
        return "trained with a cold prior already; train without one"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a train-central --protocol B run with train.holdout")
    ap.add_argument("--out", type=Path, help="results file (default RUN/cold_prior.json)")
    ap.add_argument("--data", help="the data set name or folder (default: what the run recorded)")
    args = ap.parse_args()
    r = load_holdout_run(
        args.run, "B", "train.holdout=0.2", data=args.data, refuse=_trained_with_prior
    )
    ds, split, fit, vset, model = r.ds, r.split, r.fit, r.valid, r.model
    train = r.cfg["train"]
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
        valid = evaluate(scorer, vset, ks=(10,), with_auc=False)
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
    alone = ConstantScorer(model.cold_prior_items.double().numpy())
    valid = evaluate(alone, vset, ks=(10,), with_auc=False)
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
        "validation": f"{len(vset)} queries on the pseudo-cold items of train.holdout "
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
