"""Faulty and malicious replies: each is refused by name, the round goes on, the global model
stays finite, and no client writes ledger lines under another client's name."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedrec.shared.federation.params import UpdateError, check_update

from .test_strategy import TEMPLATE, _metrics, _reply, _strategy, task_identity  # noqa: F401


def _good(v: float) -> dict[str, torch.Tensor]:
    return {"lora.B": torch.full((3, 2), v), "head.item_bias": torch.full((4,), v)}


def _new(arrays) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}


def _ledger(tmp_path) -> list[dict]:  # noqa: ANN001
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    return [x for x in lines if "client" in x]


def test_a_float64_value_that_overflows_float32_is_refused():
    huge = {"lora.B": torch.full((3, 2), 1e300, dtype=torch.float64),
            "head.item_bias": torch.zeros(4, dtype=torch.float64)}  # fmt: skip
    with pytest.raises(UpdateError, match="NaN or Inf"):
        check_update(huge, TEMPLATE)


def test_huge_float32_replies_cannot_overflow_the_mean(tmp_path, caplog):
    s = _strategy(tmp_path)
    replies = [_reply(1, _good(1.0)), _reply(2, _good(3.0)),
               _reply(3, _good(3e38)), _reply(4, _good(3e38))]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["accepted"] == 2 and metrics["rejected"] == 2
    new = _new(arrays)
    assert all(torch.isfinite(t).all() for t in new.values())
    assert torch.allclose(new["lora.B"], torch.full((3, 2), 2.0))
    assert "update-norm-max" in caplog.text


def test_clip_action_scales_a_large_change_to_the_bound(tmp_path):
    s = _strategy(tmp_path, update_norm_max=1.0, update_norm_action="clip")
    arrays, metrics = s.aggregate_train(1, [_reply(1, _good(10.0)), _reply(2, _good(0.0))])
    assert metrics["accepted"] == 2
    new = _new(arrays)
    # client 1's change (norm 10 * sqrt(10)) scaled to norm 1, averaged with client 2's zero
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in new.values()))
    assert norm == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"loss": float("inf")}, "not a finite number"),
        ({"epsilon": float("-inf")}, "not a finite number"),
        ({"steps": float("inf")}, "not a finite number"),
        ({"steps": 2.5}, "whole number of steps"),
        ({"steps": 10_000}, "local-steps"),
        ({"sample-rate": 1.5}, "not in [0, 1]"),
        ({"trained": 7}, "not 0 or 1"),
        ({"epsilon": -1.0}, "negative"),
        ({"num-examples": 1e12}, "whole count"),
        ({"total-steps": -1}, ">= 0"),
    ],
)
def test_bad_train_metrics_are_refused_by_name_and_the_round_goes_on(tmp_path, metrics, message,
                                                                      caplog):  # fmt: skip
    s = _strategy(tmp_path)
    bad = _reply(3, _good(5.0), _metrics(**metrics))
    good = [_reply(1, _good(1.0), _metrics()),
            _reply(2, _good(3.0), _metrics())]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        arrays, out = s.aggregate_train(1, [*good, bad])
    assert out["accepted"] == 2 and out["rejected"] == 1, caplog.text
    assert message in caplog.text
    assert torch.allclose(_new(arrays)["lora.B"], torch.full((3, 2), 2.0))
    for line in (tmp_path / "ledger.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no Infinity or NaN on the ledger
        assert "Infinity" not in line and "NaN" not in line


@pytest.mark.parametrize("key", ["loss", "epsilon", "sample-rate", "steps", "trained"])
def test_a_reply_missing_a_required_metric_is_refused(tmp_path, caplog, key):
    s = _strategy(tmp_path)
    m = dict(_metrics())
    del m[key]
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        _, out = s.aggregate_train(
            1,
            [_reply(1, _good(1.0), MetricRecord(m)), _reply(2, _good(1.0)), _reply(3, _good(1.0))],
        )
    assert out["rejected"] == 1 and out["accepted"] == 2
    assert "required metric(s) missing" in caplog.text and key in caplog.text


def test_a_dp_client_history_shorter_than_its_round_is_refused(tmp_path, caplog):
    s = _strategy(tmp_path, dp=True)
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        short = _reply(3, _good(1.0), _metrics(**{"total-steps": 1}))
        _, out = s.aggregate_train(1, [_reply(1, _good(1.0)), _reply(2, _good(1.0)), short])
    assert out["rejected"] == 1 and "below this round's steps" in caplog.text


def test_a_client_cannot_write_under_another_clients_name(tmp_path, caplog):
    s = _strategy(tmp_path, dp=True)
    m = _metrics()
    s.aggregate_train(1, [_reply(1, _good(1.0), m), _reply(2, _good(1.0), m)])
    # round 2: node 5 claims to be p2 (bound to node 2 in round 1)
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        _, out = s.aggregate_train(
            2, [_reply(1, _good(1.0), m), _reply(2, _good(1.0), m), _reply(5, _good(9.0), m, "p2")]
        )
    assert out["rejected"] == 1 and out["accepted"] == 2
    assert "belongs to node 2" in caplog.text
    round2 = [(x["client"], x["accepted"]) for x in _ledger(tmp_path) if x["round"] == 2]
    # the forger's spending is on the ledger under its own node, never under p2
    assert sorted(round2) == [("n5", False), ("p1", True), ("p2", True)]


def test_an_unprintable_or_huge_name_is_refused(tmp_path, caplog):
    s = _strategy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        _, out = s.aggregate_train(1, [_reply(1, _good(1.0), name="x" * 500),
                                       _reply(2, _good(1.0), name="a\nb"),
                                       _reply(3, _good(1.0)), _reply(4, _good(1.0))])  # fmt: skip
    assert out["rejected"] == 2 and out["accepted"] == 2
    assert "printable name" in caplog.text


def _eval_reply(node: int, m: dict | None = None):
    to_node = Message(content=RecordDict(), dst_node_id=node, message_type="evaluate")
    base = {"num-queries": 1, "HR@10": 1.0, "NDCG@10": 0.5} | (m or {})
    content = RecordDict({"metrics": MetricRecord(base),
                          "client": ConfigRecord({"name": f"p{node}"})})  # fmt: skip
    return Message(content=content, reply_to=to_node)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"num-queries": 10**12}, "whole count"),
        ({"num-queries": 50}, "exceeds the 10 test queries"),
        ({"HR@10": 1000.0}, "not in [0, 1]"),
        ({"NDCG@10": float("inf")}, "not a finite number"),
        ({"num-queries": 1.5}, "whole count"),
    ],
)
def test_federated_evaluation_refuses_counts_and_metrics_out_of_range(tmp_path, caplog, bad,
                                                                       message):  # fmt: skip
    s = _strategy(tmp_path)
    s.max_queries = 10
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        out = s.aggregate_evaluate(1, [_eval_reply(1), _eval_reply(2, {"HR@10": 0.0}),
                                       _eval_reply(3, bad)])  # fmt: skip
    assert out is not None and out["num-queries"] == 2 and out["HR@10"] == 0.5
    assert message in caplog.text


@pytest.mark.parametrize("key", ["epsilon", "lr", "delta", "update-norm-max"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_settings_are_refused_naming_the_key(key, value):
    from fedrec.shared.federation.config import parse_run_config

    with pytest.raises(ValueError, match=f"'{key}'"):
        parse_run_config({key: value})


def test_resume_false_means_false():
    from fedrec.simulations.launch import resolve

    assert resolve(None, {"resume": "false"}, False)[1]["resume"] is False
    assert resolve(None, {"resume": "true"}, False)[1]["resume"] is True
    with pytest.raises(ValueError, match="'resume'"):
        resolve(None, {"resume": "maybe"}, False)


def test_many_rounds_plan_without_overflow_and_absurd_ones_are_refused():
    from fedrec.shared.federation.config import FedConfig

    planned = FedConfig(num_rounds=5000, fraction_train=0.1).rounds_planned()
    assert 540 < planned < 560  # the 99th percentile of Binomial(5000, 0.1): about 549
    assert FedConfig(num_rounds=20, fraction_train=0.1).rounds_planned() == 6
    with pytest.raises(ValueError, match="num-rounds"):
        FedConfig(num_rounds=10**7)


# --- damaged run folders: a clear ModelFileError naming the file, never a traceback ----------
@pytest.fixture
def run_copy(trained_run, tmp_path):  # noqa: F811
    import shutil

    run, _, _ = trained_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


from .test_inference import trained_run  # noqa: E402, F401 - fixture re-export


@pytest.mark.parametrize(
    ("rel", "damage", "message"),
    [
        ("adapter/adapter_model.safetensors", b"\x00\x01garbage", "not a readable safetensors"),
        ("model/head.safetensors", b"", "not a readable safetensors"),
        ("adapter/adapter_config.json", b"{not json", "not readable JSON"),
        ("model/model.json", b"[1, 2]", "expected a JSON object"),
        ("model/model.json", b"\xff\xfe\x00", "not readable JSON"),
    ],
)
def test_damaged_model_files_are_named(run_copy, rel, damage, message):
    from fedrec.shared.inference import Recommender
    from fedrec.shared.model.artifacts import ModelFileError

    (run_copy / rel).write_bytes(damage)
    with pytest.raises(ModelFileError, match=message) as e:
        Recommender.load(run_copy)
    assert rel.split("/")[-1] in str(e.value)


def test_model_json_with_fewer_item_ids_is_refused(run_copy):
    from fedrec.shared.inference import Recommender
    from fedrec.shared.model.artifacts import ModelFileError

    path = run_copy / "model" / "model.json"
    meta = json.loads(path.read_text())
    meta["item_ids"] = meta["item_ids"][:-3]
    path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="item ids for"):
        Recommender.load(run_copy)


def test_a_planted_or_corrupt_index_is_rebuilt_not_served(run_copy):
    from fedrec.shared.inference import Recommender

    good = Recommender.load(run_copy)
    (index,) = list((run_copy / "index").glob("*.pt"))
    torch.save(torch.zeros(3, 3), index)  # wrong shape
    again = Recommender.load(run_copy)
    assert torch.equal(again.items, good.items)
    index.write_bytes(b"\x80\x04garbage")  # not a torch file
    assert torch.equal(Recommender.load(run_copy).items, good.items)


def test_bad_config_files_and_out_paths_exit_2(tmp_path):
    from typer.testing import CliRunner

    from fedrec.cli import app

    runner = CliRunner()
    cases = {"tool.toml": b"tool = 1\n", "bytes.toml": b"\xff\xfe = 1\n",
             "nested.toml": b"[model]\nlr = 1\n"}  # fmt: skip
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
        r = runner.invoke(app, ["simulate", "--out", str(tmp_path / "o"),
                                "--config", str(tmp_path / name)])  # fmt: skip
        assert r.exit_code == 2, (name, r.output)
        assert "--config" in r.output and not (tmp_path / "o").exists(), name
    (tmp_path / "afile").write_text("x")
    for cmd in (["simulate"], ["baselines"], ["train-central"]):
        r = runner.invoke(app, [*cmd, "--out", str(tmp_path / "afile")])
        assert r.exit_code == 2 and "existing file" in r.output, (cmd, r.output)
    r = runner.invoke(app, ["simulate", "--out", str(tmp_path / "o"), "--set", "epsilon=inf"])
    assert r.exit_code == 2 and "'epsilon'" in r.output and not (tmp_path / "o").exists()


# --- robust aggregation -------------------------------------------------------------------------
def test_robust_means_per_coordinate():
    from fedrec.server.strategy import robust_mean

    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [1000.0, -1000.0]])
    assert torch.equal(robust_mean(x, "median", 0.1), torch.tensor([3.0, 20.0]))
    # trim 0.2 of 5: one value dropped at each end, per coordinate
    assert torch.allclose(robust_mean(x, "trimmed-mean", 0.2), torch.tensor([3.0, 20.0]))
    assert torch.allclose(robust_mean(x[:4], "median", 0.1), torch.tensor([2.5, 25.0]))
    # trim 0.1 of 5 drops nothing: the plain mean
    assert torch.allclose(robust_mean(x, "trimmed-mean", 0.1), x.mean(0))


def test_trimmed_mean_resists_a_sign_flipped_client(tmp_path):
    honest = [_reply(i, _good(1.0 + 0.1 * i)) for i in range(1, 10)]
    attacker = _reply(10, _good(-500.0))  # a flipped, scaled change (within update-norm-max)
    plain = _strategy(tmp_path / "a")
    robust = _strategy(tmp_path / "b", robust="trimmed-mean", trim_fraction=0.1)
    mean = _new(plain.aggregate_train(1, [*honest, attacker])[0])["lora.B"][0, 0]
    trimmed = _new(robust.aggregate_train(1, [*honest, attacker])[0])["lora.B"][0, 0]
    assert mean < -40  # one client in ten drags the mean far off
    assert 1.1 <= float(trimmed) <= 1.9  # the trimmed mean stays among the honest changes


def test_poison_is_parsed_validated_and_refused_on_devices():
    from fedrec.client.app import device_guard, poisoned
    from fedrec.shared.federation.config import FedConfig

    assert FedConfig(poison="0.1:sign-flip:4").poison_spec() == (10, "sign-flip", 4.0)
    for bad in ("0.1", "2:scale:1", "0.1:flip:1", "0.1:scale:-1", "0.1:scale:inf"):
        with pytest.raises(ValueError, match="'poison'"):
            FedConfig(poison=bad)
    with pytest.raises(ValueError, match="user-dp"):
        FedConfig(robust="median", user_dp=True, dp=False)
    with pytest.raises(ValueError, match="simulated attack"):
        device_guard(FedConfig(poison="0.1:scale:2"), {"data-dir": "/x", "allow-no-dp": "true"})
    got = {"w": torch.tensor([3.0])}
    base = {"w": torch.tensor([1.0])}
    assert torch.equal(poisoned(got, base, "sign-flip", 4.0)["w"], torch.tensor([-7.0]))
    assert torch.equal(poisoned(got, base, "scale", 4.0)["w"], torch.tensor([9.0]))


def test_round_config_is_parsed_once_per_distinct_config_and_a_bad_one_always_fails(
    task_identity,  # noqa: F811 - a Message needs a task
):
    from fedrec.client import app as client_app
    from fedrec.shared.federation import contract
    from fedrec.shared.federation.config import FedConfig

    def msg(**cfg) -> Message:  # noqa: ANN003
        record = ConfigRecord({**cfg, "server-round": 3, "catalog": "c"})
        return Message(RecordDict({contract.CONFIG: record}), dst_node_id=1, message_type="train")

    a, extra = client_app.round_config(msg(**{"lr": 2.0, "num-rounds": 4}))
    assert extra == {"server-round": 3, "catalog": "c"}
    again, _ = client_app.round_config(msg(**{"lr": 2.0, "num-rounds": 4}))
    assert again is a and a == FedConfig(lr=2.0, num_rounds=4)
    assert client_app.round_config(msg(**{"num-rounds": 4, "lr": 2.0}))[0] == a
    # two spellings of one key: the last wins, so the order is part of the config
    first, _ = client_app.round_config(msg(**{"num-rounds": 4, "num_rounds": 5}))
    second, _ = client_app.round_config(msg(**{"num_rounds": 5, "num-rounds": 4}))
    assert (first.num_rounds, second.num_rounds) == (5, 4)
    other, _ = client_app.round_config(msg(**{"lr": 3.0, "num-rounds": 4}))
    assert other.lr == 3.0 and a.lr == 2.0
    # another raw value is another entry, whatever the parser makes of it (4.0 is not 4)
    assert client_app.round_config(msg(**{"lr": 2.0, "num-rounds": 4.0}))[0] is not a
    for _ in range(2):  # a config that fails to parse fails every time, never cached
        with pytest.raises(ValueError, match="num-rounds|num_rounds"):
            client_app.round_config(msg(**{"num-rounds": -1}))
    for k in range(client_app._PARSED_MAX + 4):  # the cache stays bounded
        client_app.round_config(msg(**{"seed": k}))
    assert len(client_app._PARSED) <= client_app._PARSED_MAX


# --- bad data and bad requests: exit 2 with one line naming the file and key -------------------
def _cli(*args: str):  # noqa: ANN202 - typer's Result
    from typer.testing import CliRunner

    from fedrec.cli import app

    return CliRunner().invoke(app, list(args))


def _edit(src, dst, name: str, edit) -> None:  # noqa: ANN001
    import shutil

    shutil.copytree(src, dst)
    path = dst / name
    path.write_text(edit(path.read_text()))


def _first_row(column: str, value: str):  # noqa: ANN202
    def edit(text: str) -> str:
        lines = text.splitlines()
        header, row = lines[0].split("\t"), lines[1].split("\t")
        row[header.index(column)] = value
        return "\n".join([lines[0], "\t".join(row), *lines[2:]]) + "\n"

    return edit


@pytest.mark.parametrize(
    ("column", "value"),
    [("user_id", str(2**63)), ("item_id", str(2**70)), ("timestamp", str(2**64))],
)
def test_integers_beyond_64_bits_are_refused_by_line_and_column(synth_dir, tmp_path, column,
                                                                value):  # fmt: skip
    _edit(synth_dir, tmp_path / "d", "interactions.tsv", _first_row(column, value))
    for cmd in (["data", "validate", str(tmp_path / "d")],
                ["baselines", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                 "--only", "popularity"]):  # fmt: skip
        r = _cli(*cmd)
        assert r.exit_code in (1, 2) and isinstance(r.exception, SystemExit), r.output
        assert f"interactions.tsv:2: column '{column}'" in r.output and "too large" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("template", "message"),
    [("{title", "malformed"), ("{title}}x{", "malformed"), ("{title!z}", "does not format"),
     ("{title:>>>}", "does not format"), ("{}", "does not format"), ("{nope}", "does not have"),
     (5, "must be a string")],
)  # fmt: skip
def test_a_malformed_item_text_template_is_refused(synth_dir, tmp_path, template, message):
    def edit(text: str) -> str:
        meta = json.loads(text)
        meta["item_text_template"] = template
        return json.dumps(meta)

    _edit(synth_dir, tmp_path / "d", "dataset.json", edit)
    r = _cli("baselines", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
             "--only", "popularity")  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "dataset.json: column 'item_text_template'" in r.output and message in r.output
    assert not (tmp_path / "o").exists()


def test_an_unreadable_data_file_is_named(synth_dir, tmp_path):
    import shutil

    shutil.copytree(synth_dir, tmp_path / "d")
    (tmp_path / "d" / "items.tsv").unlink()
    (tmp_path / "d" / "items.tsv").mkdir()  # unreadable as a file, whatever the user's rights
    r = _cli("data", "validate", str(tmp_path / "d"))
    assert r.exit_code == 1 and "items.tsv: cannot read the file" in r.output, r.output


def test_baselines_on_data_with_no_test_users_exit_2(synth_dir, tmp_path):
    def one_per_user(text: str) -> str:
        lines, seen, out = text.splitlines(), set(), []
        for line in lines[1:]:
            if line.split("\t")[0] not in seen:
                seen.add(line.split("\t")[0])
                out.append(line)
        return "\n".join([lines[0], *out]) + "\n"

    _edit(synth_dir, tmp_path / "d", "interactions.tsv", one_per_user)
    r = _cli("baselines", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "nothing to evaluate" in r.output and "empty: valid, test" in \
        r.output, r.output  # fmt: skip
    r = _cli("baselines", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
             "--protocol", "B", "--only", "itemknn")  # fmt: skip
    assert r.exit_code == 2 and "tuned on protocol A's validation" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_a_run_folder_of_another_kind_is_not_overwritten(tmp_path):
    from fedrec.shared.rundir import write_json

    write_json(tmp_path / "b" / "config.json", {"command": "baselines"})
    (tmp_path / "b" / "metrics.json").write_text("{}")
    for cmd in ("simulate", "train-central"):
        r = _cli(cmd, "--out", str(tmp_path / "b"))
        assert r.exit_code == 2 and "holds a `fedrec baselines` run" in r.output, r.output
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("not json")
    r = _cli("baselines", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "fedrec did not write" in r.output, r.output
    assert (tmp_path / "b" / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.json", "metrics.json"]


def test_a_profile_for_a_model_without_profiles_is_reported(synth_dir, tiny_backbone, tmp_path):
    from fedrec.shared.data import load_dataset
    from fedrec.shared.model.artifacts import save_model

    from .test_model import make_model

    ds = load_dataset(synth_dir)
    model = make_model(ds, tiny_backbone, use_profile=False)
    run = tmp_path / "run"
    save_model(model, run, item_ids=[int(i) for i in ds.item_ids], titles=ds.item_texts())
    item = str(int(ds.item_ids[0]))
    r = _cli("recommend", str(run), "--profile", "Age 30", "--json")
    assert r.exit_code == 2 and "trained without profiles" in r.output, r.output
    r = _cli("recommend", str(run), "--profile", "Age 30", "--history", item, "--json")
    assert r.exit_code == 0 and "--profile is ignored" in r.output, r.output


def test_recommend_takes_the_profile_the_model_was_trained_with(synth_dir, tiny_backbone):
    """A warm user with a profile: ``recommend(history, profile=)`` ranks exactly as the
    evaluation does (ModelScorer with the profile), and differs from ignoring it."""
    import numpy as np

    from fedrec.shared.data import load_dataset
    from fedrec.shared.inference import Recommender
    from fedrec.shared.model.central import ModelScorer, ProfileBank
    from fedrec.shared.splitting import protocol_a

    from .test_model import make_model, perturb_lora

    ds = load_dataset(synth_dir)
    model = make_model(ds, tiny_backbone, use_profile=True)
    perturb_lora(model, seed=5)
    with torch.no_grad():
        model.profile_gate.fill_(2.0)  # a profile that matters to the ranking
    rec = Recommender(model, ds.item_ids, ds.item_texts())
    rec.items = rec._embed_catalog()
    rec.bias = model.biases().detach().clone()
    q = protocol_a(ds).tests["test"]
    profile = ds.user_text(int(ds.user_ids[q.users[0]]))
    hist = [int(ds.item_ids[i]) for i in q.history[0]]
    ref = ModelScorer(model, ProfileBank(model)).score(q.users[:1], q.history[:1], [profile],
                                                        q.warm[:1])[0]  # fmt: skip
    ref[q.history[0]] = -np.inf
    top = np.argsort(-ref, kind="stable")[:5]
    got = rec.recommend(hist, k=5, profile=profile)
    assert [r.item_id for r in got] == [int(ds.item_ids[i]) for i in top]
    assert np.allclose([r.score for r in got], ref[top], atol=1e-4)
    without = rec.recommend(hist, k=5)
    assert [r.score for r in without] != [r.score for r in got]


@pytest.mark.parametrize("body", ["[1, 2]", '"text"', '{"model": 5}', "{not json"])
def test_a_suite_report_skips_a_metrics_json_that_is_not_a_metrics_object(tmp_path, body):
    import shutil
    from pathlib import Path

    from fedrec.simulations.suite import load_suite
    from fedrec.simulations.suite_report import write_report

    src = Path(__file__).parent.parent / "simulations" / "results" / "suite-full"
    out = tmp_path / "suite"
    shutil.copytree(src / "runs", out / "runs")
    (out / "runs" / "A-fed-eps1" / "metrics.json").write_text(body)
    summary = write_report(load_suite("full"), out)
    assert summary["experiments"]["A-fed-eps1"]["status"] == "unreadable metrics.json"
    report = (out / "report.md").read_text()
    assert "A-fed-eps1" in report.split("Not run or failed:")[1].splitlines()[0]


# --- the inventory: every case the robustness review listed, and the test that keeps it --------
# (module, test function); a case with no test here is not handled. Counted by the test below.
CASES: dict[str, tuple[str, str]] = {
    "float64 1e300 update becomes inf after the cast": (
        "test_robustness", "test_a_float64_value_that_overflows_float32_is_refused"),
    "two float32 3e38 replies overflow the mean": (
        "test_robustness", "test_huge_float32_replies_cannot_overflow_the_mean"),
    "inf metrics, steps=inf accepted; Infinity in the ledger": (
        "test_robustness", "test_bad_train_metrics_are_refused_by_name_and_the_round_goes_on"),
    "a reply missing loss, epsilon or sample-rate stops the run": (
        "test_robustness", "test_a_reply_missing_a_required_metric_is_refused"),
    "ledger lines under another client's name": (
        "test_robustness", "test_a_client_cannot_write_under_another_clients_name"),
    "resumed run: spending only budget files show passes the audit": (
        "test_audit", "test_audit_reports_spending_only_a_budget_file_shows"),
    "a deleted ledger line passes the audit": (
        "test_audit", "test_audit_finds_ledger_lines_missing_against_the_rounds_counts"),
    "a ledger line at round 10**7 makes the audit run for minutes": (
        "test_audit", "test_an_absurd_round_number_is_an_error_and_draws_no_plot"),
    "federated evaluation trusts 10**12 queries or HR@10 = 1000": (
        "test_robustness", "test_federated_evaluation_refuses_counts_and_metrics_out_of_range"),
    "ids >= 2**63 or timestamps >= 2**64": (
        "test_robustness", "test_integers_beyond_64_bits_are_refused_by_line_and_column"),
    "a malformed item_text_template": (
        "test_robustness", "test_a_malformed_item_text_template_is_refused"),
    "an unreadable data file": ("test_robustness", "test_an_unreadable_data_file_is_named"),
    "truncated or garbage safetensors, malformed adapter_config.json or model.json": (
        "test_robustness", "test_damaged_model_files_are_named"),
    "model.json with fewer item ids than the model": (
        "test_robustness", "test_model_json_with_fewer_item_ids_is_refused"),
    "a corrupt or planted index/<hash>.pt": (
        "test_robustness", "test_a_planted_or_corrupt_index_is_rebuilt_not_served"),
    "metrics.json that is not an object": (
        "test_robustness", "test_a_suite_report_skips_a_metrics_json_that_is_not_a_metrics_object"),
    "--config with tool = 1 or non-UTF-8; --out a file or unwritable": (
        "test_robustness", "test_bad_config_files_and_out_paths_exit_2"),
    "baselines on a data set with no test users": (
        "test_robustness", "test_baselines_on_data_with_no_test_users_exit_2"),
    "simulate --out into a folder holding another run kind": (
        "test_robustness", "test_a_run_folder_of_another_kind_is_not_overwritten"),
    "--set resume=false turns resume on": ("test_robustness", "test_resume_false_means_false"),
    "--set epsilon=inf refused without naming the key": (
        "test_robustness", "test_non_finite_settings_are_refused_naming_the_key"),
    "num-rounds above ~1,000 overflows the budget planner": (
        "test_robustness", "test_many_rounds_plan_without_overflow_and_absurd_ones_are_refused"),
    "--profile on a model trained without profiles is silently ignored": (
        "test_robustness", "test_a_profile_for_a_model_without_profiles_is_reported"),
    "SIGINT exits without a word": (
        "test_federation", "test_ctrl_c_says_which_round_was_kept_and_exits_130"),
    "recommend() takes no profile": (
        "test_robustness", "test_recommend_takes_the_profile_the_model_was_trained_with"),
    "poisoned updates from 10 % of clients": (
        "test_robustness", "test_trimmed_mean_resists_a_sign_flipped_client"),
}  # fmt: skip


def test_every_listed_case_has_a_test():
    import importlib

    missing = [
        case
        for case, (module, name) in CASES.items()
        if not callable(getattr(importlib.import_module(f"tests.{module}"), name, None))
    ]
    assert not missing, f"cases with no test: {missing}"
    print(f"{len(CASES)} listed robustness cases, each with its test")  # noqa: T201
