"""``fedrec train-central``: train on one split, evaluate beside the baselines, write RUN/.

RUN/ gets ``config.json`` (resolved), ``metrics.json`` (fedrec and baselines, same split),
``adapter/`` (PEFT), ``model/`` (head + catalog), ``training.png``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.shared.backbone import check_prior_backbone
from fedrec.shared.baselines import BASELINES, run_baselines
from fedrec.shared.data.dataset import Dataset, render
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.segments import (
    SegmentPriorScorer,
    build_prior,
    count_table,
    n_segments,
    parse_fields,
    save_segment_sum,
    segments_of,
)
from fedrec.shared.model.artifacts import save_model
from fedrec.shared.model.central import ModelScorer, build_model, train_central
from fedrec.shared.model.cold_prior import attach_cold_prior_paired
from fedrec.shared.model.config import ModelConfig, TrainConfig, as_dict, from_dict
from fedrec.shared.plots import plot_training
from fedrec.shared.rundir import versions, write_json
from fedrec.shared.splitting import Split, holdout_split, make_split

QUICK_TRAIN: dict[str, Any] = {"epochs": 1, "max_steps": 60}
QUICK_BASELINES = ["popularity", "itemknn"]


def parse_overrides(pairs: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` pairs -> (model dict, train dict). ``KEY=VALUE`` as for ``fedrec simulate``
    (the key names a field of exactly one of ModelConfig and TrainConfig; ``seed``, in both,
    sets both), or ``model.KEY=VALUE`` / ``train.KEY=VALUE`` to name the section."""
    from dataclasses import fields

    from fedrec.shared.model.config import ModelConfig, TrainConfig

    sections = {"model": {f.name for f in fields(ModelConfig)},
                "train": {f.name for f in fields(TrainConfig)}}  # fmt: skip
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.strip().rpartition(".")
        if not sep or not name or (dot and section not in sections):
            raise ValueError(
                f"--set {pair!r}: expected KEY=VALUE (e.g. lora-r=4, epochs=3), or "
                "model.KEY=VALUE / train.KEY=VALUE"
            )
        field = name.replace("-", "_")
        where = [section] if dot else [s for s, names in sections.items() if field in names]
        if not where:
            known = sorted(k.replace("_", "-") for names in sections.values() for k in names)
            raise ValueError(f"--set {pair!r}: unknown key '{name}'. Known keys: "
                             + ", ".join(dict.fromkeys(known)))  # fmt: skip
        for s in where:  # one key however it is spelled: the last --set wins
            out[s][field] = value.strip()
    return out["model"], out["train"]


def item_titles(ds: Dataset) -> list[str]:
    out = []
    for i in ds.item_ids:
        f = ds.item_fields[int(i)]
        title = f.get("title") or next(iter(f.values()), "")
        out.append(f"{title} ({f['year']})" if f.get("year") else title)
    return out


def _data_ref(data: str | None, name: str) -> str:
    if data is None:
        return name
    path = Path(data)
    return str(path.resolve()) if path.is_dir() else data


def with_profile_template(ds: Dataset, template: str) -> Dataset:
    """``ds`` whose profile texts use ``template`` (its own when ``template`` is empty).

    The profile text is what the user tower reads for every user, trained or cold, so training,
    validation and test queries all get the same rendering. ML-100K's own template ends in the
    zip code, which makes almost every profile unique: a model can then learn the training users'
    profiles by heart, and nothing of that carries over to a new user.
    """
    if not template:
        return ds
    if not ds.user_fields:
        raise ValueError(f"model.profile_template is set but data set {ds.name!r} has no profiles")
    known = sorted(next(iter(ds.user_fields.values())))
    try:
        for fields in ds.user_fields.values():
            render(template, fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"model.profile_template {template!r} cannot be filled ({err!r}); the data set's "
            f"profile fields are {known}, written as {{field}}"
        ) from None
    return dataclasses.replace(ds, user_text_template=template)


def central_segment_scorer(
    scorer: Any, ds: Dataset, fit: Split, cfg: TrainConfig
) -> tuple[Any, np.ndarray]:
    """``scorer`` with the segment prior of the users ``fit`` trains on, and their (segment,
    item) counts: exact (central training is not private), as the federation's
    ``segment-prior`` ranks new users with its released sum."""
    fields = parse_fields(cfg.segment_prior)
    users = np.unique(fit.train_user)
    every = segments_of(ds.user_fields, fit.user_ids, fields)
    items = [fit.train_item[fit.train_user == u] for u in users]
    counts = count_table(items, every[users], fit.n_items, n_segments(fields))
    prior = build_prior(counts, 1, dp=False, noise=0.0, shrink=1.0)  # the segments' own rows
    return SegmentPriorScorer(scorer, prior, every, cfg.segment_weight), counts


