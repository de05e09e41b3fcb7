"""The real `fedrec` command: help, exit codes, no tracebacks for bad input, run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def fedrec(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fedrec", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_help_lists_commands():
    r = fedrec("--help")
    assert r.returncode == 0 and "baselines" in r.stdout and "data" in r.stdout


def test_validate_good_and_bad(synth_dir, tmp_path):
    r = fedrec("data", "validate", synth_dir, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["ok"] and s["users"] == 60 and s["items"] == 90
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "items.tsv").write_text("item_id\ttitle\n1\tA\n")
    (bad / "interactions.tsv").write_text("user_id\titem_id\ttimestamp\n1\t2\t3\n")
    r = fedrec("data", "validate", bad)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "interactions.tsv:2" in r.stderr and "item 2" in r.stderr


def test_usage_errors_exit_2(synth_dir, tmp_path):
    r = fedrec("baselines", "--protocol", "Z", "--data", synth_dir, "--out", tmp_path / "r")
    assert r.returncode == 2 and "--protocol" in r.stderr and "Traceback" not in r.stderr
    r = fedrec("baselines", "--data", tmp_path / "nope", "--out", tmp_path / "r")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = fedrec("baselines", "--only", "svd", "--data", synth_dir, "--out", tmp_path / "r")
    assert r.returncode == 2 and "svd" in r.stderr
    r = fedrec("baselines", "--seed", "-1", "--data", synth_dir, "--out", tmp_path / "r")
    assert r.returncode == 2 and "--seed -1" in r.stderr and "Traceback" not in r.stderr
    # a seed no chosen baseline depends on would write seed 0's run under another seed
    r = fedrec(
        "baselines", "--seed", "3", "--only", "popularity", "--data", synth_dir, "--out",
        tmp_path / "p",
    )  # fmt: skip
    assert r.returncode == 2 and "--seed 3" in r.stderr and "drop --seed" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "p").exists()
    assert not (tmp_path / "r").exists()


def test_baselines_write_run_directory(synth_dir, tmp_path):
    out = tmp_path / "run"
    r = fedrec("baselines", "--data", synth_dir, "--only", "popularity,itemknn", "--out", out)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert set(metrics["baselines"]) == {"popularity", "itemknn"}
    assert 0 < metrics["baselines"]["itemknn"]["metrics"]["test"]["NDCG@10"] <= 1
    assert config["versions"]["torch"].startswith("2.13")
    # --seed reaches the fit and is recorded in both files
    seeded = tmp_path / "seeded"
    r = fedrec("baselines", "--data", synth_dir, "--only", "random", "--seed", "3", "--out", seeded)
    assert r.returncode == 0, r.stderr
    assert json.loads((seeded / "config.json").read_text())["seed"] == 3
    got = json.loads((seeded / "metrics.json").read_text())["baselines"]["random"]
    assert got["params"] == {"seed": 3}


@pytest.mark.parametrize(
    "args", [["data", "fetch", "ml-1m"], ["data", "synth", "x", "--topics", "9"]]
)
def test_more_usage_errors(args, tmp_path):
    r = fedrec(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_train_central_and_recommend(synth_dir, tiny_backbone, tmp_path):
    run = tmp_path / "central"
    r = fedrec(
        "train-central", "--data", synth_dir, "--out", run, "--no-baselines",
        "--set", f"model.backbone={tiny_backbone}", "--set", "model.max_length=16",
        "--set", "train.epochs=1", "--set", "train.batch_size=64",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "metrics.json", "training.png", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "model/head.safetensors"):  # fmt: skip
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["model"]["metrics"]["test"]["NDCG@10"] <= 1
    r = fedrec("recommend", run, "--history", "1,2,3", "-k", "4", "--json")
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    assert len(recs) == 4 and not {1, 2, 3} & {x["item_id"] for x in recs}
    assert all("because" in x for x in recs)
    r = fedrec("recommend", run, "--query", "galaxy rocket", "-k", "2")
    assert r.returncode == 0 and "because" in r.stdout
    for args, needle in (
        (["--history", "1,x"], "comma-separated"),
        (["--history", "424242"], "424242"),
        (["--history", "1,424242"], "not in the catalog of the model in"),
        (["-k", "0", "--history", "1"], "-k 0"),
        ([], "--history, --profile, --query or --age/--gender"),
        (["--age", "30"], "has no segment prior"),  # a central run: no released counts
    ):
        r = fedrec("recommend", run, *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, args
    assert "add_items" not in fedrec("recommend", run, "--history", "424242").stderr
    # an item given twice is one reason, with both its terms' share
    once = json.loads(fedrec("recommend", run, "--history", "1", "-k", "3", "--json").stdout)
    r = fedrec("recommend", run, "--history", "1,1,1", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    for rec in json.loads(r.stdout):
        items = [b["item_id"] for b in rec["because"] if "item_id" in b]
        assert items == [1], rec["because"]
    assert [x["item_id"] for x in once] == [x["item_id"] for x in json.loads(r.stdout)]


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("model.lora_rank=3", "unknown key 'lora_rank'"),
        ("lora_rank=3", "unknown key 'lora_rank'"),
        ("epochs", "expected KEY=VALUE"),
        ("train.batch_size=0", "batch_size"),
    ],  # fmt: skip
)
def test_train_central_bad_settings(synth_dir, tmp_path, setting, needle):
    r = fedrec("train-central", "--data", synth_dir, "--out", tmp_path / "r", "--set", setting)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_profile_template_rerenders_profiles_and_refuses_unknown_fields(synth_dir):
    from fedrec.shared.data import load_dataset
    from fedrec.shared.model.run_central import with_profile_template

    ds = load_dataset(synth_dir)
    uid = int(next(iter(ds.user_fields)))
    field = sorted(ds.user_fields[uid])[0]
    plain = with_profile_template(ds, f"Only {{{field}}}.")
    assert plain.user_text(uid) == f"Only {ds.user_fields[uid][field]}."
    assert with_profile_template(ds, "") is ds
    with pytest.raises(ValueError, match="cannot be filled.*profile fields are"):
        with_profile_template(ds, "A {no_such_field}")


def test_resume_alone_continues_with_the_runs_own_settings(tmp_path, monkeypatch):
    """`fedrec simulate --resume --out RUN` without settings takes RUN/config.json's (the run
    may have been started with another preset than the default); no config.json: exit 2."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.shared.federation.config import FedConfig
    from fedrec.simulations import launch

    run = tmp_path / "run"
    run.mkdir()
    started = FedConfig(partition="silo", silos=5, num_rounds=3, lr=0.5)  # not preset secure
    doc = {"command": "simulate", "federation": started.as_dict()}
    (run / "config.json").write_text(json.dumps(doc))
    seen = []

    def fake_simulate(cfg, out, **_kw):
        seen.append((cfg, out))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(launch, "simulate", fake_simulate)
    r = CliRunner().invoke(app, ["simulate", "--resume", "--out", str(run)])
    assert r.exit_code == 2 and "stopped by the test" in r.output
    assert seen and seen[0][0] == started
    # with settings given, they are used (and the run directory check compares them)
    seen.clear()
    CliRunner().invoke(app, ["simulate", "--resume", "--out", str(run), "--preset", "quick"])
    assert seen and seen[0][0] != started
    r = CliRunner().invoke(app, ["simulate", "--resume", "--out", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "nothing to resume" in r.output and "Traceback" not in r.output


def test_the_metrics_table_prints_whole_numbers_beside_a_long_model_name(monkeypatch):
    """At the width fedrec uses without a terminal (120), the main job's table cut every number
    of its fedrec row to '0.11…' because the model's name took the room; the name wraps now."""
    from rich.console import Console

    from fedrec import cli

    cols = ["HR@10", "NDCG@10", "MRR@10", "Recall@10", "Recall@20", "NDCG@20", "AUC"]
    name = "fedrec (federated, no local DP, user-level eps<=8.0 at delta 1e-4, secure aggregation)"
    result = {
        "protocol": "A",
        "baselines": {
            name: {"metrics": {"test": {c: 0.123456 for c in cols}}},
            "popularity": {"metrics": {"test": {c: 0.0449 for c in cols}}},
        },
    }
    console = Console(width=120, record=True)
    monkeypatch.setattr(cli, "out", console)
    cli._print_metrics(result)
    text = console.export_text()
    assert "…" not in text
    assert text.count("0.1235") == len(cols) and text.count("0.0449") == len(cols)


def test_the_summary_line_names_the_adjacency_of_its_user_level_epsilon():
    """The main job's summary line gave epsilon 7.51 without saying for which neighbouring data
    sets; it now says zero-out and gives the replace-one figure the run computed."""
    from pathlib import Path

    from fedrec import cli
    from fedrec.shared.federation.config import FedConfig

    run = Path(__file__).resolve().parents[1] / "simulations/results/main-job"
    result = json.loads((run / "metrics.json").read_text())
    u = result["privacy"]["user_level"]
    line = cli._headline(FedConfig(dp=False, user_dp=True, secure_agg=True), result)
    assert f"epsilon {u['epsilon']:.2f} per user at delta {u['delta']}" in line
    assert "with or without one user's data (zero-out" in line
    assert f"{u['epsilon_replace_one']:.2f} if it is replaced by another's" in line
    assert "the server sees only the noisy sum" in line


def test_deploy_budget_reads_a_devices_own_records(tmp_path):
    """`fedrec deploy budget DIR`: a device's local DP-SGD epsilon (its accountant history) and
    its user-level epsilon over the secure rounds it joined, recomputed from its files."""
    from fedrec.client.budget import Budget, FileStore, UserLevelLedger
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.privacy import skellam
    from fedrec.shared.privacy.accounting import epsilon_spent

    state = tmp_path / "data" / "fedrec-state"
    mech = {"accountant": "rdp", "adjacency": "add-remove", "group_size": 1, "delta": 1e-5}
    FileStore(state / "privacy-budget.json").save(Budget([(1.1, 0.02, 40)], mech, 8.0))
    entry = {"mu_total": 2.0e6, "l1": 70828.3, "l2": 1025.1, "risk": 1e-12}
    ledger = UserLevelLedger(state / "user-level-budget.json")
    for _ in range(3):
        ledger.append(entry)
    r = fedrec("deploy", "budget", tmp_path / "data", "--json")  # the data folder works too
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    local = epsilon_spent(history=[(1.1, 0.02, 40)], delta=1e-5, accountant="rdp")
    assert b["local_dp"]["epsilon"] == pytest.approx(local) and b["local_dp"]["steps"] == 40

    def composed(delta: float) -> float:  # the larger of the two accountants, as a run claims
        rest = delta - 3e-12
        return max(
            skellam.skellam_epsilon(2.0e6, 70828.3, 1025.1, 3, rest),
            skellam.composed_epsilon_independent([(2.0e6, 1025.1)] * 3, rest),
        )

    # the default delta is the run config's default user-delta
    user = composed(FedConfig().user_delta)
    assert b["user_level"]["secure_rounds"] == 3 and b["user_level"]["delta"] == 1e-5
    assert b["user_level"]["epsilon"] == pytest.approx(user)
    r = fedrec("deploy", "budget", state, "--json", "--user-delta", "1e-4")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["user_level"]["epsilon"] == pytest.approx(composed(1e-4))
    assert composed(1e-4) < user  # a larger delta, a smaller epsilon
    r = fedrec("deploy", "budget", state)
    assert r.returncode == 0 and "3 secure round(s)" in r.stdout and f"{user:.4f}" in r.stdout
    # these entries have no population_colluders: written under the older per-cohort rule
    assert b["user_level"]["per_cohort_rule_rounds"] == 3
    assert "3 of these rounds were recorded before 2026-12-03" in r.stdout
    assert "understates" in r.stdout
    ledger.path.write_text(json.dumps({"releases": [dict(entry, population_colluders=48)]}))
    r = fedrec("deploy", "budget", state, "--json")
    assert json.loads(r.stdout)["user_level"]["per_cohort_rule_rounds"] == 0
    r = fedrec("deploy", "budget", state)
    assert r.returncode == 0 and "before 2026-12-03" not in r.stdout
    r = fedrec("deploy", "budget", tmp_path / "nope")
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    from fedrec.client.budget import device_budget

    with pytest.raises(ValueError, match="none of privacy-budget.json"):
        device_budget(tmp_path, 1e-4)
    (state / "user-level-budget.json").write_text("{")
    r = fedrec("deploy", "budget", state)
    assert r.returncode == 2 and "unreadable" in r.stderr and "Traceback" not in r.stderr


def test_bad_input_found_by_an_outside_review_fails_early_and_clearly(
    tmp_path, monkeypatch, synth_dir, tiny_backbone
):
    """Each of these started Flower, printed a traceback, deleted a user's folder or wrote a key
    outside the deployment folder (a review that tried the CLI with bad input); now each is a
    one-line error, exit 2, before anything is written or started."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.simulations import launch

    started, real_simulate = [], launch.simulate
    monkeypatch.setattr(launch, "simulate", lambda *a, **k: started.append(a) or {})
    r = CliRunner()

    def fails(args, *words):
        res = r.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output
        for w in words:
            assert w in " ".join(res.output.split()), (args, w, res.output)
        return res

    out = str(tmp_path / "run")
    fails(["simulate", "--out", out, "--set", "max-length=300000"], "max-length", "8..512")
    fails(["simulate", "--out", out, "--set", "seed=99999999999999999999"], "seed")
    fails(["simulate", "--out", out, "--preset", ""], "is not a preset")
    fails(["simulate", "--out", out, "--preset", "../presets/quick"], "is not a preset")
    # one key however it is spelled: the last --set wins, a --set beats a --config file
    fails(["simulate", "--out", out, "--set", "num_rounds=5", "--set", "num-rounds=0"],
          "num-rounds")  # fmt: skip
    conf = tmp_path / "c.toml"
    conf.write_text("num_rounds = 0\n")
    cfg, _ = launch.resolve(conf, {"num-rounds": "5"}, preset="quick")
    assert cfg.num_rounds == 5
    both = tmp_path / "both.toml"
    both.write_text("num_rounds = 2\nnum-rounds = 3\n")
    fails(["simulate", "--out", out, "--config", str(both)],
          "set twice (as num_rounds and num-rounds)")  # fmt: skip
    # an error text is printed as it is, not as markup (it lost "[tool.flwr.app.config]")
    nested = tmp_path / "nested.toml"
    nested.write_text("[a]\nb = 1\n")
    fails(["simulate", "--out", out, "--config", str(nested)], "[tool.flwr.app.config]")
    assert not started and not (tmp_path / "run").exists()
    # a backbone that is not there: refused before Flower starts
    from fedrec.shared.federation.config import FedConfig

    with pytest.raises(FileNotFoundError, match="no config.json"):
        real_simulate(FedConfig(backbone=str(tmp_path / "nope")), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()
    # more replies a round than the run has clients: Flower waited for nodes forever
    one_silo = FedConfig(
        data=str(synth_dir), partition="silo", silos=1, backbone=str(tiny_backbone)
    )
    with pytest.raises(ValueError, match=r"'min-replies' is 2, but this run has only 1 client"):
        real_simulate(one_silo, tmp_path / "run3")
    assert not (tmp_path / "run3").exists()
    # data synth never replaces a folder that is not a data folder
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep")
    fails(["data", "synth", str(precious)], "not a fedrec data folder")
    assert (precious / "thesis.txt").read_text() == "keep"
    # deploy: node names are file names inside the folder, once each
    d = tmp_path / "d"
    fails(["deploy", "init", str(d), "--nodes", "a,a"], "more than once")
    fails(["deploy", "init", str(d), "--nodes", "ca"], "not usable")
    fails(["deploy", "init", str(d), "--nodes", "CA"], "not usable")  # ca.key on macOS
    fails(["deploy", "init", str(d), "--nodes", "n0,N0"], "more than once")
    fails(["deploy", "init", str(d), "--nodes", "a", "--superlink", "h:99999"], "1..65535")
    fails(["deploy", "init", str(d), "--nodes", "a", "--superlink", "h:\uff18000"], "1..65535")
    # host names go into the certificate: valid names only, IPv6 in brackets, nothing written
    for link, word in ((f"{'h' * 300}:8000", "253 in all"), ("a b:8000", "not an IP address"),
                       ("::1:8000", "in brackets"), ("[h]:8000", "not an IP address")):  # fmt: skip
        fails(["deploy", "init", str(d), "--nodes", "a", "--superlink", link], word)
    fails(["deploy", "init", str(d), "--nodes", "a", "--host", "bad host!"], "--host")
    assert not d.exists()
    from fedrec.server.deploy import check_host

    assert check_host("[::1]", "x") == "::1" and check_host("edge-1.example.org", "x")
    assert not d.exists()
    # an IPv6 SuperLink: the SuperLink binds the bare address (uvicorn cannot resolve
    # "[::1]"), the SuperNodes dial the bracketed HOST:PORT
    v6 = tmp_path / "v6"
    assert r.invoke(app, ["deploy", "init", str(v6), "--nodes", "a", "--superlink",
                          "[::1]:8000"]).exit_code == 0  # fmt: skip
    script = (v6 / "commands.sh").read_text()
    assert "--host ::1 --port 8000" in script and "--superlink '[::1]:8000'" in script
    fails(["deploy", "init", str(conf), "--nodes", "a"], "is a file")
    fails(["deploy", "init", str(conf / "sub"), "--nodes", "a"], "is a file")
    assert r.invoke(app, ["deploy", "init", str(d), "--nodes", "a"]).exit_code == 0
    for name in ("../evil", "", "sub/x", ".hidden"):
        fails(["deploy", "add-node", str(d), name], "not usable")
    fails(["deploy", "add-node", str(d), "A"], "ignore case")  # a.key exists (macOS: A.key)
    added = r.invoke(app, ["deploy", "add-node", str(d), "b"])
    assert added.exit_code == 0 and "--superlink 127.0.0.1:8000" in added.output, added.output
    assert not (tmp_path / "evil.key").exists() and not (d / ".key").exists()


def test_a_missing_backbone_or_suite_folder_is_a_clear_error(tmp_path):
    """`baselines --backbone` that is not there fails before the data is loaded; `suite
    --report-only` on a folder that is not there says to run the suite first (both were
    tracebacks)."""
    from typer.testing import CliRunner

    from fedrec.cli import app

    r = CliRunner()
    res = r.invoke(app, ["baselines", "--protocol", "A", "--out", str(tmp_path / "b"),
                         "--only", "zeroshot", "--backbone", str(tmp_path / "nope")])  # fmt: skip
    assert res.exit_code == 2 and "no config.json" in res.output, res.output
    res = r.invoke(app, ["audit", str(tmp_path), "--canaries", "5", "--set", "dp=false"])
    assert res.exit_code == 2 and "only apply with --empirical" in res.output, res.output
    res = r.invoke(app, ["suite", "quick", "--out", str(tmp_path / "s"), "--report-only"])
    assert res.exit_code == 2 and "run `fedrec suite quick" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_a_run_started_before_a_new_setting_existed_can_be_resumed(tmp_path):
    """A run's config.json from an older fedrec lacks the keys added since (e.g.
    server-lr-final): they take their defaults, so resuming it with its own settings works;
    a setting that really differs is still refused."""
    import torch

    from fedrec.server.app import check_run_dir, save_checkpoint
    from fedrec.shared.federation.config import FedConfig

    run = tmp_path / "run"
    save_checkpoint(run, 2, {"w": torch.zeros(1)}, {})
    cfg = FedConfig(num_rounds=5)
    old = cfg.as_dict()
    del old["server_lr_final"]
    (run / "config.json").write_text(json.dumps({"federation": old}))
    check_run_dir(run, cfg, True)  # no error
    with pytest.raises(ValueError, match="differs from this run's settings"):
        check_run_dir(run, FedConfig(num_rounds=6), True)
    (run / "config.json").write_text(json.dumps({"federation": {**old, "from_the_future": 1}}))
    with pytest.raises(ValueError, match="differs from this run's settings"):
        check_run_dir(run, cfg, True)


def test_more_bad_input_from_the_review_is_named_before_anything_starts(tmp_path, monkeypatch):
    """A Ray address that is not one, an --out under a file, and a setting that has no effect
    (a one-line warning, not Python's warning format): each is said before Flower starts."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.simulations import launch

    for good in ("auto", "10.0.0.5:6379", "head.example:6379", "ray://h:10001", "[::1]:6379"):
        launch.check_ray_address(good)
    for bad in ("", "host", "host:0", "host:70000", ":6379", "a b:1", "h:6379/x", "h:６"):
        with pytest.raises(ValueError, match="--ray-address"):
            launch.check_ray_address(bad)
    started = []
    monkeypatch.setattr(launch, "simulate", lambda *a, **k: started.append(a) or {})
    r = CliRunner()
    out = str(tmp_path / "run")
    res = r.invoke(app, ["simulate", "--out", out, "--ray-address", "localhost"])
    assert res.exit_code == 2 and "HOST:PORT" in res.output and not started, res.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = r.invoke(app, ["simulate", "--out", str(afile / "run")])
    assert res.exit_code == 2 and "is a file" in " ".join(res.output.split()), res.output
    assert "permissions" not in res.output and not started
    # the real command: a setting ignored by the others is one "warning:" line
    res = fedrec("simulate", "--out", tmp_path / "r2", "--preset", "quick", "--set", "silos=3",
                 "--set", f"backbone={tmp_path / 'nope'}")  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "warning: run config 'silos' is ignored: partition=user" in res.stderr
    assert "UserWarning" not in res.stderr and "SettingWarning" not in res.stderr


def test_an_out_folder_holding_a_users_files_is_never_written(tmp_path, monkeypatch):
    """--out on a folder fedrec did not write (no config.json) that holds files, including the
    current folder via `--out ''` (an unset $RUN), and `suite --report-only` on a folder without
    this suite's runs: refused before anything is written (both replaced a user's files)."""
    from typer.testing import CliRunner

    from fedrec.cli import app

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("my numbers")
    (mine / "notes.txt").write_text("keep")
    r = CliRunner()
    for args in (["baselines", "--protocol", "A", "--out", str(mine)],
                 ["train-central", "--protocol", "A", "--out", str(mine)],
                 ["simulate", "--out", str(mine)]):  # fmt: skip
        res = r.invoke(app, args)
        assert res.exit_code == 2 and "fedrec did not write" in res.output, (args, res.output)
    monkeypatch.chdir(mine)
    res = r.invoke(app, ["baselines", "--protocol", "A", "--out", ""])
    assert res.exit_code == 2 and "metrics.json, notes.txt" in res.output, res.output
    (mine / "report.md").write_text("my report")
    res = r.invoke(app, ["suite", "quick", "--out", str(mine), "--report-only"])
    assert res.exit_code == 2 and "not a folder of this suite's runs" in res.output, res.output
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json", "notes.txt", "report.md"]
    assert (mine / "metrics.json").read_text() == "my numbers"
    assert (mine / "report.md").read_text() == "my report"
    # a folder a run that failed early left (its log, no config.json yet) is still usable
    early = tmp_path / "early"
    early.mkdir()
    (early / "flower.log").write_text("")
    started = []
    from fedrec.simulations import launch

    monkeypatch.setattr(launch, "simulate", lambda *a, **k: started.append(a) or {})
    r.invoke(app, ["simulate", "--out", str(early)])
    assert started
    # ... and what an interrupted train-central leaves (its model, before its config.json)
    (early / "adapter").mkdir()
    (early / "model").mkdir()
    (early / ".config.json.123.tmp").write_text("")
    r.invoke(app, ["simulate", "--out", str(early)])
    assert len(started) == 2
    # a suite run never writes its report over a folder of a user's files
    res = r.invoke(app, ["suite", "quick", "--out", str(mine), "--only", "A-baselines"])
    assert res.exit_code == 2 and "no runs/ of a suite" in res.output, res.output
    assert (mine / "report.md").read_text() == "my report"


def test_split_data_fetch_and_backbone_errors_are_one_line_and_write_nothing(synth_dir, tmp_path):
    """split-data into a folder where one device folder exists, or under a file: nothing is
    written (it wrote device-0 and device-1 first); a bad --from file for data fetch, and a
    missing backbone for train-central: one line, no traceback."""
    from typer.testing import CliRunner

    from fedrec.cli import app

    r = CliRunner()
    out = tmp_path / "split"
    (out / "device-2").mkdir(parents=True)
    res = r.invoke(app, ["deploy", "split-data", str(synth_dir), str(out), "--devices", "3"])
    assert res.exit_code == 2 and "nothing was written" in " ".join(res.output.split())
    assert sorted(p.name for p in out.iterdir()) == ["device-2"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target in (afile, afile / "sub"):
        res = r.invoke(app, ["deploy", "split-data", str(synth_dir), str(target)])
        assert res.exit_code == 2 and "is a file" in res.output, res.output
    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    res = r.invoke(app, ["data", "fetch", "ml-100k", "--data-dir", str(tmp_path / "dd"),
                         "--from", str(bad)])  # fmt: skip
    assert res.exit_code == 1 and "--from" in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    nope = f"backbone={tmp_path / 'nope'}"
    res = r.invoke(app, ["train-central", "--protocol", "A", "--data", str(synth_dir), "--out",
                         str(tmp_path / "tc"), "--set", nope])  # fmt: skip
    assert res.exit_code == 2 and "no config.json" in res.output, res.output


def test_blank_or_odd_arguments_are_named(tmp_path, synth_dir):
    """A blank --only, a negative seed, a name too long for the file system, a blank or
    non-UTF-8 query: one line naming the option (tracebacks or internal names before)."""
    from typer.testing import CliRunner

    from fedrec.cli import app

    r = CliRunner()
    res = r.invoke(app, ["baselines", "--out", str(tmp_path / "b"), "--only", ","])
    assert res.exit_code == 2 and "no baseline named" in res.output, res.output
    res = r.invoke(app, ["data", "synth", str(tmp_path / "s"), "--seed", "-1"])
    assert res.exit_code == 2 and "--seed -1" in res.output, res.output
    long = str(tmp_path / ("a" * 300))
    res = r.invoke(app, ["data", "synth", long])
    assert res.exit_code == 2 and "cannot write" in res.output and res.exception is not None
    assert isinstance(res.exception, SystemExit), res.output
    res = r.invoke(app, ["data", "validate", long])
    assert res.exit_code == 1 and "cannot be read" in res.output, res.output
    for query, word in (("   ", "is blank"), ("caf\udcc3", "not valid UTF-8")):
        res = r.invoke(app, ["recommend", str(tmp_path), "--query", query])
        assert res.exit_code == 2 and word in res.output, (query, res.output)


def test_data_that_is_empty_a_file_or_a_tiny_catalog(tmp_path):
    """An empty data value is not the current folder, a file is named as a file, a missing
    absolute path names the data home (it named the path's parent), and `data synth` with 4
    items writes a valid folder (it failed on an internal parameter)."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.shared.federation.data_and_model import resolve_data_dir

    with pytest.raises(FileNotFoundError, match="data is empty"):
        resolve_data_dir("")
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        resolve_data_dir(str(afile))
    with pytest.raises(FileNotFoundError, match="no such folder") as info:
        resolve_data_dir(str(tmp_path / "nowhere"))
    assert f"name in {tmp_path}." not in str(info.value)
    # a stray file named like the data set in the current folder does not hide the data home
    home, here = tmp_path / "home", tmp_path / "here"
    (home / "ml-100k").mkdir(parents=True)
    here.mkdir()
    (here / "ml-100k").write_text("not a folder\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        mp.setenv("FEDREC_DATA", str(home))
        assert resolve_data_dir("ml-100k") == home / "ml-100k"
        mp.setenv("FEDREC_DATA", str(tmp_path / "empty-home"))
        with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
            resolve_data_dir("ml-100k")
    r = CliRunner()
    out = tmp_path / "run"
    for data, needle in (("", "--data is empty"), (str(afile), "is a file")):
        res = r.invoke(app, ["train-central", "--protocol", "A", "--data", data, "--out", str(out)])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert not out.exists()
    tiny = tmp_path / "tiny"
    res = r.invoke(app, ["data", "synth", str(tiny), "--items", "4", "--users", "3"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["data", "validate", str(tiny)])
    assert res.exit_code == 0, res.output
