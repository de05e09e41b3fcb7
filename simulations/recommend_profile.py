"""The public ``Recommender.recommend()`` against the evaluation, on ML-100K protocol A.

``python -m fedrec.simulations.recommend_profile RUN``: RUN is a protocol-A ``train-central`` run
(a model trained with profiles). For each of the 943 test users it ranks with ``recommend()``,
once without and once with the user's profile text, and prints both NDCG@10 beside the run's own
``metrics.json`` value: with the profile they must agree (the API ranks as the evaluation does).
Result: ``simulations/results/recommend-profile/``.
"""

import json
import math
import sys
from pathlib import Path

from fedrec.shared.data import load_dataset
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.inference import Recommender
from fedrec.shared.splitting import make_split


def main() -> None:
    run = Path(sys.argv[1])
    ds = load_dataset(resolve_data_dir("ml-100k"))
    sp = make_split(ds, "A")
    q = sp.tests["test"]
    rec = Recommender.load(run)
    ids = ds.item_ids
    out = {}
    for use in (False, True):
        total = 0.0
        for b in range(len(q)):
            hist = [int(ids[i]) for i in q.history[b]]
            target = int(ids[q.relevant[b][0]])
            prof = q.profiles[b] if use else None
            top = [r.item_id for r in rec.recommend(hist, k=10, profile=prof)]
            total += 1 / math.log2(top.index(target) + 2) if target in top else 0.0
        out["with profile" if use else "without profile"] = round(total / len(q), 4)
    m = json.loads((run / "metrics.json").read_text())
    out["metrics.json (evaluation)"] = round(m["model"]["metrics"]["test"]["NDCG@10"], 4)
    out["queries"] = len(q)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
