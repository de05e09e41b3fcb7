"""Popularity's NDCG@10 on the pseudo-cold validation queries of ``train.holdout`` (protocol C).

Run: ``FEDREC_DATA=... python -m fedrec.simulations.holdout_popularity``. Popularity counts the
interactions left for training after the holdout, as the model sees them. The value is the
reference line of ``simulations/results/central-C-variants/README.md``.
"""

from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.splitting import holdout_split, make_split


def main() -> None:
    ds = load_dataset(resolve_data_dir("ml-100k"))
    sp = make_split(ds, "C")
    fit = holdout_split(sp, 0.1, [ds.user_text(int(u)) for u in sp.user_ids], seed=1)
    assert fit.valid is not None
    m = evaluate(Popularity(fit), fit.valid, ks=(10,), with_auc=False)
    print(
        f"C holdout (seed 1, 10% of trained users): popularity NDCG@10 {m['NDCG@10']:.4f}, "
        f"{m['n_queries']} queries"
    )


if __name__ == "__main__":
    main()
