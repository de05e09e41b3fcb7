"""On-device personalization of a federated run's global model, measured per device.

``python -m fedrec.simulations.personalize RUN --out OUT.json [--parts offset,recency,both]
[--steps 5,10,20] [--lrs 0.01,0.03,0.1]``

Each device (one user) takes the global model it received at the end of the federation and
fine-tunes a small part of it on its own training history, a part that is never sent anywhere:

* ``offset``: a personal vector ``d`` (dim numbers) added to the history part of the user
  vector, ``u = normalize(s + d)``: what the user's whole history says beyond the ``history-len``
  most recent items the shared tower reads;
* ``recency``: personal recency weights (``history-len`` numbers), replacing the global ones:
  how much this user's next item follows the latest items rather than older ones;
* ``both``.

It trains with Adam on every sliding window of its own training history (the next item from
the ``history-len`` before it, the full-catalog softmax, context items masked out, as central
training does), with the item vectors, item biases and score scale of the global model fixed.
Nothing of it leaves the device, so it costs no privacy: the global model is a DP release
(post-processing), and the user's own data stays local. The devices are simulated together (one
batched computation, each device's parameters a row that only its own windows reach), which is
the same arithmetic as each device alone.

Each setting is scored on every device's own held-out item. The part, step count and learning
rate are chosen on the mean validation NDCG@10 over all devices (pooled, as the run's own
evaluation is; in a deployment that choice is a release outside the DP guarantee), then the
test item is scored for the chosen one and for the global model unchanged, which must reproduce
the run's own test NDCG@10 (checked: a check of this harness). Writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PARTS = ("offset", "recency", "both")


def load_global(run: Path) -> tuple[Any, Any, Any, Any]:
    """The run's FedConfig, data set, split and model with the model the run released: the
    final global tensors, or their average over the rounds with ``ema-decay``."""
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.federation.data_and_model import (
        dataset_and_split,
        model_for,
        resolve_data_dir,
    )
    from fedrec.shared.federation.params import load_travelling

    cfg_path = run / "config.json"
    ck = run / "checkpoint" / "global.safetensors"
    if not cfg_path.is_file() or not ck.is_file():
        raise SystemExit(
            f"{run}: needs config.json and checkpoint/global.safetensors (a federated run "
            "folder as `fedrec simulate --out RUN` writes it)"
        )
    doc = json.loads(cfg_path.read_text())
    if "federation" not in doc:
        raise SystemExit(f"{cfg_path}: no 'federation' settings: not a federated run")
    cfg = FedConfig(**doc["federation"])
    ds, split = dataset_and_split(resolve_data_dir(cfg.data), cfg.protocol, cfg.seed)
    model = model_for(cfg, ds, split)
    from fedrec.server.app import load_checkpoint, resumed_average

    loaded = load_checkpoint(run)
    if loaded is None:
        raise SystemExit(f"{run}: checkpoint/round.json is missing: the checkpoint is incomplete")
    state = loaded[1]
    if cfg.ema_decay > 0:  # the released model is the rounds' average (ema-decay)
        try:
            state = resumed_average(run, cfg.ema_decay, loaded[0]).value()
        except ValueError as err:
            raise SystemExit(str(err)) from None
    load_travelling(model, state)
    model.eval()
    return cfg, ds, split, model


class Personal:
    """Every device's personal part as one row per user, over the fixed global item side."""

    def __init__(self, model: Any, n_users: int, part: str) -> None:
        with torch.no_grad():
            self.items = model.item_embeddings()  # (n_items, dim) fixed
            self.bias = model.biases()
            self.scale = float(model.log_scale.exp())
            self.pos = model.pos_logits.detach().clone()
        cfg = model.cfg
        if model.item_fac is not None or model.user_map is not None or cfg.use_profile:
            raise SystemExit(
                "personalize: models with item factors, a user map or profiles: not covered"
            )
        if cfg.user_tower != "recency":
            raise SystemExit("personalize: the recency user tower only")
        self.model = model
        self.part = part
        dim = self.items.shape[1]
        self.offset = torch.zeros(n_users, dim, requires_grad=part in ("offset", "both"))
        self.recency = (
            self.pos.expand(n_users, -1).clone().requires_grad_(part in ("recency", "both"))
        )

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.offset, self.recency) if p.requires_grad]

    def scores(self, users: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``(batch, n_items)`` for right-aligned ``context`` (batch, L) of users ``users``."""
        valid = context >= 0
        logits = self.recency[users].masked_fill(~valid, -torch.inf)
        w = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)
        s = (w.unsqueeze(-1) * self.items[context.clamp(min=0)]).sum(1)
        u = F.normalize(s + self.offset[users], dim=-1)
        return self.scale * u @ self.items.T + self.bias

    def fit(
        self,
        users: torch.Tensor,
        context: torch.Tensor,
        targets: torch.Tensor,
        n_users: int,
        steps: int,
        lr: float,
        chunk: int = 4096,
    ) -> None:
        """``steps`` full-batch Adam steps; each user's loss is the mean over its own windows,
        so a row's gradient is its own device's."""
        counts = torch.bincount(users, minlength=n_users).clamp(min=1).float()
        opt = torch.optim.Adam(self.params(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for s in range(0, users.shape[0], chunk):
                u, c, t = users[s : s + chunk], context[s : s + chunk], targets[s : s + chunk]
                logits = self.scores(u, c)
                known = torch.zeros_like(logits, dtype=torch.bool)
                rows = torch.arange(c.shape[0]).unsqueeze(1).expand_as(c)
                ok = c >= 0
                known[rows[ok], c[ok]] = True
                known[torch.arange(t.shape[0]), t] = False
                loss = F.cross_entropy(logits.masked_fill(known, -torch.inf), t, reduction="none")
                (loss / counts[u]).sum().backward()
            opt.step()

    def scorer(self) -> Any:
        outer = self

        class _S:
            @torch.no_grad()
            def score(
                self,
                users: np.ndarray,
                history: Sequence[np.ndarray],
                profiles: Sequence[str | None],
                warm: np.ndarray,
            ) -> np.ndarray:
                from fedrec.shared.model.examples import right_aligned

                ctx = torch.as_tensor(right_aligned(history, outer.model.cfg.history_len))
                return outer.scores(torch.as_tensor(users, dtype=torch.long), ctx).numpy()

        return _S()


def paired(before: Any, after: Any, evalset: Any, *, resamples: int = 2000) -> dict[str, Any]:
    """Per-device NDCG@10 differences (after - before) on the same queries: their mean, a 95 %
    paired bootstrap interval (over devices, seed 0), and how many devices gain or lose."""
    from fedrec.shared.evaluation import per_query_metrics

    rows = slice(0, len(evalset))
    ones = np.ones(len(evalset), bool)
    profiles = [None] * len(evalset)

    def per_device(scorer: Any) -> np.ndarray:
        s = np.asarray(scorer.score(evalset.users, evalset.history, profiles, ones), np.float64)
        return per_query_metrics(s.copy(), evalset, rows, with_auc=False)["NDCG@10"]

    diff = per_device(after) - per_device(before)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, diff.shape[0], (resamples, diff.shape[0]))].mean(1)
    return {
        "ndcg10_diff_mean": float(diff.mean()),
        "ndcg10_diff_ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "devices_gain": int((diff > 0).sum()),
        "devices_lose": int((diff < 0).sum()),
        "devices": int(diff.shape[0]),
    }


def run(
    run_dir: Path,
    parts: Sequence[str],
    steps: Sequence[int],
    lrs: Sequence[float],
) -> dict[str, Any]:
    from fedrec.shared.evaluation import evaluate
    from fedrec.shared.model.examples import sequence_examples

    torch.manual_seed(0)
    cfg, _ds, split, model = load_global(run_dir)
    if split.valid is None or "test" not in split.tests:
        raise SystemExit("personalize: needs a protocol with validation and test queries (A)")
    n_users = split.n_users
    ex = sequence_examples(split.train_histories(), cfg.history_len)
    users, targets, context = (torch.as_tensor(np.asarray(x)) for x in ex)
    test = split.tests["test"]
    t0 = time.perf_counter()
    base = Personal(model, n_users, "offset")
    doc: dict[str, Any] = {
        "run": str(run_dir),
        "windows": int(targets.shape[0]),
        "global": {
            "valid": evaluate(base.scorer(), split.valid),
            "test": evaluate(base.scorer(), test),
        },
        "grid": [],
    }
    reported = json.loads((run_dir / "metrics.json").read_text())["model"]["metrics"]["test"]
    if abs(reported["NDCG@10"] - doc["global"]["test"]["NDCG@10"]) > 1e-6:
        raise SystemExit(
            f"personalize: the global model scores test NDCG@10 "
            f"{doc['global']['test']['NDCG@10']:.6f} here but {reported['NDCG@10']:.6f} in "
            f"{run_dir}/metrics.json: the harness does not evaluate as the run did"
        )
    for part in parts:
        for lr in lrs:
            p = Personal(model, n_users, part)
            done = 0
            for k in sorted(steps):
                p.fit(users, context, targets, n_users, k - done, lr)
                done = k
                v = evaluate(p.scorer(), split.valid)
                row = {"part": part, "lr": lr, "steps": k, "valid": v}
                doc["grid"].append(row)
                print(
                    f"{part:8s} lr {lr:<6g} steps {k:3d}: valid NDCG@10 {v['NDCG@10']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    best = max(doc["grid"], key=lambda r: r["valid"]["NDCG@10"])
    p = Personal(model, n_users, best["part"])
    p.fit(users, context, targets, n_users, best["steps"], best["lr"])
    doc["chosen"] = {
        "part": best["part"],
        "lr": best["lr"],
        "steps": best["steps"],
        "chosen_on": "valid NDCG@10",
        "valid": best["valid"],
        "test": evaluate(p.scorer(), test),
        "test_paired": paired(base.scorer(), p.scorer(), test),
    }
    doc["seconds"] = time.perf_counter() - t0
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="offset,recency,both")
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown {bad}; choose from {', '.join(PARTS)}")
    try:
        steps = [int(s) for s in args.steps.split(",")]
        lrs = [float(s) for s in args.lrs.split(",")]
    except ValueError as e:
        ap.error(f"--steps/--lrs: comma lists of numbers ({e})")
    if not steps or min(steps) < 1 or not lrs or min(lrs) <= 0:
        ap.error("--steps: whole numbers >= 1; --lrs: numbers > 0")
    doc = run(args.run, parts, steps, lrs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    g, c = doc["global"]["test"], doc["chosen"]
    print(
        f"global model: test NDCG@10 {g['NDCG@10']:.4f}; personalized ({c['part']}, lr "
        f"{c['lr']:g}, {c['steps']} steps, chosen on validation): test NDCG@10 "
        f"{c['test']['NDCG@10']:.4f} (per device, mean difference "
        f"{c['test_paired']['ndcg10_diff_mean']:+.4f}, 95 % interval "
        f"{c['test_paired']['ndcg10_diff_ci95'][0]:+.4f} .. "
        f"{c['test_paired']['ndcg10_diff_ci95'][1]:+.4f}); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
