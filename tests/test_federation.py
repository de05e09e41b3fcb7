"""A real Flower simulation (`flwr run` on a local SuperLink in simulation mode, Ray) on tiny
data with a tiny model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.shared.federation.config import FedConfig, parse_run_config


@pytest.fixture(scope="module")
def sim_run(synth_dir, tiny_backbone, tmp_path_factory):
    from fedrec.simulations.launch import simulate

    out = tmp_path_factory.mktemp("runs") / "sim"
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        num_rounds=3, fraction_train=0.5, evaluate_every=1, fraction_evaluate=1.0,
        local_steps=2, sample_rate=0.5, negatives=10, slots=6, epsilon=3.0, lr=0.5,
    )  # fmt: skip
    rounds: list[dict] = []
    # what a run that stopped before its first round leaves: a new run starts the file afresh
    out.mkdir()
    (out / "progress.jsonl").write_text('{"round": 0, "stale": true}\n')
    result = simulate(cfg, out, baselines="popularity", num_cpus=2, on_round=rounds.append)
    return cfg, out, result, rounds


def test_simulation_writes_the_run_directory(sim_run):
    cfg, out, result, rounds = sim_run
    for f in ("config.json", "metrics.json", "privacy/ledger.jsonl", "privacy/statement.md",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "rounds.png",
              "checkpoint/global.safetensors"):  # fmt: skip
        assert (out / f).is_file(), f
    trained = [r for r in rounds if "accepted" in r]
    assert [r["round"] for r in trained] == [1, 2, 3]
    assert all(r["accepted"] >= cfg.min_replies and r["aggregated"] for r in trained)
    assert result["model"]["metrics"]["test"]["n_queries"] > 0
    assert "popularity" in result["baselines"]
    # submitted with `flwr run`, not the deprecated run_simulation; progress came from the file
    log = (out / "flower.log").read_text()
    assert "Successfully started run" in log and "deprecated" not in log.lower()
    progress = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert progress == json.loads(json.dumps(rounds))
    assert not any("stale" in p for p in progress)
    assert not flower_processes(log)  # the SuperLink and all under it are gone


def flower_processes(flower_log: str) -> list[int]:
    """Live processes started for the run whose log this is (found by their FLWR_HOME)."""
    home = re.search(r"FLWR_HOME=(\S+)", flower_log)
    assert home, flower_log[:500]
    needle = f"FLWR_HOME={home.group(1)}".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


def test_run_config_travels_through_the_generated_app_exactly(tmp_path):
    """`fedrec simulate` hands its whole config to `flwr run` as the app's config: every key,
    type and odd string survives."""
    import tomllib

    from fedrec.server.app import split_run_config
    from fedrec.simulations.launch import app_project

    cfg = FedConfig(data='/tmp/a "quoted" dir\\x', lr=0.25, delta=1e-06, dp=False, silos=7)
    flat = {**cfg.to_flat(), "run-dir": str(tmp_path / "r"), "resume": True, "baselines": "all"}
    project = app_project(tmp_path / "app", flat)
    data = tomllib.loads((project / "pyproject.toml").read_text())
    assert data["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedrec.server.app:app"
    back, server = split_run_config(data["tool"]["flwr"]["app"]["config"])
    assert back == cfg
    assert server == {"run-dir": str(tmp_path / "r"), "resume": True, "baselines": "all"}


def test_progress_follows_whole_lines_only_and_skips_a_resumed_runs_past(tmp_path):
    from fedrec.simulations.launch import _Progress

    path = tmp_path / "progress.jsonl"
    path.write_text('{"round": 1}\n')  # a resumed run's earlier rounds: not shown again
    seen: list[dict] = []
    p = _Progress(path, seen.append)
    with path.open("a") as f:
        f.write('{"round": 2, "loss": 4.1}\n{"round": 3')  # the ServerApp is mid-write
    p.poll()
    assert seen == [{"round": 2, "loss": 4.1}]
    with path.open("a") as f:
        f.write(', "loss": null}\n')
    p.poll()
    p.poll()
    assert seen == [{"round": 2, "loss": 4.1}, {"round": 3, "loss": None}]


def test_simulate_refuses_a_folder_holding_a_run_before_starting_flower(sim_run, tmp_path):
    from fedrec.simulations.launch import simulate

    cfg, out, _, _ = sim_run
    t = time.perf_counter()
    with pytest.raises(ValueError, match="already holds a run"):
        simulate(cfg, out, baselines="none", num_cpus=2)
    with pytest.raises(ValueError, match="config.json differs"):
        simulate(FedConfig(**{**cfg.as_dict(), "lr": 0.1}), out, resume=True, num_cpus=2)
    assert time.perf_counter() - t < 10  # refused up front, no SuperLink started


def start_stoppable(code_cfg: str, out: Path, resume: bool = False) -> subprocess.Popen:
    code = (
        "from pathlib import Path; from fedrec.simulations.launch import simulate; "
        f"from fedrec.shared.federation.config import FedConfig; cfg = FedConfig({code_cfg}); "
        f"simulate(cfg, Path({str(out)!r}), baselines='none', num_cpus=2, resume={resume})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)


def wait_for_round(p: subprocess.Popen, out: Path, rnd: int, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
        path = out / "progress.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if any(json.loads(x).get("round") == rnd and "accepted" in json.loads(x) for x in lines):
            return
        time.sleep(0.3)
    raise AssertionError(f"round {rnd} did not finish in {timeout} s")


@pytest.mark.slow  # two real simulations and a SIGTERM
def test_sigterm_stops_flower_and_ray_and_resume_continues(synth_dir, tiny_backbone, tmp_path):
    """A simulation stopped mid-run (SIGTERM, as a crash or a scheduler would) leaves no
    SuperLink, flwr-simulation or Ray process behind; `resume` continues from the checkpoint,
    with the model average (ema-decay) of every round, and every client's epsilon continues from
    its history before the stop (the audit recomputes each client's epsilon from all its ledger
    lines, before and after)."""
    from fedrec.server.app import load_checkpoint
    from fedrec.shared.privacy.report import audit_run

    out = tmp_path / "stopped"
    code_cfg = (
        f"data={str(synth_dir)!r}, backbone={str(tiny_backbone)!r}, max_length=16, "
        "history_len=8, num_rounds=3, fraction_train=1.0, evaluate_every=0, local_steps=2, "
        "negatives=10, slots=6, epsilon=6.0, lr=0.5, ema_decay=0.5"
    )
    p = start_stoppable(code_cfg, out)
    try:
        wait_for_round(p, out, 1)
        log = (out / "flower.log").read_text()
        assert flower_processes(log)  # it is running
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
        assert not flower_processes(log)
    finally:
        if p.poll() is None:
            p.kill()
    assert not (out / "metrics.json").exists()
    ck = load_checkpoint(out)
    assert ck is not None and 1 <= ck[0] < 3
    before = ledger_lines(out)
    p = start_stoppable(code_cfg, out, resume=True)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode() if p.stderr else ""
    assert (out / "metrics.json").is_file()
    after = ledger_lines(out)
    assert after[: len(before)] == before and max(x["round"] for x in after) == 3
    # the model average (ema-decay) continued from the checkpoint: all three rounds are in it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["average"]["rounds_averaged"] == 3
    for client in {x["client"] for x in before}:
        eps = [x["epsilon_after"] for x in after if x["client"] == client]
        assert eps == sorted(eps) and eps[-1] > eps[0], client  # did not restart from zero
    report, text = audit_run(out, plot=False)
    assert report["ok"], text


def ledger_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "privacy" / "ledger.jsonl").read_text().splitlines()]
    return [x for x in lines if "client" in x]  # not the server's notes on missing clients


def test_ledger_is_truthful_and_within_budget(sim_run):
    from fedrec.shared.privacy.accounting import epsilon_spent

    cfg, out, result, _ = sim_run
    lines = ledger_lines(out)
    assert lines and all(x["epsilon_after"] <= cfg.epsilon for x in lines)
    by_client: dict[str, list] = {}
    for x in lines:
        by_client.setdefault(x["client"], []).append(x)
    for client, xs in by_client.items():
        hist = [(x["noise_multiplier"], x["sample_rate"], x["steps"]) for x in xs]
        # the client's reported epsilon is its WHOLE history's, under the replace-one adjacency
        # of disjoint examples: recompute it from the ledger
        assert xs[-1]["adjacency"] == cfg.dp_adjacency() == "replace-one"
        assert xs[-1]["epsilon_after"] == pytest.approx(
            epsilon_spent(
                history=hist, delta=cfg.delta, accountant=cfg.accountant, adjacency="replace-one"
            ),
            rel=1e-6,
        ), client
        assert sorted(x["round"] for x in xs) == [x["round"] for x in xs]
    assert any(len(xs) > 1 for xs in by_client.values())  # some client took part twice
    assert result["privacy"]["epsilon_max"] == max(x["epsilon_after"] for x in lines)


def test_federated_evaluation_equals_centralized(sim_run, synth_dir, tiny_backbone):
    """Clients evaluate their own held-out items; the weighted mean == the central metric."""
    from fedrec.shared.model.artifacts import load_model

    cfg, out, result, _ = sim_run
    fed = result["model"]["federated_evaluation"][str(cfg.num_rounds)]
    central = result["model"]["metrics"]["test"]
    assert fed["num-queries"] == central["n_queries"]
    assert fed["NDCG@10"] == pytest.approx(central["NDCG@10"], abs=1e-9)
    assert fed["HR@10"] == pytest.approx(central["HR@10"], abs=1e-9)
    model, _ = load_model(out, backbone=str(tiny_backbone))  # the adapter loads back
    assert model.item_bias is not None and torch.isfinite(model.item_bias).all()


def test_run_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown key 'num-round'"):
        parse_run_config({"num-round": 3})
    with pytest.raises(ValueError, match="'epsilon' = -1"):
        parse_run_config({"epsilon": -1})
    with pytest.raises(ValueError, match="aggregator"):
        parse_run_config({"aggregator": "mean"})
    with pytest.warns(UserWarning, match="'epsilon' is ignored: dp=false"):
        parse_run_config({"dp": "false", "epsilon": 3})
    assert parse_run_config({"num-rounds": "7", "dp": "true"}).num_rounds == 7


def test_planned_rounds_cover_binomial_participation():
    cfg = FedConfig(num_rounds=40, fraction_train=0.25)
    k = cfg.rounds_planned()
    p = np.random.default_rng(0).binomial(40, 0.25, size=200_000)
    assert 0.985 <= (p <= k).mean() and (p <= k - 1).mean() < 0.99
    assert FedConfig(num_rounds=5, fraction_train=1.0).rounds_planned() == 5


def test_pyproject_flower_config_equals_defaults():
    """One source of configuration: `flwr run .` and `fedrec simulate` start from the same."""
    import tomllib
    from pathlib import Path

    from fedrec.server.app import split_run_config

    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    cfg, server = split_run_config(data["tool"]["flwr"]["app"]["config"])
    assert cfg == FedConfig()
    assert set(server) == {"run-dir", "resume", "baselines"}
    assert data["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedrec.server.app:app"


def test_the_flower_app_bundle_holds_the_code_not_the_results():
    """What `flwr run` sends to a SuperLink (the FAB, built by Flower's own builder from this
    checkout): the app's code and presets, none of the committed results, docs or tests, and
    far below Flower's 10 MB cap (the results alone are over 8 MB)."""
    import io
    import zipfile
    from pathlib import Path

    from flwr.cli.build import build_fab_from_files, collect_files
    from flwr.common.constant import FAB_MAX_SIZE

    root = Path(__file__).parents[1]
    fab, _ = build_fab_from_files(collect_files(root.resolve()))
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/app.py" in names and "client/app.py" in names
    assert "simulations/presets/secure.toml" in names
    assert not [n for n in names if n.startswith(("simulations/results/", "docs/", "tests/"))]
    assert len(fab) < FAB_MAX_SIZE / 4


