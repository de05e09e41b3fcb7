"""Probe: shrink a federated protocol-A model's DP-learned item biases toward their text prediction.

    python simulations/results/fed-A-bias-shrink/shrink.py RUN [RUN ...] > output.txt

Each RUN is a ``fedrec simulate`` protocol-A run whose model files (``model/``) are on disk.
For each item, ``b' = (1 - lam) * b + lam * pred``: ``b`` the released model's learned bias,
``pred`` a ridge regression of ``b`` on an encoder's embeddings of the public catalog texts
(5-fold CV, :func:`fedrec.shared.model.cold_prior.fit_text_prior`), the model's own frozen
MiniLM or mpnet. Post-processing of the released model. ``lam`` is chosen on the validation
queries (NDCG@10); test is printed for every ``lam`` only to report it. One JSON line per run
and encoder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fedrec.shared.backbone import TextEncoder
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import fit_text_prior, frozen_features
from fedrec.shared.splitting import make_split

LAMS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        cfg = json.loads((run / "config.json").read_text())["federation"]
        ds = load_dataset(resolve_data_dir(str(cfg["data"])))
        split = make_split(ds, "A")
        assert split.valid is not None
        model, _ = load_model(run)
        assert model.item_bias is not None
        bank = ProfileBank(model)
        b = model.item_bias.detach().double().numpy().copy()
        warm = model.warm.numpy()
        for enc in ("minilm-frozen", "mpnet"):
            feats = (
                frozen_features(model)
                if enc == "minilm-frozen"
                else TextEncoder("mpnet").encode_cached(ds.item_texts())
            )
            prior = fit_text_prior(feats, b, warm)
            pred = prior.predict(feats)
            rows = []
            for lam in LAMS:
                with torch.no_grad():
                    model.item_bias.copy_(torch.as_tensor((1 - lam) * b + lam * pred))
                sc = ModelScorer(model, bank)
                v = evaluate(sc, split.valid, ks=(10,), with_auc=False)["NDCG@10"]
                t = evaluate(sc, split.tests["test"], ks=(10,), with_auc=False)["NDCG@10"]
                rows.append({"lam": lam, "valid_NDCG@10": round(v, 4), "test_NDCG@10": round(t, 4)})
            best = max(rows, key=lambda r: r["valid_NDCG@10"])  # first best on ties
            cv = round(prior.cv_mse[prior.lam], 4)
            out = {"run": str(run), "encoder": enc, "ridge_cv_mse": cv, "rows": rows,
                   "chosen_on_validation": best}  # fmt: skip
            print(json.dumps(out), flush=True)
        with torch.no_grad():
            model.item_bias.copy_(torch.as_tensor(b))


if __name__ == "__main__":
    main()
