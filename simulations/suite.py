"""``fedrec suite``: run a named experiment suite and write a results folder with a report.

A suite is a TOML file (``simulations/suites/<name>.toml``, or any path) listing experiments.
Each experiment is one fedrec command, run in its own process so that every run starts clean
(its own Ray instance, its own memory):

- ``kind = "baselines"``: ``fedrec baselines --protocol P`` (popularity, item-kNN, ALS, BPR,
  zero-shot text; tuned on protocol A's validation queries, never on test);
- ``kind = "central"``: ``fedrec train-central --protocol P`` (no federation, no DP: the
  reference upper bound);
- ``kind = "simulate"``: ``fedrec simulate`` with the suite's ``[simulate]`` settings, then the
  experiment's own ``set`` (a Flower simulation with local DP-SGD, user-level DP, or none);
- ``kind = "bench"``: ``python -m fedrec.simulations.<module>`` writing ``bench.json``.

Layout of ``OUT``: ``runs/<experiment>/`` (each command's run directory and ``log.txt``),
``runs/<experiment>/suite.json`` (command, exit code, wall time: written last, so an experiment
with it is complete), ``report.md``, ``summary.json`` and the plots
(``privacy_utility.png``, ``rounds.png``, ``epsilon.png``, ``cold_start.png``,
``scaling.png``). Running the same suite into the same ``OUT`` again skips complete
experiments (resume after an interruption); ``--only`` runs a subset; ``--report-only``
rebuilds the report from what is there. All experiments of a suite use the same data and
seed, so they share one split: the baselines' rows and fedrec's rows are comparable.

Every number in the report is read from the run directories' ``metrics.json`` and
``bench.json``; nothing is typed in by hand.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.shared.rundir import write_json

SUITES = Path(__file__).parent / "suites"
KINDS = ("baselines", "central", "simulate", "bench")


@dataclass
class Experiment:
    name: str
    kind: str
    protocol: str = "A"
    label: str = ""
    sets: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    module: str = ""


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    data: str
    simulate: dict[str, Any]
    experiments: list[Experiment]
    baselines: str = "all"


def _bad(path: Path, msg: str) -> ValueError:
    return ValueError(f"suite {path}: {msg}")


def load_suite(name: str) -> Suite:
    """A suite by name (``simulations/suites/NAME.toml``) or by path; validated completely."""
    path = Path(name)
    if not path.suffix:
        path = SUITES / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES.glob("*.toml"))
        raise ValueError(f"no suite {name!r}: not a file, and not one of {known}")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise _bad(path, f"not valid TOML ({e})") from None
    head = doc.get("suite", {})
    exps: list[Experiment] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc.get("experiment", [])):
        where = f"[[experiment]] #{i + 1}"
        unknown = set(raw) - {"name", "kind", "protocol", "label", "set", "args", "module"}
        if unknown:
            raise _bad(path, f"{where}: unknown key(s) {sorted(unknown)}")
        name_ = str(raw.get("name", ""))
        if not name_ or not name_.replace("-", "").replace("_", "").isalnum():
            raise _bad(path, f"{where}: 'name' must be letters, digits, '-' or '_'")
        if name_ in seen:
            raise _bad(path, f"{where}: duplicate name {name_!r}")
        seen.add(name_)
        kind = raw.get("kind")
        if kind not in KINDS:
            raise _bad(path, f"{where} ({name_}): kind {kind!r} is not one of {KINDS}")
        if raw.get("protocol", "A") not in ("A", "B", "C"):
            raise _bad(path, f"{where} ({name_}): protocol must be A, B or C")
        if kind == "bench" and not raw.get("module"):
            raise _bad(path, f"{where} ({name_}): a bench needs 'module'")
        exps.append(
            Experiment(
                name=name_,
                kind=kind,
                protocol=raw.get("protocol", "A"),
                label=raw.get("label", name_),
                sets=dict(raw.get("set", {})),
                args=[str(a) for a in raw.get("args", [])],
                module=str(raw.get("module", "")),
            )
        )
    if not exps:
        raise _bad(path, "no [[experiment]] entries")
    suite = Suite(
        name=str(head.get("name", path.stem)),
        path=path,
        description=str(head.get("description", "")),
        data=str(head.get("data", "ml-100k")),
        simulate=dict(doc.get("simulate", {})),
        experiments=exps,
        baselines=str(head.get("baselines", "all")),
    )
    _check_simulate_configs(suite)
    return suite


def _check_simulate_configs(suite: Suite) -> None:
    """Every simulate experiment's settings must parse before anything runs."""
    import warnings

    from fedrec.shared.federation.config import parse_run_config

    for e in suite.experiments:
        if e.kind != "simulate":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                parse_run_config(sim_settings(suite, e), where=f"{suite.path} ({e.name})")
            except ValueError as err:
                raise ValueError(str(err)) from None