def test_audit_verifies_the_real_run(sim_run):
    """`fedrec audit`'s independent recomputation agrees with what the real clients reported."""
    from fedrec.shared.privacy.report import audit_run

    cfg, out, _, _ = sim_run
    report, text = audit_run(out)
    assert report["ok"], [f for f in report["findings"] if f["severity"] == "error"]
    lines = ledger_lines(out)
    assert all(x["total_steps"] >= x["steps"] > 0 for x in lines if x["trained"])
    for name, c in report["clients"].items():
        assert c["epsilon"] == pytest.approx(c["epsilon_reported"], rel=1e-9), name
        # the second accountant (independent numerics) within 2 %, on the conservative side
        assert c["epsilon_independent"] == pytest.approx(c["epsilon"], rel=0.02), name
    assert (out / "privacy" / "epsilon.png").is_file() and "Result: PASS" in text


@pytest.mark.slow  # a second real simulation (the canary run)
def test_empirical_audit_on_a_real_federation(sim_run):
    """The one-run audit end to end: canary data, a real Flower simulation with the canaries
    in the clients' DP-SGD, the attack on the global model, the report."""
    from dataclasses import replace

    from fedrec.simulations.empirical_audit import run_empirical

    cfg, out, _, _ = sim_run
    audit_cfg = replace(cfg, num_rounds=2, evaluate_every=0, fraction_evaluate=0.0)
    rep = run_empirical(out, audit_cfg, canaries=40, seed=1)
    base = out / "privacy" / "empirical"
    plan = json.loads((base / "plan.json").read_text())
    sent = json.loads((base / "canaries.json").read_text())["clients"]
    assert rep["included"] == sum(plan["included"]) == sum(len(v) for v in sent.values())
    assert rep["audit_run_ledger_ok"]  # the audit run's own ledger verifies
    assert 0.0 <= rep["membership"]["auc"] <= 1.0
    assert 0.0 <= rep["lower_bound"]["epsilon"] <= rep["lower_bound"]["ceiling"]
    assert not rep["bug"]
    assert json.loads((out / "privacy" / "empirical.json").read_text())["canaries"] == 40


