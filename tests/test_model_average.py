"""``ema-decay``: the released model is the moving average of the rounds' global models
(server/app.py ``ModelAverage``), checked against the formula on random tensors and in a real
Flower simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrec.server.app import (
    ModelAverage,
    load_checkpoint,
    load_checkpoint_average,
    save_checkpoint,
)
from fedrec.shared.federation.config import FedConfig, parse_run_config


def _rounds(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"a": torch.randn(3, 4, generator=g), "b.lora_B": torch.randn(5, generator=g)}
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_average_is_the_bias_corrected_ema_of_the_rounds(seed):
    rng = np.random.default_rng(seed)
    decay, n = float(rng.uniform(0.05, 0.99)), int(rng.integers(1, 12))
    states = _rounds(seed, n)
    avg = ModelAverage(decay)
    for s in states:
        avg.update(s)
    w = np.array([(1 - decay) * decay ** (n - 1 - t) for t in range(n)])
    w /= w.sum()  # = (1 - decay) decay^(n-1-t) / (1 - decay^n): the weights sum to one
    for k in states[0]:
        want = sum(wt * s[k].double() for wt, s in zip(w, states, strict=True))
        got = avg.value()[k]
        assert got.dtype == torch.float32 and got.shape == states[0][k].shape
        assert torch.allclose(got.double(), want, atol=1e-6), k
    # one round: the average is that round's model (the initial model is not in it)
    one = ModelAverage(decay)
    one.update(states[-1])
    assert all(torch.allclose(one.value()[k], states[-1][k]) for k in states[-1])


def test_a_resumed_average_equals_an_uninterrupted_one(tmp_path):
    """The average is checkpointed with the global tensors: stopping after round 3 and
    resuming gives the same average as running through, and the checkpoint's global state
    does not take the average's tensors in."""
    states = _rounds(7, 6)
    through = ModelAverage(0.8)
    for s in states:
        through.update(s)
    first = ModelAverage(0.8)
    for s in states[:3]:
        first.update(s)
    save_checkpoint(tmp_path, 3, states[2], {}, first.state())
    rnd, global_state, opt = load_checkpoint(tmp_path)
    assert rnd == 3 and set(global_state) == set(states[2]) and opt == {}
    resumed = ModelAverage(0.8)
    resumed.load(load_checkpoint_average(tmp_path))
    assert resumed.rounds == 3
    for s in states[3:]:
        resumed.update(s)
    for k in states[0]:
        assert torch.equal(resumed.value()[k], through.value()[k])
    assert load_checkpoint_average(tmp_path / "none") == {}
    with pytest.raises(ValueError, match="no round"):
        ModelAverage(0.5).value()


def test_ema_decay_is_validated():
    assert parse_run_config({"ema-decay": "0.9"}).ema_decay == 0.9
    assert FedConfig().ema_decay == 0.0  # off by default
    for bad in (1, 1.5, -0.1):
        with pytest.raises(ValueError, match="'ema-decay'"):
            parse_run_config({"ema-decay": bad})


