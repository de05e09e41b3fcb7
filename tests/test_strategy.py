"""The server strategy: bad client updates are rejected and logged, the round goes on."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedrec.server.strategy import FedRecStrategy
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.params import (
    UpdateError,
    check_update,
    decode_array,
    to_record,
)
from fedrec.shared.federation.server_opt import ServerOptimizer


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are built inside a Flower task; give this process one (as the runtime does)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


TEMPLATE = {"lora.B": torch.zeros(3, 2), "head.item_bias": torch.zeros(4)}


def _metrics(**kw):
    base = {"num-examples": 5, "trained": 1, "loss": 1.0, "epsilon": 0.5, "steps": 4,
            "total-steps": 4, "noise-multiplier": 1.1, "sample-rate": 0.5,
            "seconds": 0.1}  # fmt: skip
    base.update(kw)
    return MetricRecord(base)


def _reply(node: int, arrays: dict | None, metrics: MetricRecord | None = None, name=None):
    to_node = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "metrics": metrics or _metrics(),
            "client": ConfigRecord({"name": name or f"p{node}", "reason": ""}),
        }
    )
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    return Message(content=content, reply_to=to_node)


def _strategy(tmp_path, **kw):
    cfg = FedConfig(min_replies=2, server_opt="sgd", server_lr=1.0, **kw)
    return FedRecStrategy(cfg, template=dict(TEMPLATE), ledger=tmp_path / "ledger.jsonl")


def test_bad_updates_are_rejected_and_the_round_goes_on(tmp_path, caplog):
    s = _strategy(tmp_path)
    good = lambda v: {"lora.B": torch.full((3, 2), v), "head.item_bias": torch.full((4,), v)}  # noqa: E731
    nan = good(1.0) | {"head.item_bias": torch.tensor([1.0, float("nan"), 0, 0])}
    shape = good(1.0) | {"lora.B": torch.zeros(2, 3)}
    missing = {"lora.B": torch.zeros(3, 2)}
    to_node = Message(content=RecordDict(), dst_node_id=9, message_type="train")
    failed = Message(Error(code=0, reason="client crashed"), reply_to=to_node)
    replies = [
        _reply(1, good(1.0)), _reply(2, good(3.0)), _reply(3, nan), _reply(4, shape),
        _reply(5, missing), _reply(6, good(100.0), _metrics(history_len=3.0)),  # not whitelisted
        failed,
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None
    new = {k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}
    assert torch.allclose(new["lora.B"], torch.full((3, 2), 2.0))  # mean of the two good ones
    assert metrics["accepted"] == 2 and metrics["rejected"] == 4 and metrics["failed"] == 1
    text = caplog.text
    assert "NaN or Inf" in text and "shape" in text and "missing" in text
    assert "whitelist" in text and "client crashed" in text
    ledger = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    # the failed client is named in the round's note (it cannot be on a client line)
    note = ledger.pop()
    assert note["round"] == 1 and "1 failed: exception" in note["note"]
    # every client that reported spending budget is on the ledger, rejected or not
    assert [x["client"] for x in ledger] == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert [x["accepted"] for x in ledger] == [True, True, False, False, False, False]
    assert {"client", "round", "steps", "sample_rate", "noise_multiplier", "max_grad_norm",
            "delta", "accountant", "epsilon_after"} <= set(ledger[0])  # fmt: skip


RAY_OOM = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this "
    "task. ... Worker exit detail: Task was killed due to the node running low on memory. Memory "
    "on the node (IP: 10.0.0.2, ID: ab12) was 22.80GB / 23.47GB (0.971), which exceeds the memory "
    "usage threshold of 0.95'>"
)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (RAY_OOM, "out-of-memory"),
        ("<class 'flwr.clientapp.ClientAppException'>:<'MemoryError: '>", "out-of-memory"),
        ("RuntimeError: [enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate "
         "memory: you tried to allocate 10737418240 bytes", "out-of-memory"),
        ("<class 'ray.exceptions.GetTimeoutError'>:<'Get timed out: some object(s) not ready.'>",
         "timeout"),
        ("<class 'flwr.clientapp.ClientAppException'>:<'ValueError: catalog mismatch'>",
         "exception"),
    ],
)  # fmt: skip
def test_failure_kinds_are_told_apart(reason, kind):
    from fedrec.server.strategy import failure_kind

    assert failure_kind(reason) == kind


def test_a_round_with_failures_says_why_in_metrics_and_ledger(tmp_path, caplog):
    from fedrec.shared.privacy.audit import audit_ledger

    s = _strategy(tmp_path)
    s._sent[2] = 6  # six sampled: two reply, three fail, one is silent
    to_node = Message(content=RecordDict(), dst_node_id=9, message_type="train")
    fails = [Message(Error(code=2, reason=r), reply_to=to_node)
             for r in (RAY_OOM, RAY_OOM, "ValueError: boom")]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        _, metrics = s.aggregate_train(2, [_reply(1, dict(TEMPLATE)), _reply(2, dict(TEMPLATE)),
                                           *fails])  # fmt: skip
    assert metrics["failed"] == 3 and metrics["no_reply"] == 1
    assert metrics["failed_out_of_memory"] == 2 and metrics["failed_exception"] == 1
    assert metrics["failed_timeout"] == 0
    assert "lower physical-batch" in caplog.text  # the hint, in the log
    info = s.rounds[-1]
    assert info["failed_out_of_memory"] == 2
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    note = json.loads(lines[-1])
    assert note["round"] == 2
    assert "2 failed: out-of-memory" in note["note"] and "1 failed: exception" in note["note"]
    assert "1 sent nothing within round-timeout" in note["note"]
    # the audit reads the note as a note, not as a malformed client line (the fake replies'
    # epsilons are not consistent, so their own lines have findings of their own)
    audit = audit_ledger(tmp_path / "ledger.jsonl")
    on_note = [(f.severity, f.round) for f in audit.findings if f.line == len(lines)]
    assert on_note == [("note", 2)]


def test_too_few_replies_skip_aggregation(tmp_path, caplog):
    s = _strategy(tmp_path)
    refused = _reply(2, None, _metrics(trained=0, steps=0, loss=0.0))
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        arrays, _ = s.aggregate_train(3, [_reply(1, dict(TEMPLATE)), refused])
    assert arrays is None
    assert "aggregation skipped" in caplog.text
    ledger = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [x["trained"] for x in ledger] == [True, False]  # the refusal is on the ledger


def test_replies_with_missing_or_mistyped_records_do_not_stop_the_round(tmp_path):
    """A refusal without its 'client' record, 'arrays' sent as the wrong record type, and
    'metrics' sent as a config record: each is handled (counted, logged), never a crash."""
    s = _strategy(tmp_path)
    good = {"lora.B": torch.ones(3, 2), "head.item_bias": torch.ones(4)}
    bare_refusal = _reply(3, None, _metrics(trained=0, steps=0, loss=0.0))
    del bare_refusal.content["client"]
    wrong_arrays = _reply(4, None)
    wrong_arrays.content["arrays"] = ConfigRecord({"lora.B": 1.0})
    wrong_metrics = _reply(5, good)
    wrong_metrics.content["metrics"] = ConfigRecord({"trained": 1})
    arrays, metrics = s.aggregate_train(
        1, [_reply(1, good), _reply(2, good), bare_refusal, wrong_arrays, wrong_metrics]
    )
    assert arrays is not None
    assert metrics["accepted"] == 2 and metrics["refused"] == 1 and metrics["rejected"] == 2


def _npy(arr: np.ndarray, version=None) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian
        np.array(2.5, dtype=np.float32),  # 0-d
        np.zeros((0, 3), dtype=np.float16),
        np.arange(5, dtype=np.int64),
    ],
)  # fmt: skip
def test_decode_array_equals_flowers_own_decoding(arr):
    a = Array(arr)
    got, ref = decode_array("x", a), a.numpy()
    assert got.shape == ref.shape and got.dtype.newbyteorder("=") == ref.dtype.newbyteorder("=")
    assert np.array_equal(got, ref)
    assert got.flags.writeable and got.dtype.isnative
    v2 = Array(dtype=str(arr.dtype), shape=arr.shape, stype="numpy.ndarray", data=_npy(arr, (2, 0)))
    assert np.array_equal(decode_array("x", v2), arr)


@pytest.mark.parametrize(
    ("stype", "data", "message"),
    [
        ("torch", _npy(np.zeros(3, np.float32)), "serialization type 'torch'"),
        ("numpy.ndarray", b"garbage bytes", "not .npy bytes"),
        ("numpy.ndarray", _npy(np.zeros(3, np.float32))[:-4], "data bytes"),
        ("numpy.ndarray", _npy(np.zeros(3, np.float32)) + b"\0" * 4, "data bytes"),
        ("numpy.ndarray", _npy(np.array([{"a": 1}], dtype=object)), "object arrays"),
        ("numpy.ndarray", b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}     \n", "malformed .npy header"),
        ("numpy.ndarray", b"\x93NUMPY\x01\x00\xff\xff{}", "header length"),
        ("numpy.ndarray", b"\x93NUMPY\x09\x00\x10\x00", "format version 9"),
    ],
)  # fmt: skip
def test_decode_array_rejects_malformed_payloads_by_name(stype, data, message):
    a = Array(dtype="float32", shape=(3,), stype=stype, data=data)
    with pytest.raises(UpdateError, match=re.escape(message)) as err:
        decode_array("lora.B", a)
    assert "'lora.B'" in str(err.value)


def test_an_undecodable_update_is_rejected_and_the_round_goes_on(tmp_path, caplog):
    """Bytes a client can send that are not a valid array: one rejected reply, not a failed
    round (before decode_array, np.load's ValueError / Array.numpy's TypeError escaped)."""
    s = _strategy(tmp_path)
    good = {"lora.B": torch.ones(3, 2), "head.item_bias": torch.ones(4)}
    garbage = _reply(3, good)
    arrays = garbage.content["arrays"]
    arrays["lora.B"] = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=b"x" * 40)
    torchy = _reply(4, good)
    torchy.content["arrays"]["head.item_bias"] = Array(
        dtype="float32", shape=(4,), stype="torch", data=b"\0" * 16
    )
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        new, metrics = s.aggregate_train(1, [_reply(1, good), _reply(2, good), garbage, torchy])
    assert new is not None
    assert metrics["accepted"] == 2 and metrics["rejected"] == 2
    assert "not .npy bytes" in caplog.text and "serialization type 'torch'" in caplog.text
    ledger = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [x["accepted"] for x in ledger] == [True, True, False, False]


def test_update_norm_median_is_the_median_of_whole_change_norms(tmp_path):
    s = _strategy(tmp_path, dp=False)
    ups = [{"lora.B": torch.full((3, 2), v), "head.item_bias": torch.full((4,), -v)}
           for v in (1.0, 2.0, 5.0)]  # fmt: skip
    _, metrics = s.aggregate_train(1, [_reply(i + 1, u) for i, u in enumerate(ups)])
    # change norm of client v: sqrt(6 v^2 + 4 v^2) = v sqrt(10); median over v = 2
    assert metrics["update_norm_median"] == pytest.approx(2.0 * 10**0.5)
    arrays = s.current
    assert torch.allclose(arrays["lora.B"], torch.full((3, 2), 8.0 / 3))
    # a scalar tensor (e.g. the head's log_scale) travels too
    scalar = {"lora.B": torch.zeros(3, 2), "head.log_scale": torch.tensor(0.0)}
    cfg = FedConfig(min_replies=2, server_opt="sgd", server_lr=1.0, dp=False)
    s2 = FedRecStrategy(cfg, template=dict(scalar), ledger=tmp_path / "ledger2.jsonl")
    ups = [
        {"lora.B": torch.full((3, 2), v), "head.log_scale": torch.tensor(2 * v)} for v in (1.0, 3.0)
    ]
    _, metrics = s2.aggregate_train(1, [_reply(i + 1, u) for i, u in enumerate(ups)])
    assert metrics["update_norm_median"] == pytest.approx(2.0 * 10**0.5)  # median of v sqrt(10)
    assert float(s2.current["head.log_scale"]) == pytest.approx(4.0)


def test_check_update_rejects_integer_dtype():
    with pytest.raises(UpdateError, match="dtype"):
        check_update({"lora.B": torch.zeros(3, 2, dtype=torch.int64),
                      "head.item_bias": torch.zeros(4)}, TEMPLATE)  # fmt: skip


def test_server_adam_matches_hand_computation():
    opt = ServerOptimizer("adam", 0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w = {"x": torch.tensor([0.0, 1.0])}
    d = {"x": torch.tensor([0.5, -0.2])}
    out = opt.step(w, d)
    m, v = 0.1 * d["x"], 0.01 * d["x"] ** 2
    assert torch.allclose(out["x"], w["x"] + 0.1 * m / (v.sqrt() + 1e-3))
    out2 = opt.step(out, d)
    m2, v2 = 0.9 * m + 0.1 * d["x"], 0.99 * v + 0.01 * d["x"] ** 2
    assert torch.allclose(out2["x"], out["x"] + 0.1 * m2 / (v2.sqrt() + 1e-3))
    assert np.isfinite(out2["x"].numpy()).all()


def test_server_lr_decays_on_a_cosine_to_its_final_fraction():
    opt = ServerOptimizer("sgd", 2.0, final=0.1, rounds=5)
    lrs = [opt.lr_at(r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.2)
    assert lrs[2] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way: the mean of the two
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert opt.lr_at(9) == pytest.approx(0.2)  # past the last round (a resumed run): held
    w, d = {"x": torch.tensor([1.0])}, {"x": torch.tensor([0.5])}
    for r, lr in enumerate(lrs, start=1):
        assert float(opt.step(w, d, r)["x"]) == pytest.approx(1.0 + lr * 0.5)
    flat = ServerOptimizer("momentum", 2.0, rounds=5)  # final 1: constant
    assert {flat.lr_at(r) for r in range(1, 6)} == {2.0}
    with pytest.raises(ValueError, match="final"):
        ServerOptimizer("sgd", 1.0, final=0.0)


def test_the_strategy_steps_at_the_rounds_decayed_server_lr(tmp_path):
    """Round r's server step is lr_at(r) x the mean change (the round number reaches it)."""
    cfg = FedConfig(min_replies=2, server_opt="sgd", server_lr=2.0, server_lr_final=0.25,
                    num_rounds=3, dp=False)  # fmt: skip
    s = FedRecStrategy(cfg, template=dict(TEMPLATE), ledger=tmp_path / "ledger.jsonl")
    expect = {k: v.clone() for k, v in s.current.items()}
    for rnd, lr in ((1, 2.0), (2, 2.0 * (0.25 + 0.75 * 0.5)), (3, 0.5)):
        ups = [{k: v + 1.0 for k, v in s.current.items()} for _ in range(2)]
        s.aggregate_train(rnd, [_reply(i + 1, u) for i, u in enumerate(ups)])
        expect = {k: v + lr for k, v in expect.items()}
        for k, v in expect.items():
            assert torch.allclose(s.current[k], v), (rnd, k)


