"""``fedrec simulate``: fedrec's ServerApp and ClientApp in Flower's simulation runtime, run
with ``flwr run`` on a private local SuperLink (see :func:`simulate`). A launcher of both sides,
so it lives with the simulations, not in ``server/`` (the ServerApp) or ``client/``.

Example: ``fedrec simulate --quick --out runs/quick`` (minutes), or
``fedrec simulate --set num-rounds=40 --set epsilon=8 --out runs/a-eps8``.

One user per client by default (943 virtual SuperNodes on ML-100K), or ``partition=silo`` with
``silos=K``. Clients run in Ray actors (one per CPU core); each actor loads the backbone and the
catalog cache once and serves many virtual clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig, parse_run_config

# Named configurations (`fedrec simulate --preset NAME`): TOML files of run-config keys shipped
# with the package, each opening with comment lines that say what it trains and under which
# guarantee. `--quick` is `--preset quick`.
PRESETS = Path(__file__).parent / "presets"


# What `fedrec simulate` runs without --preset/--quick: one user per device, user-level DP with
# secure aggregation (the mode that beats popularity with no trusted server). The run-config
# defaults themselves (FedConfig, `flwr run`) are the `cross-device` preset.
DEFAULT_PRESET = "secure"


def presets() -> dict[str, str]:
    """Preset name -> its one-paragraph description (the file's leading comment lines)."""
    out = {}
    for path in sorted(PRESETS.glob("*.toml")):
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("# ").rstrip())
        out[path.stem] = " ".join(lines)
    return out


def preset_file(name: str) -> Path:
    if name not in presets():  # the presets folder's file names: "" or a path is none of them
        raise ValueError(
            f"--preset {name!r} is not a preset; choose one of {', '.join(presets())} "
            "(`fedrec simulate --list-presets` describes them)"
        )
    return PRESETS / f"{name}.toml"


def load_config_file(path: Path) -> dict[str, Any]:
    """A TOML file with the run-config keys at top level or under ``[tool.flwr.app.config]``."""
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read it as UTF-8 TOML ({err})") from None
    node: Any = data
    for key in ("tool", "flwr", "app", "config"):
        if key not in node:
            return _flat(path, data)
        node = node[key]
        if not isinstance(node, dict):
            raise ValueError(
                f"--config {path}: '{key}' is {type(node).__name__}, expected a table: write "
                "the keys at top level or under [tool.flwr.app.config]"
            )
    return _flat(path, node)


def _flat(path: Path, table: dict[str, Any]) -> dict[str, Any]:
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(
            f"--config {path}: {nested} are tables; run-config keys are flat (key = value), at "
            "top level or under [tool.flwr.app.config]"
        )
    # one key however it is spelled (num_rounds is num-rounds), so that a later layer
    # (--config over --preset, --set over both) overrides it whichever spelling each uses
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for k, v in table.items():
        kebab = k.replace("_", "-")
        if kebab in out:
            raise ValueError(
                f"--config {path}: '{kebab}' is set twice (as {spelled[kebab]} and {k}): keep one"
            )
        out[kebab], spelled[kebab] = v, k
    return out


def resolve(
    config: Path | None, sets: dict[str, str], quick: bool = False, preset: str | None = None
) -> tuple[FedConfig, dict]:
    """Defaults < ``--preset`` (``--quick``: preset ``quick``) < ``--config`` file < ``--set``;
    server keys split off."""
    if quick and preset not in (None, "quick"):
        raise ValueError(f"--quick is --preset quick: give one of --quick and --preset {preset}")
    name = "quick" if quick else preset
    raw: dict[str, Any] = load_config_file(preset_file(name)) if name is not None else {}
    if config is not None:
        raw.update(load_config_file(config))
    raw.update(sets)
    server = {k: raw.pop(k) for k in ("resume", "baselines") if k in raw}
    if "resume" in server:
        from fedrec.shared.settings import as_bool

        try:
            server["resume"] = as_bool(server["resume"])  # "false" is False, not bool("false")
        except (TypeError, ValueError):
            raise ValueError(
                f"run config: key 'resume' = {server['resume']!r} is not a valid bool "
                "(true or false)"
            ) from None
    return parse_run_config(raw), server


