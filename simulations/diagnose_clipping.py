"""Where DP-SGD's clip goes: each parameter group's share of every example's gradient before
clipping, measured on one client's real round.

    python -m fedrec.simulations.diagnose_clipping --preset silos --part 0 --out F.json

It runs fedrec's ClientApp body in this process for one partition (the same data, model,
batches and DP-SGD step as a simulation's client: :class:`bench_round.InProcessClients`), and
records, at every clipping of a physical batch, each example's squared gradient norm per
parameter group before the clip (Opacus' ``DPOptimizer.clip_and_accumulate`` reads the same
per-example gradients). The report gives the distribution of the examples' total norms
against the clip (how often and how hard it binds) and each group's share of an example's
squared norm (which parameters take the clip of a step; a share of the norm is not a share of
the signal: the noise is the same on every coordinate).

A diagnostic for the data's owner, on the owner's machine: the norms are computed from the raw
per-example gradients, before clipping and noise, and are not differentially private. Nothing
here is sent anywhere; do not publish its output for data that must stay private. The round it
runs charges the partition's budget file under ``--work`` (a scratch folder), never a device's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# the DP-SGD scorer's (fedrec.shared.model.candidates.CandidateScorer) parameters by name
SCORER_GROUPS = {
    "tower.weight": "lora_B",
    "tower.a_weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_A.weight": "lora_A",
    "bias.weight": "item_bias",
    "fac.weight": "item_factors",
    "off.weight": "item_offsets",
    "profile_fac.weight": "profile_factors",
    "user_map.weight": "user_map",
    "recency.weight": "recency",
    "scale.weight": "log_scale",
    "gate.weight": "profile_gate",
}


def group_of(name: str) -> str:
    """The group a parameter's name belongs to: the DP-SGD scorer's parameters by what they
    are (:data:`SCORER_GROUPS`), LoRA matrices elsewhere by kind, anything else by its own name
    with wrapper prefixes and layer numbers dropped."""
    name = re.sub(r"^(_module\.)+", "", name)
    if name in SCORER_GROUPS:
        return SCORER_GROUPS[name]
    for kind in ("lora_B", "lora_A"):
        if kind in name:
            return kind
    name = re.sub(r"\.\d+(?=\.)", "", name)
    return name.removesuffix(".weight") if name.endswith(".weight") else name


class NormRecorder:
    """Per-example squared gradient norms by parameter group, one row per example clipped."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.rows: list[dict[str, float]] = []
        self.clip: float | None = None

    def record(self, params: list[torch.Tensor], grad_samples: list[torch.Tensor]) -> None:
        if not grad_samples or len(grad_samples[0]) == 0:
            return
        n = len(grad_samples[0])
        sums: dict[str, torch.Tensor] = {}
        for p, g in zip(params, grad_samples, strict=True):
            group = group_of(self.names.get(id(p), f"unnamed{tuple(p.shape)}"))
            sq = g.detach().reshape(n, -1).double().pow(2).sum(dim=1)
            sums[group] = sums[group] + sq if group in sums else sq
        for i in range(n):
            self.rows.append({k: float(v[i]) for k, v in sums.items()})


@contextlib.contextmanager
def recording() -> Iterator[NormRecorder]:
    """Within it, every local DP-SGD round in this process records its examples' norms."""
    from opacus.optimizers import DPOptimizer

    import fedrec.client.local_train as lt

    rec = NormRecorder()
    gsm, clip = lt.GradSampleModule, DPOptimizer.clip_and_accumulate

    class NamedGSM(gsm):  # type: ignore[misc, valid-type]
        def __init__(self, module: torch.nn.Module, *args: Any, **kw: Any) -> None:
            super().__init__(module, *args, **kw)
            rec.names.update({id(p): n for n, p in module.named_parameters()})

    def recorded(self: Any) -> None:
        rec.clip = float(self.max_grad_norm)
        rec.record(list(self.params), list(self.grad_samples))
        clip(self)

    lt.GradSampleModule = NamedGSM
    DPOptimizer.clip_and_accumulate = recorded
    try:
        yield rec
    finally:
        lt.GradSampleModule = gsm
        DPOptimizer.clip_and_accumulate = clip