def test_user_level_dp_logs_its_clipping_once_a_round_not_once_a_reply(tmp_path, caplog):
    """Flower's wrapper logs a line for every reply it clips (471 a round by default, each one
    uploaded to the SuperLink and streamed to flower.log): fedrec drops it and logs one line a
    round with the count."""
    from fedrec.server.user_dp import UserLevelDP

    cfg = FedConfig(min_replies=2, server_opt="sgd", server_lr=1.0, user_dp=True, user_clip=1.0)
    inner = FedRecStrategy(cfg, template=dict(TEMPLATE), ledger=tmp_path / "ledger.jsonl")
    w = UserLevelDP(inner, num_sampled=3, noise_multiplier=0.5)
    w.current_arrays = to_record(TEMPLATE)
    inner.current = dict(TEMPLATE)
    inner._sent[1] = 3
    replies = [_reply(i + 1, {k: v + 1.0 for k, v in TEMPLATE.items()}) for i in range(3)]
    with caplog.at_level(logging.INFO):
        w.aggregate_train(1, replies)
    text = [r.getMessage() for r in caplog.records]
    assert not [t for t in text if "parameters are clipped by value" in t]
    assert text.count("round 1: 3 updates clipped to L2 norm 1") == 1


def test_user_level_dp_clips_divides_by_the_sample_and_adds_calibrated_noise(tmp_path, caplog):
    """Flower's fixed-clipping wrapper under fedrec: clip to C, sum / n (fixed), noise z*C/n."""
    from fedrec.server.user_dp import UserLevelDP

    big = {"lora.B": torch.zeros(100, 100)}
    cfg = FedConfig(min_replies=2, server_opt="sgd", server_lr=1.0, user_dp=True, user_clip=2.0)
    inner = FedRecStrategy(cfg, template=dict(big), ledger=tmp_path / "ledger.jsonl")
    z, n = 0.5, 5
    w = UserLevelDP(inner, num_sampled=n, noise_multiplier=z)
    w.current_arrays = to_record(big)
    inner.current = dict(big)
    inner._sent[1] = 4  # four sampled, four replies (one of them an error)
    up = {"lora.B": torch.full((100, 100), 0.1)}  # norm 10: clipped to 2
    small = {"lora.B": torch.full((100, 100), 0.001)}  # norm 0.1: kept
    to_node = Message(content=RecordDict(), dst_node_id=9, message_type="train")
    failed = Message(Error(code=0, reason="client crashed"), reply_to=to_node)
    bad = _reply(4, {"lora.B": torch.zeros(3, 3)})  # wrong shape: would crash the clipping
    replies = [_reply(1, up), _reply(2, small), failed, bad]
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        arrays, metrics = w.aggregate_train(1, replies)
    assert arrays is not None  # one failed client does not stop the round
    got = torch.from_numpy(arrays["lora.B"].numpy()).double()
    expected = (0.1 * 2.0 / 10.0 + 0.001) / n  # clipped sum over the FIXED sample size n
    noise = got - expected
    assert abs(float(noise.mean())) < 5 * z * 2.0 / n / 100  # 10,000 draws: mean ~ 0
    assert float(noise.std()) == pytest.approx(z * 2.0 / n, rel=0.05)
    assert metrics["failed"] == 1 and metrics["rejected"] == 1 and metrics["accepted"] == 2
    # the failure the wrapper took out is counted once, as an exception, not also as silent
    assert metrics["failed_exception"] == 1 and metrics["no_reply"] == 0
    assert "client crashed" in caplog.text and "removed before clipping" in caplog.text
    # the clients' update norms are not noised: under DP they are not released
    assert "update_norm_median" not in metrics


