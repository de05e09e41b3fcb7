"""The loader the holdout-selection scripts share (simulations/holdout_run), and the constant
scorer behind the popularity-style baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.shared.baselines.popularity import ConstantScorer
from fedrec.simulations.holdout_run import load_holdout_run


def _run(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_a_missing_or_unreadable_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a readable train-central run"):
        load_holdout_run(tmp_path, "B", "train.holdout=0.2")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable train-central run"):
        load_holdout_run(tmp_path, "B", "train.holdout=0.2")


def test_another_command_or_protocol_is_refused(tmp_path):
    run = _run(tmp_path, command="simulate", protocol="B", train={"holdout": 0.2})
    with pytest.raises(SystemExit, match="protocol B"):
        load_holdout_run(run, "B", "train.holdout=0.2")
    run = _run(tmp_path, command="train-central", protocol="C", train={"holdout": 0.2})
    with pytest.raises(SystemExit, match="protocol B"):
        load_holdout_run(run, "B", "train.holdout=0.2")


def test_a_run_without_holdout_is_refused_with_the_setting_that_fixes_it(tmp_path):
    run = _run(tmp_path, command="train-central", protocol="C", train={"holdout": 0.0})
    with pytest.raises(SystemExit, match=r"--set train.holdout=0.1"):
        load_holdout_run(run, "C", "train.holdout=0.1")


def test_the_constant_scorer_gives_every_query_the_same_scores():
    s = ConstantScorer(np.array([3, 1, 2]))
    out = s.score(np.array([0, 5]), [np.array([1]), np.array([], dtype=np.int64)], [None, None],
                  np.array([True, False]))  # fmt: skip
    assert out.shape == (2, 3) and out.dtype == np.float64
    assert (out == np.array([3.0, 1.0, 2.0])).all()
    with pytest.raises(ValueError, match="one score per item"):
        ConstantScorer(np.zeros((2, 3)))


def test_a_run_folder_without_its_model_is_refused_with_what_to_do(tmp_path):
    run = _run(tmp_path, command="train-central", protocol="B", train={"holdout": 0.2, "seed": 0},
               model={}, data=str(tmp_path))  # fmt: skip
    with pytest.raises(SystemExit, match="no usable model.*rerun the training command"):
        load_holdout_run(run, "B", "train.holdout=0.2")


def test_the_callers_refusal_comes_before_the_model_and_data_are_loaded(tmp_path):
    """cold_prior refuses a run trained with a prior from its config alone: a folder without
    model weights or data gets that reason, not 'no usable model'."""
    from fedrec.simulations.cold_prior import _trained_with_prior

    run = _run(tmp_path, command="train-central", protocol="B",
               train={"holdout": 0.2, "seed": 0, "cold_prior": 1.0}, model={})  # fmt: skip
    with pytest.raises(SystemExit, match="trained with a cold prior already"):
        load_holdout_run(run, "B", "train.holdout=0.2", refuse=_trained_with_prior)
    run = _run(tmp_path, command="train-central", protocol="B",
               train={"holdout": 0.2, "seed": 0, "cold_prior": 0.0}, model={})  # fmt: skip
    with pytest.raises(SystemExit, match="no usable model"):
        load_holdout_run(run, "B", "train.holdout=0.2", refuse=_trained_with_prior)
