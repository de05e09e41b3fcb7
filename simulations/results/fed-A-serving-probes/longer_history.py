"""Probe: serve a federated protocol-A model with a longer history than it was trained with.

    python simulations/results/fed-A-serving-probes/longer_history.py RUN > longer_history.txt

RUN: a ``fedrec simulate`` protocol-A run whose ``model/`` is on disk. The ``recency`` tower
weighs the newest ``history_len`` items by the softmax of its learned position logits; here the
tower reads the newest L items, the older ones with logits continuing below the oldest learned
one by g per position (``g``: the decay). The user's own history on the serving side:
post-processing, no privacy cost. One line per (L, g): validation and test NDCG@10 (the choice
would be made on validation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.examples import right_aligned
from fedrec.shared.splitting import make_split


class LongerHistory:
    def __init__(self, model, items: torch.Tensor, length: int) -> None:
        self.model, self.items, self.length = model, items, length

    @torch.no_grad()
    def score(self, users, history, profiles, warm):
        ctx = torch.as_tensor(right_aligned(history, self.length))
        u = self.model.user_embeddings(self.items, ctx, None)
        return self.model.scores(u, self.items).numpy()


def main() -> None:
    run = Path(sys.argv[1])
    split = make_split(load_dataset(resolve_data_dir("ml-100k")), "A")
    assert split.valid is not None
    model, _ = load_model(run)
    model.eval()
    h = model.cfg.history_len
    learned = model.pos_logits.data.clone()
    print(f"run {run}: history_len {h}, position logits {learned.numpy().round(3).tolist()}")
    with torch.no_grad():
        items = model.item_embeddings()
    sets = {"valid": split.valid, "test": split.tests["test"]}
    for length in (h, 5, 10, 20, 50):
        for g in (0.0,) if length == h else (0.05, 0.2, 0.5, 1.0):
            older = learned[0] - g * torch.arange(length - h, 0, -1, dtype=learned.dtype)
            model.pos_logits = torch.nn.Parameter(torch.cat([older, learned]))
            res = {
                k: round(evaluate(LongerHistory(model, items, length), es, ks=(10,),
                                  with_auc=False)["NDCG@10"], 4)
                for k, es in sets.items()
            }  # fmt: skip
            print(f"L {length} g {g}: valid {res['valid']:.4f} test {res['test']:.4f}", flush=True)


if __name__ == "__main__":
    main()
