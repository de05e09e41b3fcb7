"""Named configurations (`fedrec simulate --preset NAME`): each is what its description says."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.simulations.launch import load_config_file, preset_file, presets, resolve
from fedrec.simulations.suite import load_suite, sim_settings


def test_every_preset_parses_and_says_what_it_is():
    assert {"quick", "silos", "cross-device", "central-dp"} <= set(presets())
    for name, text in presets().items():
        assert len(text) > 80, f"preset {name}: its leading comment must describe it"
        parse_run_config(load_config_file(preset_file(name)))


def test_silos_is_the_full_suites_batch_experiment():
    """The silos preset reproduces the experiment whose result the docs report for it."""
    suite = load_suite("full")
    e = next(x for x in suite.experiments if x.name == "A-fed-eps8-batch")
    assert "A-fed-eps8-batch" in presets()["silos"]
    want = parse_run_config(sim_settings(suite, e))
    got, _ = resolve(None, {}, preset="silos")
    assert got == want


@pytest.mark.parametrize(
    ("preset", "experiment"),
    [("cross-device", "A-default"), ("secure", "A-secure"),
     ("silos-trusted-server", "A-fed-eps8-server")],
)  # fmt: skip
def test_presets_are_the_experiments_their_descriptions_cite(preset, experiment):
    suite = load_suite("full")
    e = next(x for x in suite.experiments if x.name == experiment)
    assert experiment in presets()[preset]
    assert resolve(None, {}, preset=preset)[0] == parse_run_config(sim_settings(suite, e))


def test_cross_device_is_the_defaults():
    assert resolve(None, {}, preset="cross-device")[0] == FedConfig()


def test_precedence_preset_then_config_then_set(tmp_path):
    (tmp_path / "c.toml").write_text("num-rounds = 7\nlr = 2.0\n")
    cfg, _ = resolve(tmp_path / "c.toml", {"lr": "3.0"}, preset="silos")
    assert (cfg.silos, cfg.num_rounds, cfg.lr) == (10, 7, 3.0)
    assert resolve(None, {}, quick=True)[0] == resolve(None, {}, preset="quick")[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--preset", "nope"], "is not a preset"), (["--quick", "--preset", "silos"], "--quick is"),
     ([], "--out RUN is required")],
)  # fmt: skip
def test_bad_preset_arguments_exit_2(tmp_path, args, message):
    out = [] if not args else ["--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, ["simulate", *out, *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_list_presets_names_them_all():
    r = CliRunner().invoke(app, ["simulate", "--list-presets"])
    assert r.exit_code == 0
    for name in presets():
        assert f"{name}:" in r.output


@pytest.mark.parametrize(
    ("preset", "run"), [("secure", "seed0"), ("central-dp", "central-dp-seed0")]
)
def test_secure_and_its_twin_are_the_committed_runs(preset, run):
    """`--preset secure` is the seed-0 run of simulations/results/secure-agg/runs/ (the other
    runs there differ in their seed only: the report checks that), and `--preset central-dp` its
    trusted-server twin: the same settings but secure aggregation."""
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / f"simulations/results/secure-agg/runs/{run}/config.json"
    ran = parse_run_config(json.loads(path.read_text())["federation"])
    assert resolve(None, {}, preset=preset)[0] == ran
    secure, twin = (resolve(None, {}, preset=p)[0] for p in ("secure", "central-dp"))
    assert secure.secure_agg and not twin.secure_agg
    assert dataclasses.replace(secure, secure_agg=False) == twin


def test_silos_secure_is_the_trusted_server_step_at_full_batch_without_the_trusted_server():
    """`--preset silos-secure` is `silos-trusted-server` with the noise moved into the secure
    sum: every example every round, the divisor for it, a projection radius the 32-bit modulus
    holds, and the same step otherwise."""
    secure = resolve(None, {}, preset="silos-secure")[0]
    trusted = resolve(None, {}, preset="silos-trusted-server")[0]
    assert secure.dp_noise == "secure" and secure.secure_agg and secure.sample_rate == 1.0
    same = dataclasses.replace(
        secure, dp_noise="server", secure_agg=False, sample_rate=0.1, batch_divisor=3017.6,
        update_norm_max=trusted.update_norm_max, physical_batch=trusted.physical_batch,
        round_timeout=trusted.round_timeout,
    )  # fmt: skip
    assert same == trusted
