"""The federation's cold prior applied after the fact to a saved B-fed-eps8 run, at several weights.

``python simulations/results/central-B-prior/fed-probe/probe_fed.py RUN`` (RUN: a ``fedrec
simulate`` run of protocol B with its ``model/``). Weight 1 is what ``cold-prior = 1`` computes
at the end of a run; the others are computed on test and only reported.
"""

import sys
from pathlib import Path

import numpy as np

from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import dataset_and_split, resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import attach_cold_prior, frozen_features

model, _ = load_model(Path(sys.argv[1]))
ds, split = dataset_and_split(resolve_data_dir("ml-100k"), "B", 0)
warm = model.warm.numpy()
assert model.item_bias is not None, "the run's model has no item bias"
bias = model.item_bias.detach().double().numpy()
counts = np.bincount(split.train_item, minlength=len(warm))
corr = np.corrcoef(bias[warm], np.log1p(counts[warm]))[0, 1]
print(f"learned bias on trained items: std {bias[warm].std():.4f}, corr with log count {corr:.3f}")
feats = frozen_features(model)
bank = ProfileBank(model)
for w in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
    info = attach_cold_prior(model, w, features=feats)
    m = evaluate(ModelScorer(model, bank), split.tests["cold_items"], with_auc=False)
    print(f"w {w}: Recall@10 {m['Recall@10']:.4f} NDCG@10 {m['NDCG@10']:.4f}")
print(f"ridge strength {info['lambda']} (5-fold CV: {info['cv_mse']})")