def test_user_level_dp_on_a_real_federation(synth_dir, tiny_backbone, tmp_path):
    """user-dp=true through Flower's wrapper in a real simulation; `fedrec audit` verifies it."""
    from fedrec.shared.privacy.accounting import epsilon_spent
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    out = tmp_path / "udp"
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        num_rounds=2, fraction_train=0.5, evaluate_every=0, local_steps=2, sample_rate=0.5,
        negatives=10, slots=6, lr=0.5, dp=False, user_dp=True, user_clip=0.5, user_epsilon=6.0,
    )  # fmt: skip
    result = simulate(cfg, out, baselines="popularity", num_cpus=2)
    u = result["privacy"]["user_level"]
    assert u["enabled"] and u["releases"] == 2 and u["clients"] > 0
    assert u["sampled_per_round"] == max(int(u["clients"] * 0.5), cfg.min_replies)
    assert u["epsilon"] == pytest.approx(
        epsilon_spent(history=[(u["noise_multiplier"], 1.0, 2)], delta=cfg.user_delta)
    )
    assert u["epsilon"] <= 6.0
    statement = (out / "privacy" / "statement.md").read_text()
    assert "User-level DP (DP-FedAvg" in statement and "Local DP-SGD**: off" in statement
    report, text = audit_run(out, plot=False)
    assert report["ok"], text
    assert report["user_level_dp"]["verified"] and "PASS" in text
    replace = epsilon_spent(history=[(u["noise_multiplier"] / 2, 1.0, 2)], delta=cfg.user_delta)
    assert report["user_level_dp"]["epsilon_replace_one_recomputed"] == pytest.approx(replace)
    # an under-claimed replace-one epsilon fails the audit (recomputed by two accountants)
    doc = json.loads((out / "metrics.json").read_text())
    doc["privacy"]["user_level"]["epsilon_replace_one"] = u["epsilon"]
    (out / "metrics.json").write_text(json.dumps(doc))
    report, text = audit_run(out, plot=False)
    assert not report["ok"] and "claimed replace-one epsilon" in text
    # the statement printed gives the recomputed figure, not the doctored claim
    assert f"clip: epsilon {replace:.4f} (the same releases" in text.replace("\n  ", " ")
    # every figure the statement prints is recomputed: more noise claimed than z x clip / n
    # gives fails, and the statement prints the recomputed std
    std = u["noise_multiplier"] * cfg.user_clip / u["sampled_per_round"]
    assert u["noise_std"] == pytest.approx(std)
    honest = json.loads((out / "metrics.json").read_text())
    honest["privacy"]["user_level"]["epsilon_replace_one"] = replace

    def audit_with(**claim):
        doc = json.loads(json.dumps(honest))
        doc["privacy"]["user_level"] |= claim
        (out / "metrics.json").write_text(json.dumps(doc))
        return audit_run(out, plot=False)

    report, text = audit_with()
    assert report["ok"], text
    report, text = audit_with(noise_std=10 * std)
    assert not report["ok"] and "claimed noise_std" in text
    assert report["user_level_dp"]["noise_std"] == pytest.approx(std)
    assert f"std {std:.4g} (noise multiplier" in text
    # the sample size comes from the clients the server asked each round, not from the claim:
    # a claim of one client (or none) with the matching sample size and std still fails
    for clients in (1, 0):
        report, text = audit_with(clients=clients, sampled_per_round=1, noise_std=std * 2)
        assert not report["ok"], clients
        assert "the server asked" in text or "names no client count" in text
    report, text = audit_with(delta=1e-12, clip=0.001, epsilon_budget=100.0)
    assert not report["ok"]
    for key in ("delta", "clip", "epsilon_budget"):
        assert f"claimed {key}" in text
    assert f"at delta = {cfg.user_delta}" in text  # the statement gives the config's delta