def _q(values: np.ndarray) -> dict[str, float]:
    return {f"p{round(100 * q)}": float(np.quantile(values, q)) for q in QUANTILES}


def report(rec: NormRecorder) -> dict[str, Any]:
    """The distribution of the recorded examples' norms and of each group's share."""
    if not rec.rows:
        raise ValueError("no per-example gradients were recorded: was local DP-SGD on (dp=true)?")
    groups = sorted({g for r in rec.rows for g in r})
    sq = np.array([[r.get(g, 0.0) for g in groups] for r in rec.rows])
    total = sq.sum(axis=1)
    norm = np.sqrt(total)
    share = sq / np.where(total > 0, total, 1.0)[:, None]
    clip = rec.clip if rec.clip is not None else math.nan
    factor = np.minimum(1.0, clip / (norm + 1e-6))
    return {
        "examples": len(rec.rows),
        "clip": clip,
        "norm": _q(norm),
        "clipped_fraction": float(np.mean(norm > clip)),
        "clip_factor": _q(factor),
        "groups": {
            g: {
                "share_of_squared_norm": _q(share[:, j]),
                "mean_share": float(share[:, j].mean()),
                "norm": _q(np.sqrt(sq[:, j])),
            }
            for j, g in enumerate(groups)
        },
    }


def run(preset: str | None, sets: dict[str, str], part: int, work: Path) -> dict[str, Any]:
    """One round of partition ``part`` under the resolved settings, with its norms recorded."""
    from fedrec.client import app as client_app
    from fedrec.simulations.bench_round import InProcessClients
    from fedrec.simulations.launch import n_clients, resolve

    cfg, _ = resolve(None, sets, preset=preset)
    if not cfg.dp:
        raise ValueError(
            "diagnose_clipping: dp is false, so no example is clipped: per-example clipping is "
            "local DP-SGD's (user-level DP clips a client's whole update); use --set dp=true "
            "or a preset with local DP-SGD (silos, cross-device)"
        )
    n = n_clients(cfg)
    if not 0 <= part < n:
        raise ValueError(f"--part {part}: this run's partitions are 0..{n - 1}")
    clients = InProcessClients(cfg, n, work)
    with recording() as rec:
        reply = client_app.train(clients.train_msg(cfg, part + 1), clients.context(part + 1, part))
    if reply.has_error():
        raise RuntimeError(f"the client's round failed: {reply.error}")
    out = report(rec)
    out["settings"] = {"preset": preset, "set": sets, "part": part, "partitions": n}
    return out


def _print(out: dict[str, Any]) -> None:
    n, c = out["norm"], out["clip"]
    print(
        f"{out['examples']} example gradients (one per example per step) against the clip "
        f"{c}: norm p10 {n['p10']:.3f}, median "
        f"{n['p50']:.3f}, p90 {n['p90']:.3f}; {100 * out['clipped_fraction']:.1f} % above "
        f"the clip (median clip factor {out['clip_factor']['p50']:.3f})"
    )
    print(f"{'group':<32} {'share p25':>9} {'median':>7} {'p75':>7} {'mean':>7}")
    rows = sorted(out["groups"].items(), key=lambda kv: -kv[1]["mean_share"])
    for g, s in rows:
        q = s["share_of_squared_norm"]
        print(f"{g:<32} {q['p25']:>9.3f} {q['p50']:>7.3f} {q['p75']:>7.3f} {s['mean_share']:>7.3f}")


def main(argv: list[str] | None = None) -> int:
    from fedrec.shared.federation.config import parse_sets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="silos", help="a `fedrec simulate` preset")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override, as `fedrec simulate --set`",
    )
    ap.add_argument("--part", type=int, default=0, help="the partition (client) to run")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        sets = parse_sets(args.set)
        with tempfile.TemporaryDirectory() as tmp:
            out = run(args.preset, sets, args.part, args.work or Path(tmp))
    except ValueError as err:  # a bad --set, preset or partition: say it, no traceback
        ap.error(str(err))
    _print(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
