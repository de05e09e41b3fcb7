"""The empirical privacy audit's run: RUN's federation again, with canaries, then the attack.

``fedrec audit RUN --empirical`` (writes ``RUN/privacy/empirical.json``; the audit run goes to
``RUN/privacy/empirical/run``). The canaries, the membership scores and the one-run lower bound
on epsilon are :mod:`fedrec.shared.privacy.empirical` (what they are, and why the bound is valid).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.privacy.empirical import (
    canary_scores,
    client_file,
    membership_stats,
    one_run_bound,
    plan_canaries,
    write_canary_data,
)
from fedrec.shared.rundir import write_json


def run_empirical(
    run: Path,
    cfg: FedConfig,
    *,
    canaries: int = 1000,
    seed: int = 0,
    context_len: int = 5,
    on_round: Any = None,
    rescore: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` with canaries under ``RUN/privacy/empirical/`` and attack the result
    (``rescore``: attack the existing audit run again instead of training)."""
    from fedrec.shared.data import load_dataset
    from fedrec.shared.privacy.report import load_fed_config
    from fedrec.simulations.launch import n_clients, simulate

    if canaries < 20:
        raise ValueError(f"--canaries {canaries}: use at least 20 (1000 is typical)")
    if cfg.use_profile:
        raise ValueError("the empirical audit does not support use-profile=true")
    base = run / "privacy" / "empirical"
    out = base / "run"
    if rescore:
        if not (out / "metrics.json").is_file() or not (base / "plan.json").is_file():
            raise FileNotFoundError(f"{base}: no finished audit run to rescore")
        plan = json.loads((base / "plan.json").read_text())
        result = json.loads((out / "metrics.json").read_text())
        cfg = replace(load_fed_config(out), audit_canaries="")
        return _report(run, cfg, plan, result, out, canaries=len(plan["item"]), seed=seed)
    rng = np.random.default_rng(seed)
    data = base / "data"
    ids = write_canary_data(resolve_data_dir(cfg.data), data, canaries, rng)
    ds = load_dataset(data)
    pos = {int(i): k for k, i in enumerate(ds.item_ids)}
    canary_index = np.asarray([pos[i] for i in ids])
    real = np.setdiff1d(np.arange(len(ds.item_ids)), canary_index)
    clients = [f"p{i}" for i in range(n_clients(replace(cfg, data=str(data))))]
    plan = plan_canaries(canary_index, real, clients, min(context_len, cfg.history_len), rng)
    (base / "plan.json").write_text(json.dumps(plan))  # the auditor's secret: who is in
    (base / "canaries.json").write_text(json.dumps(client_file(plan)))
    audit_cfg = replace(cfg, data=str(data), audit_canaries=str(base / "canaries.json"))
    if out.exists():
        shutil.rmtree(out)
    result = simulate(audit_cfg, out, baselines="none", on_round=on_round)
    return _report(run, cfg, plan, result, out, canaries=canaries, seed=seed)


def _report(
    run: Path,
    cfg: FedConfig,
    plan: dict[str, Any],
    result: dict[str, Any],
    out: Path,
    *,
    canaries: int,
    seed: int,
) -> dict[str, Any]:
    from fedrec.shared.model.artifacts import load_model
    from fedrec.shared.privacy.report import audit_run

    model, _ = load_model(out, backbone=cfg.backbone)
    scores = canary_scores(model, plan)
    included = np.asarray(plan["included"])
    report: dict[str, Any] = {
        "dp": cfg.dp,
        "epsilon_budget": cfg.epsilon if cfg.dp else None,
        "epsilon_spent_max": result["privacy"]["epsilon_max"] if cfg.dp else None,
        "delta": cfg.delta,
        "canaries": canaries,
        "included": int(included.sum()),
        "clients_with_canaries": len(set(plan["client"])),
        "seed": seed,
        "membership": membership_stats(scores, included),
        "lower_bound": one_run_bound(scores, included, cfg.delta),
        "audit_run": str(out),
        "config": {k: v for k, v in cfg.to_flat().items()},
    }
    if cfg.dp:
        ledger, _text = audit_run(out, plot=False)
        report["audit_run_ledger_ok"] = ledger["ok"]
        claimed = report["epsilon_spent_max"]
        report["bug"] = report["lower_bound"]["epsilon"] > claimed
        # with too few canaries even a perfect attack cannot show a bound at the claim: then
        # "no bug" says nothing about this claim (compare with the same run without DP)
        report["conclusive"] = report["lower_bound"]["ceiling"] >= claimed
    else:
        report["bug"] = False
    write_json(run / "privacy" / "empirical.json", report)
    return report
