"""Load a ``train-central`` run trained with ``train.holdout`` > 0, with the split it was trained
on: what the scripts that choose a post-training setting on held-out data share
(``cold_prior``: the cold prior's weight on pseudo-cold items, protocol B; ``blend_prior``: the
blend weight on pseudo-cold users, protocol C)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.data import load_dataset
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.run_central import with_profile_template
from fedrec.shared.splitting import EvalSet, Split, holdout_split, make_split


@dataclass
class HoldoutRun:
    cfg: dict[str, Any]  # the run's config.json
    ds: Dataset  # the data set, with the run's profile template
    split: Split  # the protocol's split (test queries)
    fit: Split  # what the model trained on: the split minus the holdout
    valid: EvalSet  # the holdout's validation queries (``fit.valid``)
    model: Any  # the run's RecModel


def load_holdout_run(run: Path, protocol: str, holdout_hint: str) -> HoldoutRun:
    """The run at ``run``, which must be a ``train-central --protocol {protocol}`` run with a
    holdout (else SystemExit saying so; ``holdout_hint`` is the ``--set`` that gives one)."""
    cfg_path = run / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{cfg_path}: not a readable train-central run ({err})") from None
    train = cfg.get("train", {})
    if cfg.get("command") != "train-central" or cfg.get("protocol") != protocol:
        raise SystemExit(f"{run}: needs a train-central run of protocol {protocol}")
    if not float(train.get("holdout", 0)) > 0:
        raise SystemExit(
            f"{run}: train.holdout is 0, so nothing was held out to choose on; train with "
            f"--set {holdout_hint}"
        )
    ds = with_profile_template(
        # "data" (a name or an absolute folder) since 2026-12-02; older runs name it only
        load_dataset(resolve_data_dir(cfg.get("data") or cfg.get("dataset", "ml-100k"))),
        cfg["model"].get("profile_template", ""),
    )
    split = make_split(ds, protocol)
    profiles = [ds.user_text(int(u)) for u in split.user_ids]
    fit = holdout_split(split, float(train["holdout"]), profiles, seed=int(train["seed"]) + 1)
    if fit.valid is None:  # holdout_split always makes one for a holdout > 0
        raise SystemExit(f"{run}: its holdout has no validation queries")
    model, _meta = load_model(run)
    return HoldoutRun(cfg=cfg, ds=ds, split=split, fit=fit, valid=fit.valid, model=model)