def test_id_table_federation_without_dp(synth_dir, tiny_backbone, tmp_path):
    """id-residual=true (no DP): a real simulation trains and averages the per-item ID table;
    it is in the saved model that inference loads, its size is in the upload bytes, and the
    privacy statement says what it reveals."""
    from fedrec.shared.inference import Recommender
    from fedrec.simulations.launch import simulate

    out = tmp_path / "idres"
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        num_rounds=2, fraction_train=1.0, partition="silo", silos=2, evaluate_every=1,
        local_steps=2, sample_rate=0.5, negatives=10, lr=0.5, lr_id=2.0, dp=False,
        epsilon=FedConfig.epsilon, examples="sequence", id_residual=True,
    )  # fmt: skip
    result = simulate(cfg, out, baselines="none", num_cpus=2)
    rec = Recommender.load(out)
    table = rec.model.id_emb
    assert table is not None and table.abs().max() > 0  # trained and averaged, from zeros
    n_items, dim = table.shape
    assert result["model"]["upload_bytes_per_client_round"] >= n_items * dim * 4
    assert len(rec.recommend(history=list(rec.item_ids[:2]), k=5)) == 5
    statement = (out / "privacy" / "statement.md").read_text()
    assert "OFF" in statement and "per-item ID table" in statement


def test_cold_prior_is_attached_by_the_server_after_the_last_round(
    synth_dir, tiny_backbone, tiny_wide_encoder, tmp_path
):
    """cold-prior=1 on protocol B, read by another encoder (cold-prior-backbone): the server
    regresses the released model's item biases on that encoder's embeddings of the public texts
    (post-processing) and gives the cold items the prediction; it is in the saved model with its
    encoder, the reported test metrics are that model's, and the same model with the prior on its
    own frozen backbone is scored beside it (a paired comparison)."""
    from fedrec.shared.data import load_dataset
    from fedrec.shared.evaluation import evaluate
    from fedrec.shared.model.artifacts import load_model
    from fedrec.shared.model.central import ModelScorer, ProfileBank
    from fedrec.shared.splitting import protocol_b
    from fedrec.simulations.launch import simulate

    out = tmp_path / "prior"
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        protocol="B", num_rounds=1, fraction_train=1.0, partition="silo", silos=2,
        evaluate_every=0, local_steps=2, sample_rate=0.5, negatives=10, lr=0.5, dp=False,
        epsilon=FedConfig.epsilon, cold_dropout=0.5, cold_prior=1.0,
        cold_prior_backbone=str(tiny_wide_encoder),
    )  # fmt: skip
    result = simulate(cfg, out, baselines="none", num_cpus=2)
    info = result["model"]["cold_prior"]
    assert "learned item bias" in info["target"] and info["weight"] == 1.0
    assert info["backbone"] == str(tiny_wide_encoder)
    own = info["own_backbone"]
    assert own["backbone"] == str(tiny_backbone) and "own_backbone" not in own
    assert set(own["metrics"]) == {"cold_items"}
    assert own["metrics"] != result["model"]["metrics"]  # another prior, other scores
    model, _ = load_model(out)
    assert model.cold_prior_backbone == str(tiny_wide_encoder)
    assert model.cold_prior.numel() == 48 + 1
    split = protocol_b(load_dataset(synth_dir))
    cold = torch.zeros(len(model.warm), dtype=torch.bool)
    cold[torch.as_tensor(split.cold_items)] = True
    assert torch.equal(~model.warm, cold)
    assert model.cold_prior_items[cold].abs().sum() > 0
    assert not model.cold_prior_items[~cold].any()
    got = evaluate(ModelScorer(model, ProfileBank(model)), split.tests["cold_items"])
    want = result["model"]["metrics"]["cold_items"]
    assert got["Recall@10"] == pytest.approx(want["Recall@10"], abs=1e-6)