def run_train_central(
    ds: Dataset,
    protocol: str,
    out: Path,
    *,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    quick: bool = False,
    baselines: Sequence[str] | None = None,
    log: Callable[[str], None] = lambda _m: None,
    on_step: Callable[[int, int, float], None] | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """Train on ``ds``, evaluate beside the baselines, write the run to ``out``. ``data`` is what
    the user named the data by (a data set name or a folder), recorded in ``config.json`` so that
    scripts reading the run can load the same data (a folder as an absolute path)."""
    t0 = time.perf_counter()
    train_dict = {**(QUICK_TRAIN if quick else {}), **(train_overrides or {})}
    model_cfg = from_dict(ModelConfig, model_overrides or {}, where="model settings")
    train_cfg = from_dict(TrainConfig, train_dict, where="train settings")
    names: Sequence[str] = (
        (QUICK_BASELINES if quick else BASELINES) if baselines is None else baselines
    )
    if train_cfg.segment_prior and protocol != "C":
        raise ValueError(
            f"train setting segment_prior={train_cfg.segment_prior!r} is for new users, protocol "
            f"C only (this run is protocol {protocol}); leave it out"
        )
    if train_cfg.cold_prior_backbone:  # the prior's encoder: fail before training, not after
        check_prior_backbone(train_cfg.cold_prior_backbone, "train setting cold_prior_backbone")
    ds = with_profile_template(ds, model_cfg.profile_template)
    split = make_split(ds, protocol)
    profiles = [ds.user_text(int(u)) for u in split.user_ids]
    fit = split
    if train_cfg.holdout > 0:
        fit = holdout_split(split, train_cfg.holdout, profiles, seed=train_cfg.seed + 1)
        assert fit.valid is not None
        log(
            f"holdout: {split.train_item.shape[0] - fit.train_item.shape[0]} interactions held "
            f"out for validation ({len(fit.valid)} queries)"
        )
    log(f"protocol {protocol}: {fit.train_item.shape[0]} training interactions")
    model = build_model(fit, ds.item_texts(), model_cfg)
    log(f"model ready: {sum(p.numel() for p in model.adapter_parameters())} LoRA parameters")
    trace = train_central(model, fit, profiles, train_cfg, log=log, on_step=on_step)
    bank = trace.pop("profile_bank")
    prior = None
    if train_cfg.cold_prior > 0:
        counts = np.bincount(fit.train_item, minlength=len(ds.item_ids))

        def score() -> dict[str, Any]:
            own_scorer = ModelScorer(model, bank)
            return {k: evaluate(own_scorer, es) for k, es in split.tests.items()}

        prior = attach_cold_prior_paired(
            model,
            train_cfg.cold_prior,
            score,
            backbone=train_cfg.cold_prior_backbone,
            counts=counts,
        )
        log(
            f"cold prior: weight {prior['weight']}, read by {prior['backbone']}, ridge lambda "
            f"{prior['lambda']} (5-fold CV)"
        )
    scorer: Any = ModelScorer(model, bank)
    segment_info, segment_counts = None, None
    if train_cfg.segment_prior:
        segment_info = {
            "fields": list(parse_fields(train_cfg.segment_prior)),
            "weight": train_cfg.segment_weight,
            "counts": "exact (the training users' interactions, no noise)",
            "model_alone": {k: evaluate(scorer, es) for k, es in split.tests.items()},
        }
        if fit.valid is not None:
            segment_info["valid_model_alone"] = evaluate(scorer, fit.valid)
        scorer, segment_counts = central_segment_scorer(scorer, ds, fit, train_cfg)
        log(f"segment prior by {train_cfg.segment_prior}: weight {train_cfg.segment_weight}")
    result: dict[str, Any] = {"protocol": protocol}
    result["model"] = {
        "metrics": {k: evaluate(scorer, es) for k, es in split.tests.items()},
        "training": trace,
    }
    if prior is not None:
        result["model"]["cold_prior"] = prior
    if segment_info is not None:
        result["model"]["segment_prior"] = segment_info
    if fit.valid is not None:
        result["model"]["valid"] = evaluate(scorer, fit.valid)
    save_model(model, out, item_ids=[int(i) for i in ds.item_ids], titles=item_titles(ds))
    if segment_counts is not None:  # what `fedrec recommend --age` ranks new users with
        save_segment_sum(out / "segment_counts.npz", segment_counts, 1)
    base = run_baselines(ds, protocol, names=names, backbone=model_cfg.backbone, log=log)
    result["split"] = base["split"]
    result["baselines"] = base["baselines"]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    config = {
        "command": "train-central",
        "protocol": protocol,
        "dataset": ds.name,
        "data": _data_ref(data, ds.name),
        "quick": quick,
        "model": as_dict(model_cfg),
        "train": as_dict(train_cfg),
        "baselines": list(result["baselines"]),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", result)
    valid_lines = {n: b["valid"]["NDCG@10"] for n, b in result["baselines"].items() if "valid" in b}
    plot_training(trace, out / "training.png", baselines=valid_lines)
    return result
