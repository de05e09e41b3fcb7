"""Edge deployment with real processes on loopback: Flower's SuperLink and SuperNodes with TLS and
SuperNode authentication, fedrec's apps submitted with `flwr run`, tiny data and a tiny model.

Covers: two rounds of DP training over three authenticated SuperNodes (each with its own data
folder) write a global adapter and a ledger that `fedrec audit` verifies; a SuperNode with an
unregistered key is refused; a SuperNode killed mid-round does not stop the run; the restarted
SuperNode continues its privacy budget from its file instead of from zero; the device's model
cache serves `fedrec recommend` locally. Every process started here is killed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower CLI not installed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Processes started by the test, each in its own process group; all killed on close."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.procs = root, env, {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        p = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def wait_for(cond, timeout: float, what: str, procs: Procs | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.5)
    logs = ""
    if procs is not None:
        logs = "\n".join(f"--- {n}\n{procs.log(n)[-1500:]}" for n in procs.procs)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def deployment(tmp_path, synth_dir, tiny_backbone):
    from fedrec.server.deploy import device_folders, init_deployment

    port = free_port()
    creds, _ = init_deployment(
        tmp_path / "creds", nodes=["n0", "n1", "n2", "rogue"], superlink=f"127.0.0.1:{port}"
    )
    devices = device_folders(synth_dir, tmp_path / "devices", 3)
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "creds" / "flwr-home"),
        "PYTHONWARNINGS": "ignore",
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    procs = Procs(tmp_path, env)
    try:
        procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert),
                "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--database", str(tmp_path / "superlink.db"), "--host", "127.0.0.1",
                "--port", str(port),
            ],
        )  # fmt: skip
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "SuperLink", procs)
        for n in ("n0", "n1", "n2"):
            r = run([str(BIN / "flwr"), "supernode", "register", str(creds.node_keys[n][1])], env)
            assert r.returncode == 0 and "registered" in r.stdout, r.stdout + r.stderr

        def start_node(i: int) -> None:
            name = f"n{i}"
            procs.start(
                name,
                [
                    str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                    "--root-certificates", str(creds.ca_cert),
                    "--auth-supernode-private-key", str(creds.node_keys[name][0]),
                    # federation-clients: read only by per-interaction secure rounds, which
                    # need the owner's epsilon-max and delta-max too (the runs here are at the
                    # default delta, 1e-5, and below epsilon 8)
                    "--node-config",
                    f"data-dir='{devices[i]}' client-id='{name}' federation-clients=3 "
                    "delta-max=1e-5 epsilon-max=8",
                    "--port", str(free_port()),
                ],
            )  # fmt: skip

        for i in range(3):
            start_node(i)

        def online() -> int:
            r = run([str(BIN / "flwr"), "supernode", "list", "--format", "json"], env)
            try:
                nodes = json.loads(r.stdout)["nodes"]
            except (json.JSONDecodeError, KeyError):
                return 0
            return sum(1 for x in nodes if x.get("status") == "online")

        wait_for(lambda: online() == 3, 90, "3 SuperNodes online", procs)
        yield {
            "env": env, "procs": procs, "creds": creds, "devices": devices, "port": port,
            "start_node": start_node, "online": online, "root": tmp_path,
        }  # fmt: skip
    finally:
        procs.close()


def flwr_run(
    d: dict, run_dir: Path, tiny_backbone: Path, synth_dir: Path, rounds: int, extra: str = ""
):
    base = (
        f"data='{synth_dir}' backbone='{tiny_backbone}' max-length=16 history-len=8 "
        f"num-rounds={rounds} fraction-train=1.0 min-replies=2 local-steps=2 sample-rate=0.5 "
        f"negatives=10 slots=6 epsilon=6.0 lr=0.5 evaluate-every=0 fraction-evaluate=1.0 "
        f"round-timeout=150 run-dir='{run_dir}' baselines='none'"
    )
    # `extra`'s keys replace the base's (Flower refuses a key given twice)
    pairs = dict(x.split("=", 1) for x in f"{base} {extra}".split())
    config = " ".join(f"{k}={v}" for k, v in pairs.items())
    args = [str(BIN / "flwr"), "run", str(REPO), "fedrec", "--run-config", config, "--stream"]
    return d["procs"].start(f"flwr-run-{run_dir.name}", args)


def ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "privacy" / "ledger.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [x for x in lines if "client" in x]  # not the server's notes on missing clients


@pytest.mark.slow  # real SuperLink and SuperNodes, several minutes
def test_deployment_on_loopback(deployment, tiny_backbone, synth_dir):
    d = deployment
    procs, env, root = d["procs"], d["env"], d["root"]

    # an unregistered key is refused by the SuperLink
    rogue = procs.start(
        "rogue",
        [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{d['port']}",
            "--root-certificates", str(d["creds"].ca_cert),
            "--auth-supernode-private-key", str(d["creds"].node_keys["rogue"][0]),
            "--node-config", f"data-dir='{d['devices'][0]}'", "--port", str(free_port()),
            "--max-retries", "1",
        ],
    )  # fmt: skip
    wait_for(lambda: rogue.poll() is not None, 90, "the rogue SuperNode to give up", procs)
    assert rogue.returncode != 0
    procs.kill("rogue")  # its SuperExec child, if any
    assert "No SuperNode found with the given public key" in procs.log("superlink")

    # run 1: two rounds; n2 is killed when round 2's message reaches it
    run1 = root / "run1"
    flwr_run(d, run1, tiny_backbone, synth_dir, rounds=2)
    wait_for(
        lambda: procs.log("n2").count("Receiving: train message") >= 2, 240, "round 2 at n2", procs
    )
    procs.kill("n2")
    wait_for(lambda: procs.procs["flwr-run-run1"].poll() is not None, 240, "run 1 to end", procs)
    assert (run1 / "adapter" / "adapter_model.safetensors").is_file(), procs.log("flwr-run-run1")
    lines = ledger(run1)
    by_round = {r: {x["client"] for x in lines if x["round"] == r} for r in (1, 2)}
    assert by_round[1] == {"n0", "n1", "n2"}
    assert {"n0", "n1"} <= by_round[2] and "n2" not in by_round[2]  # the round went on
    audit = run([str(BIN / "fedrec"), "audit", str(run1)], env)
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # the device's budget survived on disk; restarted, it continues from it
    budget = d["devices"][2] / "fedrec-state" / "privacy-budget.json"
    before = json.loads(budget.read_text())["history"]
    steps_before = sum(n for _s, _q, n in before)
    assert steps_before == 2  # round 1 only: killed before round 2 finished
    eps_before = next(x["epsilon_after"] for x in lines if x["client"] == "n2")
    d["start_node"](2)
    wait_for(lambda: d["online"]() == 3, 90, "n2 back online", procs)
    run2 = root / "run2"
    # the same noise as run 1 so that one more round fits n2's budget (with a sigma calibrated
    # afresh for a 1-round run it would, correctly, refuse: its budget is partly spent)
    sigma = next(x["noise_multiplier"] for x in lines if x["client"] == "n2")
    flwr_run(d, run2, tiny_backbone, synth_dir, rounds=1, extra=f"noise-multiplier={sigma!r}")
    wait_for(lambda: procs.procs["flwr-run-run2"].poll() is not None, 240, "run 2 to end", procs)
    (n2,) = [x for x in ledger(run2) if x["client"] == "n2"]
    assert n2["trained"] and n2["steps"] == 2
    assert n2["total_steps"] == steps_before + n2["steps"]
    assert n2["epsilon_after"] > eps_before
    audit = run([str(BIN / "fedrec"), "audit", str(run2), "--json"], env)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr
    assert json.loads(audit.stdout)["clients"]["n2"]["carried_steps"] == steps_before

    # on-device inference from the device's cache of the global model, no network
    cache = d["devices"][0] / "fedrec-state" / "model-cache"
    rec = run(
        [str(BIN / "fedrec"), "recommend", str(cache), "--history", "1,2,3", "-k", "5", "--json"],
        env,
    )
    assert rec.returncode == 0, rec.stderr
    assert len(json.loads(rec.stdout)) == 5


def test_deploy_cli_credentials_and_device_folders(tmp_path, synth_dir):
    """`fedrec deploy init/add-node/split-data`: files, modes, SANs, no overwrite, clear errors."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    fedrec = [str(BIN / "fedrec"), "deploy"]
    env = dict(os.environ)
    out = run([*fedrec, "init", str(tmp_path / "d"), "--nodes", "a,b", "--superlink",
               "10.1.2.3:8443", "--host", "fedrec.example"], env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--enable-supernode-auth" in out.stdout and "flwr supernode register" in out.stdout
    d = tmp_path / "d"
    for key in ("ca.key", "server.key", "a.key", "b.key"):
        assert (d / key).stat().st_mode & 0o777 == 0o600, key
    cert = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(
        sans.get_values_for_type(x509.DNSName)
    )
    assert {"10.1.2.3", "127.0.0.1", "fedrec.example", "localhost"} <= names
    load_ssh_public_key((d / "a.pub").read_bytes())  # the format `flwr supernode register` reads
    assert '"10.1.2.3:8443"' in (d / "flwr-home" / "config.toml").read_text()
    again = run([*fedrec, "init", str(d), "--nodes", "a"], env)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert run([*fedrec, "add-node", str(d), "c"], env).returncode == 0
    assert (d / "c.key").is_file()
    bad = run([*fedrec, "init", str(tmp_path / "e"), "--nodes", "a", "--superlink", "nohost"], env)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    split = run(
        [*fedrec, "split-data", str(synth_dir), str(tmp_path / "dev"), "--devices", "3"], env
    )
    assert split.returncode == 0, split.stderr
    users = set()
    for i in range(3):
        folder = tmp_path / "dev" / f"device-{i}"
        assert (folder / "items.tsv").read_bytes() == (synth_dir / "items.tsv").read_bytes()
        rows = (folder / "interactions.tsv").read_text().splitlines()[1:]
        mine = {r.split("\t")[0] for r in rows}
        assert mine and not (mine & users)  # every device has its own users only
        users |= mine


@pytest.mark.slow  # real SuperLink and SuperNodes
def test_secure_aggregation_round_survives_a_killed_supernode(deployment, tiny_backbone, synth_dir):
    """A SecAgg+ round with distributed Skellam noise over TLS and node authentication: n2 is
    killed once its masked-input message reaches it (after it shared its keys), the server
    removes n2's pairwise masks from n0's and n1's shares and releases the survivors' sum; the
    run's privacy record and `fedrec audit` agree."""
    d = deployment
    procs, env, root = d["procs"], d["env"], d["root"]
    run_dir = root / "secure"
    flwr_run(
        d, run_dir, tiny_backbone, synth_dir, rounds=1,
        extra="dp=false user-dp=true user-clip=0.5 user-epsilon=6.0 secure-agg=true "
        "secagg-dropout=0.4 secagg-colluders=0.0",
    )  # fmt: skip
    wait_for(
        lambda: "Receiving: train.secagg_masked message" in procs.log("n2"),
        240,
        "the masked-input stage at n2",
        procs,
    )
    procs.kill("n2")
    name = f"flwr-run-{run_dir.name}"
    wait_for(lambda: procs.procs[name].poll() is not None, 300, "the secure run to end", procs)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file(), procs.log(name)
    (rec,) = [
        json.loads(x) for x in (run_dir / "privacy" / "secagg.jsonl").read_text().splitlines()
    ]
    assert rec["cohort"] == 3 and rec["shared"] == 3
    assert rec["released"] and rec["survivors"] == 2, rec
    u = json.loads((run_dir / "metrics.json").read_text())["privacy"]["user_level"]
    assert u["releases"] == 1 and u["epsilon"] <= 6.0
    for n in ("n0", "n1"):  # the devices trained and sent only masked vectors
        assert "Receiving: train.secagg_unmask message" in procs.log(n)
    audit = run([str(BIN / "fedrec"), "audit", str(run_dir), "--json"], env)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr
    assert json.loads(audit.stdout)["secure_aggregation"] is True
    # each surviving device recorded the round it sent a masked input in, and reads it back
    # (the fixture's devices are n0..n2 on device folders 0..2; earlier tests ran no secure round)
    for i in (0, 1):
        b = run([str(BIN / "fedrec"), "deploy", "budget", str(d["devices"][i]), "--json"], env)
        assert b.returncode == 0, b.stderr
        # the default delta is the run config's default, the one this run used
        assert json.loads(b.stdout)["user_level"]["delta"] == u["delta"]
        b = run(
            [str(BIN / "fedrec"), "deploy", "budget", str(d["devices"][i]), "--json",
             "--user-delta", repr(u["delta"])], env,
        )  # fmt: skip
        assert b.returncode == 0, b.stderr
        user = json.loads(b.stdout)["user_level"]
        # at the plan's a-priori noise (the minimum survivors): never below the run's analytic
        # bound, which counts the survivors the round had
        assert user["secure_rounds"] == 1
        assert user["per_cohort_rule_rounds"] == 0  # the entry names its colluder rule
        assert user["epsilon"] >= u["epsilon_analytic"] * (1 - 1e-9) > 0


@pytest.mark.slow  # real SuperLink and SuperNodes
def test_per_interaction_secure_rounds_on_devices_are_recorded_and_audited(
    deployment, tiny_backbone, synth_dir
):
    """Three devices as three silos under per-interaction DP without a trusted server
    (dp-noise=secure), over TLS and node authentication: two rounds released with every
    silo's noise share; each device recorded both rounds in its own
    interaction-secure-budget.json, whose epsilon (`fedrec deploy budget`) is at least the
    run's claim, and nothing in its local-DP history; `fedrec audit` passes. A second run
    whose rounds would take a device's record past its cap is refused by that device."""
    d = deployment
    procs, env, root = d["procs"], d["env"], d["root"]
    run_dir = root / "silo-secure"
    secure = (
        "partition='silo' silos=3 history-len=2 local-steps=1 sample-rate=1.0 "
        "examples='sequence' accountant='rdp' dp-noise='secure' secure-agg=true "
        "batch-divisor=50.0 update-norm-max=1.0 epsilon=8.0 min-replies=3"
    )
    flwr_run(d, run_dir, tiny_backbone, synth_dir, rounds=2, extra=secure)
    name = f"flwr-run-{run_dir.name}"
    wait_for(lambda: procs.procs[name].poll() is not None, 400, "the secure run to end", procs)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file(), procs.log(name)
    recs = [json.loads(x) for x in (run_dir / "privacy" / "secagg.jsonl").read_text().splitlines()]
    assert [r["released"] for r in recs] == [True, True], recs
    si = json.loads((run_dir / "metrics.json").read_text())["privacy"]["secure_interaction"]
    assert si["releases"] == 2 and si["epsilon"] <= 8.0
    audit = run([str(BIN / "fedrec"), "audit", str(run_dir), "--json"], env)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr
    for i in range(3):
        b = run([str(BIN / "fedrec"), "deploy", "budget", str(d["devices"][i]), "--json"], env)
        assert b.returncode == 0, b.stderr
        got = json.loads(b.stdout)
        assert got["secure_interaction"]["rounds"] == 2 and got["secure_interaction"]["runs"] == 1
        assert got["secure_interaction"]["epsilon"] >= si["epsilon"] * (1 - 1e-9)
        assert got["local_dp"]["steps"] == 0  # the Gaussian step is not the device's history
        assert got["local_dp"]["epsilon_max"] == 8.0  # the owner's cap, kept
    # the same run again: its two rounds would take every record past the cap of 8
    again = root / "silo-secure-2"
    flwr_run(d, again, tiny_backbone, synth_dir, rounds=2, extra=secure)
    name = f"flwr-run-{again.name}"
    wait_for(lambda: procs.procs[name].poll() is not None, 400, "the second run to end", procs)
    assert "per-interaction cap" in procs.log(name) or "per-interaction cap" in procs.log("n0")
    for i in range(3):
        b = run([str(BIN / "fedrec"), "deploy", "budget", str(d["devices"][i]), "--json"], env)
        got = json.loads(b.stdout)["secure_interaction"]
        assert got["runs"] == 1 and got["rounds"] == 2, got  # nothing recorded for run 2
