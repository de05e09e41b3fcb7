"""Load a ``train-central`` run trained with ``train.holdout`` > 0, with the split it was trained
on: what the scripts that choose a post-training setting on held-out data share
(``cold_prior``: the cold prior's weight on pseudo-cold items, protocol B; ``blend_prior``: the
blend weight on pseudo-cold users, protocol C)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared.data import load_dataset
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.data.errors import DataError
from fedrec.shared.federation.data_and_model import resolve_data_dir
from fedrec.shared.model.artifacts import ModelFileError, load_model
from fedrec.shared.model.run_central import with_profile_template
from fedrec.shared.splitting import EvalSet, Split, holdout_split, make_split


@dataclass
class HoldoutRun:
    cfg: dict[str, Any]  # the run's config.json
    ds: Dataset  # the data set, with the run's profile template
    split: Split  # the protocol's split (test queries)
    fit: Split  # what the model trained on: the split minus the holdout
    model: Any  # the run's RecModel

    @property
    def valid(self) -> EvalSet:
        """The holdout's validation queries (``fit.valid``, never None for a holdout run)."""
        assert self.fit.valid is not None  # load_holdout_run refuses a run without them
        return self.fit.valid


def holdout_config(
    run: Path,
    protocol: str,
    holdout_hint: str,
    refuse: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """``run``'s config.json if it is a ``train-central --protocol {protocol}`` run with a
    holdout, else SystemExit saying what is wrong (``holdout_hint``: the ``--set`` that gives a
    holdout). ``refuse(cfg)`` returns a reason to refuse the run for the caller's purpose (or
    None): checked here, before anything heavy is loaded."""
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
    reason = refuse(cfg) if refuse is not None else None
    if reason:
        raise SystemExit(f"{run}: {reason}")
    return cfg


def load_holdout_run(
    run: Path,
    protocol: str,
    holdout_hint: str,
    data: str | None = None,
    refuse: Callable[[dict[str, Any]], str | None] | None = None,
) -> HoldoutRun:
    """The run at ``run`` (checked by :func:`holdout_config`, with ``refuse``) with its model and
    data (else SystemExit saying what is wrong). ``data`` (a data set name or folder) overrides
    the data the run recorded: runs before bc26920 record only the data set's name."""
    cfg = holdout_config(run, protocol, holdout_hint, refuse)
    train = cfg["train"]
    try:
        model, _meta = load_model(run)
    except (OSError, ModelFileError) as err:
        raise SystemExit(
            f"{run}: no usable model ({err}); committed result folders keep no weights, so "
            "rerun the training command the folder records"
        ) from None
    # "data" (a name or an absolute folder) since bc26920; older runs name the data set only
    where = data or cfg.get("data") or cfg.get("dataset", "ml-100k")
    try:
        ds = load_dataset(resolve_data_dir(where))
    except (OSError, DataError) as err:
        raise SystemExit(
            f"{run}: cannot load its data {where!r} ({err}); pass --data NAME_OR_FOLDER"
        ) from None
    ds = with_profile_template(ds, cfg["model"].get("profile_template", ""))
    split = make_split(ds, protocol)
    profiles = [ds.user_text(int(u)) for u in split.user_ids]
    fit = holdout_split(split, float(train["holdout"]), profiles, seed=int(train["seed"]) + 1)
    if fit.valid is None:  # holdout_split always makes one for a holdout > 0
        raise SystemExit(f"{run}: its holdout has no validation queries")
    return HoldoutRun(cfg=cfg, ds=ds, split=split, fit=fit, model=model)
