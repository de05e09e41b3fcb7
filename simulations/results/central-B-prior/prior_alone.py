"""The cold prior of a trained protocol-B model alone: every user's cold items ranked by it.

``python simulations/results/central-B-prior/prior_alone.py RUN`` (RUN: a train-central run of
protocol B with a cold prior, with its ``model/``). Prints the test metrics as JSON.
"""

import json
import sys
from pathlib import Path

from fedrec.shared.baselines.popularity import ConstantScorer
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import dataset_and_split, resolve_data_dir
from fedrec.shared.model.artifacts import load_model

model, _meta = load_model(Path(sys.argv[1]))
if not model.cold_prior_items.any():
    raise SystemExit(f"{sys.argv[1]}: the model has no cold prior")
_ds, split = dataset_and_split(resolve_data_dir("ml-100k"), "B", 0)
alone = ConstantScorer(model.cold_prior_items.double().numpy())
m = evaluate(alone, split.tests["cold_items"], with_auc=False)
print(json.dumps({k: round(v, 5) for k, v in m.items()}))