def sim_settings(suite: Suite, e: Experiment) -> dict[str, Any]:
    """The suite's [simulate] defaults under the experiment's own settings. A suite-wide
    ``silos`` is dropped for a one-user-per-client experiment (it does not apply there, and every
    client would warn that it is ignored); an experiment that sets both keeps both."""
    s = {"data": suite.data, "protocol": e.protocol, **suite.simulate, **e.sets}
    if s.get("partition") == "user" and "silos" not in e.sets:
        s.pop("silos", None)
    return s


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def command(suite: Suite, e: Experiment, run: Path) -> list[str]:
    """The exact command an experiment runs (also written to its ``suite.json``)."""
    fedrec = [sys.executable, "-m", "fedrec"]
    if e.kind == "baselines":
        only = [] if suite.baselines == "all" else ["--only", suite.baselines]
        return [*fedrec, "baselines", "--protocol", e.protocol, "--data", suite.data,
                "--out", str(run), *only, *e.args]  # fmt: skip
    if e.kind == "central":
        sets = [x for k, v in e.sets.items() for x in ("--set", f"{k}={_fmt(v)}")]
        return [*fedrec, "train-central", "--protocol", e.protocol, "--data", suite.data,
                "--out", str(run), "--no-baselines", *sets, *e.args]  # fmt: skip
    if e.kind == "simulate":
        s = sim_settings(suite, e)
        sets = [x for k, v in s.items() for x in ("--set", f"{k}={_fmt(v)}")]
        # a suite's settings sit on the run-config defaults (`cross-device`), not on the
        # CLI's default preset, unless the experiment names a preset itself
        base = [] if any(a in ("--preset", "--quick") for a in e.args) else [
            "--preset", "cross-device"
        ]  # fmt: skip
        return [*fedrec, "simulate", "--out", str(run), "--baselines", "none", *base, *sets,
                *e.args]  # fmt: skip
    args = [a.replace("{runs}", str(run.parent)) for a in e.args]
    return [sys.executable, "-m", f"fedrec.simulations.{e.module}", *args, "--out",
            str(run / "bench.json")]  # fmt: skip


def run_suite(
    suite: Suite, out: Path, *, only: list[str] | None = None, log=print
) -> dict[str, Any]:
    """Run every (selected) experiment that is not complete yet; then write the report."""
    names = [e.name for e in suite.experiments]
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise ValueError(f"--only: unknown experiment(s) {bad}; the suite has {names}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for e in suite.experiments:
        if only and e.name not in only:
            continue
        run = out / "runs" / e.name
        if (run / "suite.json").is_file():
            log(f"[skip] {e.name}: complete ({run / 'suite.json'})")
            continue
        if run.exists():  # an interrupted attempt: start that experiment again from scratch
            import shutil

            shutil.rmtree(run)
        run.mkdir(parents=True)
        cmd = command(suite, e, run)
        log(f"[run ] {e.name}: {shlex.join(cmd[2:] if cmd[1] == '-m' else cmd)}")
        start = time.perf_counter()
        with open(run / "log.txt", "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env())
        seconds = time.perf_counter() - start
        record = {"experiment": e.name, "kind": e.kind, "command": shlex.join(cmd),
                  "returncode": rc, "seconds": round(seconds, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
        if rc == 0:
            write_json(run / "suite.json", record)  # the completion marker: atomic
            log(f"[done] {e.name}: {seconds / 60:.1f} min")
        else:
            write_json(run / "failed.json", record)
            log(f"[FAIL] {e.name}: exit {rc} after {seconds / 60:.1f} min; see {run / 'log.txt'}")
    log(f"suite {suite.name}: {(time.perf_counter() - t0) / 60:.1f} min this invocation")
    from fedrec.simulations.suite_report import write_report

    return write_report(suite, out)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def machine() -> dict[str, Any]:
    from fedrec.shared.rundir import versions

    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "versions": versions(),
    }
