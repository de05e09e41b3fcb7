"""Probe: time-aware popularity on protocol A (non-private; how much a release of it could add).

    python simulations/results/fed-A-serving-probes/time_popularity.py > time_popularity.txt

Each training interaction counts ``exp(-|d - d'| / tau)`` toward its item, d' its day and d the
query's "now": the day of the newest interaction the query may read (the last training
interaction for validation, the validation interaction for test). ``past``: only days d' <= d
count. tau in days; 1e9 is plain popularity. One line per (tau, side): validation and test
NDCG@10.
"""

from __future__ import annotations

import numpy as np

from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.splitting import make_split, time_ordered


class DayPopularity:
    def __init__(self, table: np.ndarray, days: np.ndarray) -> None:
        self.table, self.days, self.at = table, days, 0

    def score(self, users, history, profiles, warm):
        rows = slice(self.at, self.at + len(users))
        self.at += len(users)
        return self.table[:, self.days[rows]].T


def main() -> None:
    ds = load_dataset(resolve_data_dir("ml-100k"))
    split = make_split(ds, "A")
    assert split.valid is not None
    u, _, t, _ = time_ordered(ds)
    bounds = np.searchsorted(u, np.arange(split.n_users + 1))
    day = (t - t.min()) // 86400
    n_days = int(day.max()) + 1
    counts = np.zeros((split.n_items, n_days))
    np.add.at(counts, (split.train_item, (split.train_time - t.min()) // 86400), 1.0)
    sets = {"valid": split.valid, "test": split.tests["test"]}
    # protocol A: a user's last interaction is the test target, the one before it validation's
    now = {
        "valid": np.array([day[bounds[q + 1] - 3] for q in split.valid.users]),
        "test": np.array([day[bounds[q + 1] - 2] for q in split.tests["test"].users]),
    }
    d = np.arange(n_days)
    for tau in (3, 10, 30, 60, 1e9):
        for side in ("both", "past"):
            kernel = np.exp(-np.abs(d[:, None] - d[None, :]) / tau)
            if side == "past":
                kernel = kernel * (d[:, None] <= d[None, :])
            table = counts @ kernel
            res = {
                k: evaluate(DayPopularity(table, now[k]), es, ks=(10,), with_auc=False)["NDCG@10"]
                for k, es in sets.items()
            }
            line = f"tau {tau:g} {side}: valid {res['valid']:.4f} test {res['test']:.4f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
