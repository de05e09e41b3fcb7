"""The run directory of a federated run: model, metrics, privacy statement, plots."""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.baselines import BASELINES, run_baselines
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.segments import (
    SegmentPriorScorer,
    build_prior,
    n_segments,
    parse_fields,
    segments_of,
)
from fedrec.shared.model.artifacts import save_model
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.model.cold_prior import attach_cold_prior_paired, clear_cold_prior
from fedrec.shared.model.run_central import item_titles
from fedrec.shared.model.towers import RecModel
from fedrec.shared.plots import plot_rounds
from fedrec.shared.privacy.statement import statement
from fedrec.shared.rundir import versions, write_json
from fedrec.shared.splitting import Split

log = logging.getLogger("fedrec.server")


def baseline_names(spec: str) -> list[str]:
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(BASELINES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: unknown {unknown}; choose from {list(BASELINES)}")
    return names


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The ledger's client lines (not the server's notes on missing clients)."""
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [x for x in lines if "client" in x]


def _cold_prior(cfg: FedConfig, model: RecModel, bank: ProfileBank, split: Split) -> dict[str, Any]:
    """Attach the cold prior (``cold-prior``, read by ``cold-prior-backbone``). With another
    encoder than the model's own, the same model with its own backbone's prior is scored first:
    a paired comparison recorded as ``own_backbone``."""

    def score() -> dict[str, Any]:
        scorer = ModelScorer(model, bank)
        return {k: evaluate(scorer, es) for k, es in split.tests.items()}

    try:
        return attach_cold_prior_paired(
            model, cfg.cold_prior, score, backbone=cfg.cold_prior_backbone
        )
    except Exception as err:  # e.g. too few trained items, an unreadable encoder: keep the run
        clear_cold_prior(model)
        log.warning("cold prior not attached: %s: %s", type(err).__name__, err)
        return {"weight": cfg.cold_prior, "error": f"not attached: {type(err).__name__}: {err}"}


def write_outputs(
    run: Path,
    cfg: FedConfig,
    ds: Dataset,
    split: Split,
    model: RecModel,
    bank: ProfileBank,
    *,
    rounds: list[dict[str, Any]],
    central: dict[int, dict[str, Any]],
    federated: dict[int, dict[str, float]],
    upload_bytes: int,
    baselines: str,
    seconds: float,
    user_level: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    average: dict[str, Any] | None = None,
    segments: tuple[np.ndarray | None, int, float | None, str, int] = (None, 0, None, "none", 0),
) -> dict[str, Any]:
    prior: dict[str, Any] | None = None
    if cfg.cold_prior > 0:  # post-processing of the released model and the public catalog
        prior = _cold_prior(cfg, model, bank, split)
    scorer: Any = ModelScorer(model, bank)
    segment_info = None
    if cfg.segment_prior:
        scorer, segment_info = with_segment_prior(scorer, cfg, ds, split, *segments)
    result: dict[str, Any] = {"protocol": cfg.protocol, "command": "simulate"}
    result["model"] = {
        "metrics": {k: evaluate(scorer, es) for k, es in split.tests.items()},
        "rounds": rounds,
        "central_evaluation": {str(k): v for k, v in central.items()},
        "federated_evaluation": {str(k): v for k, v in federated.items()},
        "upload_bytes_per_client_round": upload_bytes,
    }
    if average is not None:  # ema-decay: the scores above are the average's
        result["model"]["average"] = average
    if prior is not None:
        result["model"]["cold_prior"] = prior
    if segment_info is not None:
        if "error" not in segment_info:  # the same model without the prior, for comparison
            alone = ModelScorer(model, bank)
            segment_info["model_alone"] = {k: evaluate(alone, es) for k, es in split.tests.items()}
        result["model"]["segment_prior"] = segment_info
    if split.valid is not None:
        result["model"]["valid"] = evaluate(scorer, split.valid)
    save_model(model, run, item_ids=[int(i) for i in ds.item_ids], titles=item_titles(ds))
    clear_cold_prior(model)  # the model object may be cached in this process: leave it as trained
    base = run_baselines(ds, cfg.protocol, names=baseline_names(baselines), backbone=cfg.backbone)
    result["split"] = base["split"]
    result["baselines"] = base["baselines"]
    if privacy is not None:  # dp-noise=secure: the run's claim, from its secure rounds
        result["privacy"] = privacy
    else:
        ledger = read_ledger(run / "privacy" / "ledger.jsonl")
        result["privacy"] = privacy_summary(cfg, ledger)
        result["privacy"]["user_level"] = user_level or {"enabled": False}
    result["seconds"] = round(seconds, 1)
    from fedrec.server import sim_runtime

    # how the run's Flower simulation engine handed out messages (None: not a simulation)
    result["runtime"] = {"flower_linkstate_index": sim_runtime.INSTALLED}
    write_json(
        run / "config.json",
        {
            "command": "simulate",
            "federation": cfg.as_dict(),
            "model": model.cfg.__dict__,
            "versions": versions(),
        },
    )
    write_json(run / "metrics.json", result)
    (run / "privacy").mkdir(parents=True, exist_ok=True)
    (run / "privacy" / "statement.md").write_text(statement(cfg, result["privacy"]))
    plot_rounds(run / "rounds.png", rounds, central, result["baselines"])
    return result


def with_segment_prior(
    scorer: Any,
    cfg: FedConfig,
    ds: Dataset,
    split: Split,
    total: np.ndarray | None,
    tables: int,
    noise_tables: float | None = None,
    combined: str = "none",
    trimmed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """``scorer`` with the segment prior for new users (:mod:`fedrec.shared.federation.segments`)
    from the combined released tables (summed, or combined robustly: ``combined`` the run's
    ``robust``, ``trimmed`` the values dropped at each end of a cell, ``noise_tables`` the DP
    noise variance in units of one table's), and what metrics.json says about it. No table
    received: the model alone, and the reason."""
    fields = parse_fields(cfg.segment_prior)
    info: dict[str, Any] = {
        "fields": list(fields),
        "tables": tables,
        "noise_per_table": cfg.segment_noise if cfg.dp else 0.0,
        "shrink": cfg.segment_shrink,
        "weight": cfg.segment_weight,
        "counts_file": "segment_counts.npz",
        # how the tables were combined ("none": summed; else the robust combination, which
        # drops `trimmed` values at each end of a cell: 0 means it summed them)
        "combined": combined,
        "trimmed": trimmed,
        "noise_tables": tables if noise_tables is None else noise_tables,
        # what each table adds to a client's round-1 upload (float64 cells, before framing)
        "table_bytes": 8 * n_segments(fields) * split.n_items,
    }
    if total is None or tables == 0:
        return scorer, info | {"error": "no segment counts were received: the model alone ranks"}
    prior = build_prior(
        total,
        tables,
        dp=cfg.dp,
        noise=cfg.segment_noise,
        shrink=cfg.segment_shrink,
        noise_tables=noise_tables,
    )
    user_segments = segments_of(ds.user_fields, split.user_ids, fields)
    return SegmentPriorScorer(scorer, prior, user_segments, cfg.segment_weight), info


def privacy_summary(cfg: FedConfig, ledger: list[dict[str, Any]]) -> dict[str, Any]:
    last: dict[str, float] = {}
    rounds: Counter[str] = Counter()
    for line in ledger:
        last[line["client"]] = max(last.get(line["client"], 0.0), float(line["epsilon_after"]))
        rounds[line["client"]] += int(bool(line.get("trained", True)))
    eps = sorted(last.values())
    return {
        "dp": cfg.dp,
        "clients": len(eps),
        "epsilon_max": max(eps) if eps else 0.0,
        "epsilon_median": statistics.median(eps) if eps else 0.0,
        "epsilon_budget": cfg.epsilon if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None,
        "rounds_per_client": dict(sorted(Counter(rounds.values()).items())),
        "refusals": sum(1 for line in ledger if not line.get("trained", True)),
    }
