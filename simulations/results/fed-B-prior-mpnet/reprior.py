"""Refit a federated protocol-B run's cold prior on another backbone's text embeddings.

    python simulations/results/fed-B-prior-mpnet/reprior.py RUN [RUN ...] [--backbone mpnet]

A probe, not a fedrec mechanism. Each RUN is a ``fedrec simulate`` protocol-B run trained with
``cold-prior`` > 0 whose model files (``model/``) are still on disk. The federation's cold prior
is a ridge regression of the released model's learned item biases on frozen text embeddings of
the public catalog (post-processing: no privacy cost). Here the same regression reads the
embeddings of ``--backbone`` (``TextEncoder(...).encode_cached``, the embeddings the
text-popularity baseline reads) instead of the model's own frozen backbone, and the same
model's cold items are scored again: a paired comparison on one trained model. The model's own
prior is rescored first and must reproduce the run's ``metrics.json`` (a check that the model
and split are the ones the run evaluated). Prints one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fedrec.shared.backbone import TextEncoder
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import fit_text_prior
from fedrec.shared.splitting import make_split

KEYS = ("Recall@10", "NDCG@10", "MRR@10", "HR@10", "Recall@20")


def _short(m: dict[str, float]) -> dict[str, float]:
    return {k: round(float(m[k]), 4) for k in KEYS}


def probe(run: Path, backbone: str) -> dict[str, Any]:
    cfg = json.loads((run / "config.json").read_text())["federation"]
    if cfg["protocol"] != "B" or float(cfg["cold_prior"]) <= 0:
        raise SystemExit(f"{run}: not a protocol-B run with cold-prior > 0")
    ds = load_dataset(resolve_data_dir(str(cfg["data"])))
    split = make_split(ds, "B")
    model, _ = load_model(run)
    bank = ProfileBank(model)
    (name, queries), *rest = split.tests.items()
    if rest:
        raise SystemExit(f"{run}: protocol B should have one test set")
    own = evaluate(ModelScorer(model, bank), queries)
    saved = json.loads((run / "metrics.json").read_text())["model"]["metrics"][name]
    if abs(own["Recall@10"] - saved["Recall@10"]) > 1e-6:
        raise SystemExit(f"{run}: rescoring gives {own['Recall@10']}, metrics.json {saved}")
    warm = model.warm.numpy()
    assert model.item_bias is not None
    bias = model.item_bias.detach().double().numpy()
    feats = TextEncoder(backbone).encode_cached(ds.item_texts())
    prior = fit_text_prior(feats, bias, warm)
    with torch.no_grad():
        before = model.cold_prior_items.clone()
        model.cold_prior_items.copy_(torch.as_tensor(prior.predict(feats) * ~warm))
    other = evaluate(ModelScorer(model, bank), queries)
    with torch.no_grad():
        model.cold_prior_items.zero_()  # cold items with no bias at all
    none = evaluate(ModelScorer(model, bank), queries)
    with torch.no_grad():
        model.cold_prior_items.copy_(before)
    return {
        "run": str(run),
        "seed": cfg["seed"],
        "epsilon": json.loads((run / "metrics.json").read_text())["privacy"].get("epsilon_max"),
        "own_backbone": cfg["backbone"],
        "own_prior": _short(own),
        "other_backbone": backbone,
        "other_prior": _short(other),
        "other_ridge": {"lambda": prior.lam, "cv_mse": round(prior.cv_mse[prior.lam], 5)},
        "no_prior": _short(none),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--backbone", default="mpnet")
    args = ap.parse_args()
    for run in args.runs:
        print(json.dumps(probe(run, args.backbone)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