def test_user_level_dp_survives_a_zero_update(tmp_path):
    """A client returning the global adapter unchanged (update norm 0) must not stop the run."""
    from fedrec.server.user_dp import UserLevelDP

    g = {"lora.B": torch.ones(4, 4)}
    cfg = FedConfig(min_replies=2, server_opt="sgd", server_lr=1.0, user_dp=True, user_clip=1.0)
    inner = FedRecStrategy(cfg, template=dict(g), ledger=tmp_path / "ledger.jsonl")
    w = UserLevelDP(inner, num_sampled=2, noise_multiplier=0.0)
    w.current_arrays = to_record(g)
    inner.current = dict(g)
    moved = {"lora.B": torch.ones(4, 4) + 0.5}  # update norm 2: clipped to 1
    arrays, metrics = w.aggregate_train(1, [_reply(1, dict(g)), _reply(2, moved)])
    assert arrays is not None and metrics["accepted"] == 2
    got = torch.from_numpy(arrays["lora.B"].numpy())
    assert torch.allclose(got, torch.ones(4, 4) + 0.5 * (1.0 / 2.0) / 2)  # (0 + clipped) / 2


def _user_dp_round(tmp_path, *, server_opt, server_lr, z, n=5, shape=(100, 100)):
    """One user-level DP round (trusted server) with two clipped updates; returns the released
    tensor, the clipped mean and the noise std on the mean."""
    from fedrec.server.user_dp import UserLevelDP

    g = {"lora.B": torch.zeros(*shape)}
    cfg = FedConfig(min_replies=2, server_opt=server_opt, server_lr=server_lr, user_dp=True,
                    user_clip=2.0)  # fmt: skip
    inner = FedRecStrategy(cfg, template=dict(g), ledger=tmp_path / "ledger.jsonl")
    w = UserLevelDP(inner, num_sampled=n, noise_multiplier=z)
    w.current_arrays = to_record(g)
    inner.current = dict(g)
    inner._sent[1] = 2
    up = {"lora.B": torch.full(shape, 0.1)}  # norm 0.1 * sqrt(numel): clipped to 2 if larger
    small = {"lora.B": torch.full(shape, 0.001)}  # kept
    arrays, _ = w.aggregate_train(1, [_reply(1, up), _reply(2, small)])
    assert arrays is not None
    numel = float(np.prod(shape))
    mean = (0.1 * min(1.0, 2.0 / (0.1 * numel**0.5)) + 0.001) / n
    got = torch.from_numpy(arrays["lora.B"].numpy()).double()
    return got, mean, w.noise_std()