def n_clients(cfg: FedConfig) -> int:
    from fedrec.shared.federation.data_and_model import dataset_and_split, resolve_data_dir
    from fedrec.shared.partition import partition_users

    _, split = dataset_and_split(resolve_data_dir(cfg.data), cfg.protocol, cfg.seed)
    return len(partition_users(split, scheme=cfg.partition, n_silos=cfg.silos, seed=cfg.seed))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"run config: {value!r} is not a finite number")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def app_project(root: Path, run_config: dict[str, Any]) -> Path:
    """A minimal Flower app project for ``flwr run``: fedrec's installed ServerApp and
    ClientApp with this run's full config as its ``[tool.flwr.app.config]``.

    The components are imported from the installed ``fedrec`` package, so this works for an
    editable clone and for a wheel alike, and the FAB holds only this ``pyproject.toml``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fedrec")
    except PackageNotFoundError:
        ver = "0.0.0"
    lines = [
        "[project]",
        'name = "fedrec"',
        f'version = "{ver}"',
        'description = "fedrec federated recommender (written by fedrec simulate)"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedrec"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedrec.server.app:app"',
        'clientapp = "fedrec.client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in run_config.items()),
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


class _Progress:
    """Follows ``RUN/progress.jsonl`` (written by the ServerApp) from a byte offset."""

    def __init__(self, path: Path, on_round: Callable[[dict[str, Any]], None] | None) -> None:
        self.path, self.on_round = path, on_round
        self.offset = path.stat().st_size if path.is_file() else 0  # skip a resumed run's past

    def poll(self) -> None:
        if self.on_round is None or not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines
        self.offset += end
        for line in chunk[:end].splitlines():
            if line.strip():
                self.on_round(json.loads(line))


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id), from Linux ``/proc`` (empty elsewhere)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _tree(root: int, sessions: set[int]) -> set[int]:
    """``root``'s descendants, plus every process in a session one of them ever led or joined.

    Flower's SuperExec starts ``flwr-simulation`` in a new session, and Ray's agents outlive
    their parent: the sessions seen (``sessions``, updated in place) still find them once they
    are orphaned."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root] if root in procs else []
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo += children.get(pid, [])
        if pid in procs:
            sessions.add(procs[pid][1])
    sessions -= {0, 1, os.getsid(0)}  # never the kernel's, init's or this process's session
    found |= {pid for pid, (_, sid) in procs.items() if sid in sessions}
    return {pid for pid in found if pid > 1 and pid != os.getpid()}


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        if pid <= 1:  # os.kill(-1 or 0, ...) would signal every process or this group
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop the SuperLink and everything started under it (SuperExec, ``flwr-simulation``,
    Ray's processes and actors): SIGTERM to all of them, SIGKILL to what is left after
    ``grace`` seconds."""
    sessions: set[int] = set()

    def left() -> set[int]:  # the SuperLink's pid only while it is not reaped (no reuse)
        return _tree(proc.pid if proc.poll() is None else 0, sessions)

    _signal_all(left(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (pids := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(pids, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def _term_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while the simulation runs, so that the SuperLink's process
    tree is stopped on the way out (as it is on Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check_ray_address(address: str) -> None:
    """``--ray-address`` must be ``auto`` or ``HOST:PORT`` (``ray://HOST:PORT`` for Ray Client),
    the port in 1..65535: a wrong one otherwise fails deep inside Ray, after the SuperLink
    started, with a message that does not name the option."""
    rest = address.removeprefix("ray://")
    if address == "auto":
        return
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 literal: [::1]:6379
    ok = bool(sep) and bool(host) and not any(c.isspace() or c in "/@" for c in host)
    if ok and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535:
        return
    raise ValueError(
        f"--ray-address {address!r} is not a Ray cluster address: give 'auto' (the cluster "
        "`ray start --head` started on this machine) or HOST:PORT of its head node, e.g. "
        "10.0.0.5:6379 (ray://HOST:PORT for Ray Client), the port in 1..65535"
    )


def start_local_superlink(
    home: Path, env: dict[str, str], bindir: Path, startup_timeout: float
) -> tuple[subprocess.Popen, int]:
    """A local SuperLink in simulation mode under ``home`` (insecure, 127.0.0.1, a free port,
    at nice 15), with a Flower home that names it as the default: ``env["FLWR_HOME"]`` is set
    for the ``flwr run`` that follows. Returns the process and its port once it listens;
    RuntimeError with the end of its log (and nothing left running) if it does not start."""
    env["FLWR_HOME"] = str(home / "flwr-home")
    port = _free_port()
    (home / "flwr-home").mkdir()
    (home / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "fedrec-sim"\n\n[superlink.fedrec-sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    link_log = home / "superlink.log"
    # this interpreter runs Flower's scripts: a copied venv's scripts may name another one
    nice = "import os, sys; os.nice(15); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    with link_log.open("ab") as f:
        link = subprocess.Popen(
            [
                sys.executable, "-c", nice, str(bindir / "flower-superlink"),
                "--insecure", "--simulation", "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port),
            ],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=home,
            start_new_session=True,
        )  # fmt: skip
    try:  # stopped on any way out of here but success (a SIGTERM arrives as SystemExit)
        deadline = time.monotonic() + startup_timeout
        while "Uvicorn running" not in link_log.read_text(errors="replace"):
            if link.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "the local Flower SuperLink did not start"
                    + (f" (exit code {link.returncode})" if link.poll() is not None else "")
                    + f"; its log:\n{_tail(link_log)}"
                )
            time.sleep(0.2)
    except BaseException:
        _stop(link)
        raise
    return link, port


def simulate(
    cfg: FedConfig,
    out: Path,
    *,
    resume: bool = False,
    baselines: str = "popularity,itemknn",
    num_cpus: int | None = None,
    ray_address: str | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    startup_timeout: float = 120.0,
) -> dict[str, Any]:
    """Run the federation with ``flwr run`` on a private local SuperLink in simulation mode;
    returns metrics.json's content.

    Steps: a SuperLink (``flower-superlink --simulation``) on a free loopback port, with its
    own ``FLWR_HOME`` in a temporary folder and an in-memory state; ``flwr run`` submits
    fedrec's apps with this run's config and ``num-supernodes`` (one virtual SuperNode per
    client) and streams the run's log to ``RUN/flower.log``; the ServerApp appends one line
    per round to ``RUN/progress.jsonl``, which feeds ``on_round``; the SuperLink and
    everything under it (the ``flwr-simulation`` process, Ray) is stopped at the end, also
    on error or Ctrl-C. The SuperLink's process tree runs at nice 15, as Ray's client actors
    do: the simulation's inbox polling would otherwise starve the actors on a small machine.

    ``ray_address`` (e.g. ``"auto"`` or ``"10.0.0.5:6379"``) joins an existing Ray cluster
    (started with ``ray start --head`` / ``ray start --address=...``) instead of starting a
    local one: Flower's Ray backend then places one client actor per CPU of the whole cluster.
    Every node needs fedrec installed and the data at the same ``FEDREC_DATA`` path; the run
    directory is written by this machine's ServerApp only."""
    from fedrec.server.app import check_run_dir
    from fedrec.server.outputs import baseline_names
    from fedrec.shared.backbone import check_prior_backbone, resolve_backbone

    if ray_address is not None:
        check_ray_address(ray_address)
    out = out.resolve()
    resolve_backbone(cfg.backbone)  # a backbone that is not there fails here, not in Flower
    if cfg.cold_prior_backbone:
        check_prior_backbone(cfg.cold_prior_backbone)
    check_run_dir(out, cfg, resume)
    baseline_names(baselines)
    n = n_clients(cfg)
    if cfg.min_replies > n:  # Flower would wait for nodes that never come
        raise ValueError(
            f"run config 'min-replies' is {cfg.min_replies}, but this run has only {n} "
            f"client(s) ({cfg.partition} partition of {cfg.data}): no round could ever "
            f"aggregate. Set --set min-replies={n} or fewer"
            + (", or more silos" if cfg.partition == "silo" else "")
        )
    if cfg.secure_agg:  # refuse a cohort secure aggregation cannot use before Flower starts
        from fedrec.shared.privacy.distributed import check_cohort

        check_cohort(cfg, n)
    cpus = num_cpus or os.cpu_count() or 1
    bindir = Path(sys.executable).parent
    for tool in ("flower-superlink", "flwr"):
        if not (bindir / tool).is_file():
            raise FileNotFoundError(
                f"{bindir / tool} not found: fedrec simulate runs Flower's `flwr run` and "
                "`flower-superlink` from the Python environment fedrec is installed in; "
                "reinstall with `pip install -e .` (run.sh setup does it)"
            )
    run_config = {
        **cfg.to_flat(),
        "run-dir": str(out),
        "resume": resume,
        "baselines": baselines,
    }
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.json"
    before = _mtime(metrics)  # a resumed run's old metrics.json must not pass for a new one
    flower_log = out / "flower.log"
    if not resume:  # a run that stopped before its first round left lines of its own
        (out / "progress.jsonl").unlink(missing_ok=True)
    progress = _Progress(out / "progress.jsonl", on_round)
    sim = [
        f"num-supernodes={n}",
        "client-resources-num-cpus=1",
        "client-resources-num-gpus=0",
        "init-args-logging-level='error'",
        "init-args-log-to-driver=true",
    ]
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # Ray joins the cluster: its resources, not ours
    else:
        env.pop("RAY_ADDRESS", None)
        sim += [f"init-args-num-cpus={cpus}", "init-args-num-gpus=0"]
    with _term_as_exit(), tempfile.TemporaryDirectory(prefix="fedrec-flwr-") as tmp:
        home = Path(tmp)
        project = app_project(home / "app", run_config)
        link, port = start_local_superlink(home, env, bindir, startup_timeout)
        try:
            with flower_log.open("ab") as f:
                f.write(
                    f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: flwr run on the local "
                    f"SuperLink 127.0.0.1:{port} ({n} virtual SuperNodes), "
                    f"FLWR_HOME={env['FLWR_HOME']}\n".encode()
                )
                f.flush()
                run = subprocess.Popen(
                    [
                        sys.executable, str(bindir / "flwr"), "run", str(project), "fedrec-sim",
                        "--federation-config", " ".join(sim), "--stream",
                    ],
                    stdout=f, stderr=subprocess.STDOUT, env=env, cwd=home,
                )  # fmt: skip
                try:
                    while run.poll() is None:
                        progress.poll()
                        time.sleep(0.5)
                finally:
                    if run.poll() is None:
                        run.terminate()
                        run.wait(timeout=30)
            progress.poll()
        finally:
            _stop(link)
    if run.returncode != 0 or _mtime(metrics) in (None, before):
        raise RuntimeError(
            f"the simulation ended without writing {metrics}"
            f" (flwr run exit code {run.returncode}); the end of {flower_log}:\n"
            + _tail(flower_log)
        )
    return json.loads(metrics.read_text())