def test_a_real_simulation_releases_the_average(synth_dir, tiny_backbone, tmp_path):
    """A real Flower simulation with ``ema-decay``: the saved model is the checkpointed average
    (not the last round's model), the last round's model is scored beside it, and the clients'
    own evaluation of the last round equals the server's score of that model."""
    from fedrec.shared.federation.params import travelling_state
    from fedrec.shared.model.artifacts import load_model
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        num_rounds=3, fraction_train=1.0, evaluate_every=1, fraction_evaluate=1.0,
        local_steps=2, sample_rate=0.5, negatives=10, slots=6, epsilon=3.0, lr=2.0,
        ema_decay=0.6,
    )  # fmt: skip
    out = tmp_path / "run"
    result = simulate(cfg, out, baselines="none", num_cpus=2)
    avg = result["model"]["average"]
    assert avg["decay"] == 0.6 and avg["rounds_averaged"] == 3
    saved = ModelAverage(0.6)
    saved.load(load_checkpoint_average(out))
    _, last, _ = load_checkpoint(out)
    model, _ = load_model(out, backbone=str(tiny_backbone))
    released = {  # a loaded model's head is not trainable: read those tensors by name
        **travelling_state(model),
        **{k: getattr(model, k[5:]).detach() for k in last if k.startswith("head.")},
    }
    expected = saved.value()
    assert set(released) == set(expected) == set(last)
    for k in expected:
        assert torch.allclose(released[k], expected[k], atol=1e-6), k
    assert any(not torch.allclose(expected[k], last[k]) for k in last)  # it is not the last
    fed = result["model"]["federated_evaluation"]["3"]
    assert fed["NDCG@10"] == pytest.approx(avg["last_round"]["test"]["NDCG@10"], abs=1e-9)
    # no prior in this run: the released model's scores are the average's alone
    assert avg["average"]["test"] == result["model"]["metrics"]["test"]
    assert avg["average"]["valid"] == result["model"]["valid"]
    trace = result["model"]["central_evaluation"]
    assert all("valid_NDCG@10_average" in trace[str(r)] for r in (1, 2, 3))
    # round 1's average is round 1's model
    assert trace["1"]["valid_NDCG@10_average"] == trace["1"]["valid_NDCG@10"]
    statement = (out / "privacy" / "statement.md").read_text()
    assert "`ema-decay` = 0.6" in statement
    report, _ = audit_run(out)
    assert report["ok"]
    assert json.loads((out / "config.json").read_text())["federation"]["ema_decay"] == 0.6


def test_the_checkpoint_names_its_round_in_the_tensor_file(tmp_path):
    """A crash between the tensor file and ``round.json`` leaves the previous round's
    ``round.json``: the round comes from the tensor file's own stamp, so the global tensors, the
    average and the round number agree (a resume neither repeats a round nor misreads the
    average). A checkpoint written before the stamp falls back to ``round.json``."""
    from safetensors.torch import save_file

    from fedrec.server.app import resumed_average

    states = _rounds(3, 4)
    avg = ModelAverage(0.5)
    for s in states:
        avg.update(s)
    save_checkpoint(tmp_path, 4, states[-1], {}, avg.state())
    (tmp_path / "checkpoint" / "round.json").write_text('{"round": 3}')  # the crash
    rnd, state, _ = load_checkpoint(tmp_path)
    assert rnd == 4 and all(torch.equal(state[k], states[-1][k]) for k in state)
    assert resumed_average(tmp_path, 0.5, rnd).rounds == 4
    with pytest.raises(ValueError, match="not written with ema-decay=0.5"):
        resumed_average(tmp_path, 0.5, 3)
    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    save_file(states[0], str(old / "checkpoint" / "global.safetensors"))  # no stamp
    assert load_checkpoint(old) is None  # nor a round.json: nothing to resume from
    (old / "checkpoint" / "round.json").write_text('{"round": 2}')
    assert load_checkpoint(old)[0] == 2
    plain = tmp_path / "plain"  # a run without ema-decay, resumed with it: refused
    save_checkpoint(plain, 2, states[1], {})
    with pytest.raises(ValueError, match="holds the model average of 0 rounds"):
        resumed_average(plain, 0.8, 2)


def test_personalize_starts_from_the_released_average(synth_dir, tiny_backbone, tmp_path):
    """``simulations/personalize.py`` loads the model the run released: the average with
    ``ema-decay``, the last round's tensors without."""
    from fedrec.shared.federation.data_and_model import dataset_and_split, model_for
    from fedrec.shared.federation.params import travelling_state
    from fedrec.shared.rundir import write_json
    from fedrec.simulations.personalize import load_global

    for decay in (0.5, 0.0):
        cfg = FedConfig(data=str(synth_dir), backbone=str(tiny_backbone), max_length=16,
                        history_len=8, ema_decay=decay)  # fmt: skip
        ds, split = dataset_and_split(cfg.data, cfg.protocol, cfg.seed)
        base = travelling_state(model_for(cfg, ds, split))
        g = torch.Generator().manual_seed(1)
        states = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
                  for _ in range(2)]  # fmt: skip
        avg = ModelAverage(0.5)
        for s in states:
            avg.update(s)
        run = tmp_path / f"run{decay}"
        write_json(run / "config.json", {"federation": cfg.as_dict()})
        save_checkpoint(run, 2, states[-1], {}, avg.state() if decay else None)
        _, _, _, model = load_global(run)
        want = avg.value() if decay else states[-1]
        got = travelling_state(model)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