@pytest.mark.slow  # two real simulations
def test_physical_batches_leave_the_ledger_unchanged(synth_dir, tiny_backbone, tmp_path):
    """Two real simulations of silos whose Poisson batches (about 40 examples: q from
    expected-batch) are split into physical batches of 4 in one and not split in the other:
    the ledgers (every client's mechanism and epsilon per round) are identical, the per-client
    q is the roster's, and `fedrec audit` passes both."""
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    keep = ("client", "round", "trained", "noise_multiplier", "sample_rate", "steps",
            "epsilon_after", "total_steps", "adjacency")  # fmt: skip
    ledgers = []
    for bound in (0, 4):
        cfg = FedConfig(
            data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
            partition="silo", silos=3, num_rounds=2, fraction_train=1.0, min_replies=3,
            evaluate_every=0, local_steps=2, sample_rate=0.0, expected_batch=40, negatives=10,
            slots=6, epsilon=3.0, lr=0.5, physical_batch=bound,
        )  # fmt: skip
        out = tmp_path / f"bound-{bound}"
        rounds: list[dict] = []
        simulate(cfg, out, baselines="none", num_cpus=2, on_round=rounds.append)
        trained = [r for r in rounds if "accepted" in r]
        assert [r["accepted"] for r in trained] == [3, 3], trained
        assert all(r["failed"] == 0 for r in trained)
        report, text = audit_run(out, plot=False)
        assert report["ok"], text
        ledgers.append([{k: x.get(k) for k in keep} for x in ledger_lines(out)])
    assert ledgers[0] == ledgers[1]
    from fedrec.shared.federation.data_and_model import dataset_and_split
    from fedrec.shared.partition import partition_users

    _, split = dataset_and_split(synth_dir, "A", 0)
    parts = partition_users(split, scheme="silo", n_silos=3, seed=0)
    q = {f"p{i}": min(1.0, 40 / (6 * len(users))) for i, users in enumerate(parts)}
    assert all(x["sample_rate"] == pytest.approx(q[x["client"]]) for x in ledgers[0])
    assert all(v < 0.5 for v in q.values())