@pytest.mark.parametrize("lr", [0.5, 2.0, 4.0])
def test_user_level_noise_goes_on_the_mean_before_the_server_step(tmp_path, lr):
    """With server-lr != 1 the released model is g + lr * (mean + N(0, (zC/n)^2)): the noise on
    the mean keeps its calibrated std (Flower's wrapper alone would give zC/(n lr))."""
    z, n = 0.5, 5
    got, mean, std = _user_dp_round(tmp_path, server_opt="sgd", server_lr=lr, z=z, n=n)
    assert std == pytest.approx(z * 2.0 / n)
    noise_on_mean = got / lr - mean
    assert abs(float(noise_on_mean.mean())) < 5 * std / 100  # 10,000 draws
    assert float(noise_on_mean.std()) == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_user_level_server_optimizer_sees_exactly_the_noisy_mean(tmp_path, opt, monkeypatch):
    """Draw for draw: the optimizer's input is the clipped mean plus the one noise draw (recorded),
    so momentum/Adam are post-processing of that release."""
    from fedrec.server import user_dp
    from fedrec.shared.federation.server_opt import ServerOptimizer

    z, n, shape = 0.7, 5, (6, 7)
    drawn = []

    def recorded(shape_, std_):
        drawn.append(user_dp_real(shape_, std_))
        return drawn[-1]

    user_dp_real = user_dp.os_gaussian
    monkeypatch.setattr(user_dp, "os_gaussian", recorded)
    got, mean, std = _user_dp_round(tmp_path, server_opt=opt, server_lr=0.3, z=z, n=n, shape=shape)
    assert len(drawn) == 1  # one draw per round, for the one travelling tensor
    noise = (np.float64(mean) + drawn[0]).astype(np.float32)
    delta = torch.from_numpy(noise)
    expected = ServerOptimizer(opt, 0.3).step({"lora.B": torch.zeros(*shape)}, {"lora.B": delta})
    assert torch.allclose(got.float(), expected["lora.B"], atol=1e-6)
    # and not the optimizer applied to the noiseless mean
    clean = ServerOptimizer(opt, 0.3).step(
        {"lora.B": torch.zeros(*shape)}, {"lora.B": torch.full(shape, mean)}
    )
    assert not torch.allclose(got.float(), clean["lora.B"], atol=1e-3)


