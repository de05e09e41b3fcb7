"""One settings mechanism: FedConfig, ModelConfig and TrainConfig parsed, listed and explained
the same way (shared/settings.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.model.config import ModelConfig, TrainConfig, from_dict
from fedrec.shared.model.run_central import parse_overrides
from fedrec.shared.settings import describe, field_help, parse_fields

CLASSES = (FedConfig, ModelConfig, TrainConfig)


@pytest.mark.parametrize("cls", CLASSES)
def test_every_key_has_help_and_its_default(cls):
    rows = describe(cls)
    assert [r["key"] for r in rows] == [f.replace("_", "-") for f in cls.__dataclass_fields__]
    for r in rows:
        assert len(r["help"]) >= 8, f"{cls.__name__}.{r['key']}: write a comment next to it"
        assert "---" not in r["help"], r  # a section header is not a field's help
        assert r["value"] == getattr(cls(), r["key"].replace("-", "_"))


def test_help_comes_from_the_fields_own_comment():
    assert field_help(FedConfig)["physical_batch"].startswith("At most this many examples")
    assert field_help(TrainConfig)["max_steps"] == "0 = no cap; a cap is for smoke runs"
    assert "FFA-LoRA" in field_help(ModelConfig)["ffa"]  # from the class docstring


@pytest.mark.parametrize("cls", CLASSES)
def test_one_parser_for_every_class(cls):
    assert parse_fields(cls, {"seed": "3"}).seed == 3
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        parse_fields(cls, {"nope": 1}, where="w")
    with pytest.raises(ValueError, match="key 'seed' = '1.5' is not a valid int"):
        parse_fields(cls, {"seed": "1.5"})


def test_spellings_bools_and_non_finite_values():
    cfg = parse_run_config({"num-rounds": "5", "use_profile": "false", "dp": "true", "lr": "2"})
    assert (cfg.num_rounds, cfg.use_profile, cfg.dp, cfg.lr) == (5, False, True, 2.0)
    with pytest.raises(ValueError, match="'dp' = 'maybe' is not a valid bool"):
        parse_run_config({"dp": "maybe"})
    m = from_dict(ModelConfig, {"lora-r": "4", "train_scale": "no"})
    assert (m.lora_r, m.train_scale) == (4, False)
    with pytest.raises(ValueError, match="'init-scale' = 'nan' is not a finite number"):
        from_dict(ModelConfig, {"init-scale": "nan"})
    # a TOML true is not the number 1 (num-rounds = true ran one round)
    for key in ("num-rounds", "lr"):
        with pytest.raises(ValueError, match=f"'{key}' = True is not a valid"):
            parse_run_config({key: True})
    # nor is a TOML false a text (audit-canaries = false became the file name 'False')
    for value in (False, [1], {"a": 1}):
        with pytest.raises(ValueError, match="'audit-canaries' = .* is not a valid str"):
            parse_run_config({"audit-canaries": value})
    assert parse_run_config({"data": 100}).data == "100"  # a number is still its text


def test_train_central_takes_the_same_set_syntax():
    model, train = parse_overrides(["lora-r=4", "epochs=3", "train.lr=0.001", "seed=5"])
    assert model == {"lora_r": "4", "seed": "5"}
    assert train == {"epochs": "3", "lr": "0.001", "seed": "5"}
    from_dict(ModelConfig, model), from_dict(TrainConfig, train)  # both parse
    # one key however it is spelled: the last --set wins (it was the last of that spelling)
    _, train = parse_overrides(["batch-size=1", "batch_size=2", "batch-size=3"])
    assert train == {"batch_size": "3"}
    for bad, msg in (["nope=1", "unknown key 'nope'"], ["x.lr=1", "expected KEY=VALUE"],
                     ["lr", "expected KEY=VALUE"]):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_overrides([bad])


@pytest.mark.parametrize(
    ("command", "classes"),
    [("simulate", [FedConfig]), ("train-central", [ModelConfig, TrainConfig])],
)
def test_fedrec_config_lists_every_key(command, classes):
    import json

    r = CliRunner().invoke(app, ["config", command, "--json"])
    assert r.exit_code == 0, r.output
    keys = [row["key"] for row in json.loads(r.output)]
    assert keys == [row["key"] for cls in classes for row in describe(cls)]
    assert CliRunner().invoke(app, ["config", "nope"]).exit_code == 2