@pytest.mark.slow  # a real simulation interrupted with Ctrl-C
def test_ctrl_c_says_which_round_was_kept_and_exits_130(synth_dir, tiny_backbone, tmp_path):
    """SIGINT to `fedrec simulate` (what Ctrl-C sends): one line naming the last finished round
    and how to continue, exit code 130, and the checkpoint and ledger of that round kept."""
    from fedrec.server.app import load_checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedrec", "simulate", "--out", str(out), "--baselines", "none",
           "--preset", "cross-device", "--set", f"data={synth_dir}",
           "--set", f"backbone={tiny_backbone}",
           "--set", "max-length=16", "--set", "history-len=8", "--set", "num-rounds=50",
           "--set", "fraction-train=1.0", "--set", "evaluate-every=0", "--set", "local-steps=2",
           "--set", "negatives=10", "--set", "slots=6", "--set", "lr=0.5"]  # fmt: skip

    # a child of a non-interactive shell may inherit SIGINT ignored: restore the default
    def sigint_default() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         preexec_fn=sigint_default)  # fmt: skip
    try:
        wait_for_round(p, out, 1)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode() if p.stderr else ""
    ck = load_checkpoint(out)
    assert ck is not None and 1 <= ck[0] < 50
    assert f"interrupted after round {ck[0]} of 50" in " ".join(err.split()), err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    assert ledger_lines(out) and max(x["round"] for x in ledger_lines(out)) >= ck[0]