def test_user_level_noise_is_calibrated_without_amplification():
    from fedrec.shared.privacy.accounting import epsilon_spent
    from fedrec.shared.privacy.user_level import user_level_summary, user_noise_multiplier

    cfg = FedConfig(user_dp=True, num_rounds=10, user_epsilon=4.0, user_delta=1e-3)
    z = user_noise_multiplier(cfg)
    assert epsilon_spent(history=[(z, 1.0, 10)], delta=1e-3) <= 4.0
    assert epsilon_spent(history=[(z * 0.97, 1.0, 10)], delta=1e-3) > 4.0  # not over-noised
    s = user_level_summary(cfg, noise_multiplier=z, releases=10, sampled=94, clients=943)
    assert s["epsilon"] <= 4.0 and s["epsilon_if_poisson_sampling"] < s["epsilon"]
    assert s["noise_std"] == pytest.approx(z * cfg.user_clip / 94)


def test_os_gaussian_is_gaussian_and_unseeded():
    from scipy import stats

    from fedrec.server.user_dp import os_gaussian

    x = os_gaussian((200, 101), 0.3)
    assert x.shape == (200, 101) and x.dtype == np.float64
    assert stats.kstest(x.ravel() / 0.3, "norm").pvalue > 1e-4
    assert not np.array_equal(os_gaussian((50,), 1.0), os_gaussian((50,), 1.0))
    assert os_gaussian((3,), 1.0).shape == (3,)  # odd sizes


def test_user_level_refuses_to_release_a_model_without_noise(tmp_path):
    """The wrapper adds no noise of its own: a model that did not go through noise_mean (a
    future path around _mean_step) is refused instead of released."""
    from fedrec.server.user_dp import UserLevelDP

    g = {"lora.B": torch.zeros(4, 4)}
    cfg = FedConfig(min_replies=2, user_dp=True, user_clip=1.0)
    inner = FedRecStrategy(cfg, template=dict(g), ledger=tmp_path / "ledger.jsonl")
    w = UserLevelDP(inner, num_sampled=2, noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="without the noise"):
        w._add_noise_to_aggregated_arrays(to_record(g))
    inner.mean_noise({"lora.B": torch.zeros(4, 4)})
    assert w._add_noise_to_aggregated_arrays(to_record(g)) is not None
    with pytest.raises(RuntimeError, match="without the noise"):  # once per noise draw
        w._add_noise_to_aggregated_arrays(to_record(g))
