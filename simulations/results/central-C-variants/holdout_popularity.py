"""Popularity's NDCG@10 on the pseudo-cold validation queries of ``train.holdout`` (B and C).

Run: ``FEDREC_DATA=... python simulations/results/central-C-variants/holdout_popularity.py``.
Popularity counts the interactions left for training after the holdout, as the model sees them.
"""

from fedrec.client.runtime import resolve_data_dir
from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.splitting import holdout_split, make_split

ds = load_dataset(resolve_data_dir("ml-100k"))
sp = make_split(ds, "C")
fit = holdout_split(sp, 0.1, [ds.user_text(int(u)) for u in sp.user_ids], seed=1)
assert fit.valid is not None
m = evaluate(Popularity(fit), fit.valid, ks=(10,), with_auc=False)
print(
    f"C holdout (seed 1, 10% of trained users): popularity NDCG@10 {m['NDCG@10']:.4f}, "
    f"{m['n_queries']} queries"
)
