"""Diagnostics of a trained run on its own TRAINING data, for the cold protocols (never on test).

Run: ``python -m fedrec.simulations.diagnose_cold items RUN`` (a protocol B run) or
``... users RUN`` (a protocol C run), with ``FEDREC_DATA`` pointing at the data.

``items``: hold out a random 20% of the *trained* items as a pretend-cold pool (seed 5), and let
every training user rank that pool, text only (no ID residual, no bias, as cold items are
scored), from its other training items. Compares the learned recency weights with uniform
weights over the same history: if uniform wins, the user tower's recency weighting hurts a task
whose items lie anywhere in the timeline.

``users``: 150 training users (seed 5), each given nothing (k = 0) and its profile, rank all
items; relevant = all its training items. Compares the model, the model with the profile gate at
0 (the item bias alone) and popularity. Both use seen data, so they say which part of the model
is off, not how it does on new items or users.

Prints one JSON object. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.data import load_dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.central import ProfileBank
from fedrec.shared.model.examples import right_aligned
from fedrec.shared.model.towers import RecModel
from fedrec.shared.splitting import EvalSet, Split, make_split

SEED = 5


class _Scorer:
    def __init__(self, model: RecModel, items: torch.Tensor, candidates: torch.Tensor) -> None:
        self.model, self.items, self.candidates = model, items, candidates
        self.bank = ProfileBank(model)

    @torch.no_grad()
    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        m = self.model
        ctx = torch.as_tensor(right_aligned(history, m.cfg.history_len))
        prof = torch.stack([self.bank(p) if p else torch.zeros(m.dim) for p in profiles])
        u = m.user_embeddings(self.items, ctx, prof)
        return m.scores(u, self.candidates).numpy()


def _embed(model: RecModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-only unit vectors, full item vectors) of the catalog, by the plain path."""
    with torch.no_grad():
        text = model.text_embeddings()
        return F.normalize(text, dim=-1), model.item_embeddings(text)


def _round(m: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in m.items()}


def diagnose_items(model: RecModel, split: Split, profiles: list[str | None]) -> dict:
    cold, items = _embed(model)
    trained = np.unique(split.train_item)
    pool = np.random.default_rng(SEED).choice(trained, trained.size // 5, replace=False)
    users, hist, rel = [], [], []
    for u, h in enumerate(split.train_histories()):
        c = np.isin(h, pool)
        if c.any() and (~c).sum() >= 5:
            users.append(u)
            hist.append(h[~c])
            rel.append(np.unique(h[c]))
    arr = np.asarray(users, dtype=np.int64)
    es = EvalSet(
        name="pretend_cold_items",
        users=arr,
        history=hist,
        exclude=[np.empty(0, dtype=np.int64)] * len(users),
        relevant=rel,
        warm=np.ones(len(users), dtype=bool),
        candidates=np.sort(pool),
        profiles=[profiles[u] for u in users],
    )
    model.item_bias = None  # cold items have no bias; scores() then adds zeros
    out = {"learned_weights": _round(evaluate(_Scorer(model, items, cold), es, ks=(10,)))}
    with torch.no_grad():
        model.pos_logits.zero_()
    out["uniform_weights"] = _round(evaluate(_Scorer(model, items, cold), es, ks=(10,)))
    return out


def diagnose_users(model: RecModel, split: Split, profiles: list[str | None]) -> dict:
    _, items = _embed(model)
    hist = split.train_histories()
    trained = np.unique(split.train_user)
    users = np.random.default_rng(SEED).choice(trained, 150, replace=False)
    none = np.empty(0, dtype=np.int64)
    es = EvalSet(
        name="training_users_k0",
        users=users,
        history=[none] * users.size,
        exclude=[none] * users.size,
        relevant=[np.unique(hist[u]) for u in users],
        warm=np.zeros(users.size, dtype=bool),
        profiles=[profiles[u] for u in users],
    )
    out: dict[str, object] = {
        "gate": round(float(model.profile_gate), 4),
        "scale": round(float(model.log_scale.exp()), 2),
    }
    out["model"] = _round(evaluate(_Scorer(model, items, items), es, ks=(10,)))
    with torch.no_grad():
        model.profile_gate.zero_()
    out["item_bias_alone"] = _round(evaluate(_Scorer(model, items, items), es, ks=(10,)))
    out["popularity"] = _round(evaluate(Popularity(split), es, ks=(10,)))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["items", "users"])
    ap.add_argument("run", type=Path, help="a train-central run folder (protocol B or C)")
    ap.add_argument("--data", default="ml-100k")
    args = ap.parse_args(argv)
    model, meta = load_model(args.run)
    config = json.loads((args.run / "config.json").read_text())
    protocol = config.get("protocol")
    if protocol not in ("B", "C"):
        raise SystemExit(f"{args.run}: protocol {protocol!r}; these diagnostics are for B and C")
    ds = load_dataset(resolve_data_dir(args.data))
    split = make_split(ds, protocol)
    profiles = [ds.user_text(int(u)) for u in split.user_ids]
    model.eval()
    fn = diagnose_items if args.what == "items" else diagnose_users
    result = {"run": str(args.run), "protocol": protocol, args.what: fn(model, split, profiles)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
