"""``fedrec simulate``: fedrec's ServerApp and ClientApp in Flower's simulation runtime.

Example: ``fedrec simulate --quick --out runs/quick`` (minutes), or
``fedrec simulate --set num-rounds=40 --set epsilon=8 --out runs/a-eps8``.

One user per client by default (943 virtual SuperNodes on ML-100K), or ``partition=silo`` with
``silos=K``. Clients run in Ray actors (one per CPU core); each actor loads the backbone and the
catalog cache once and serves many virtual clients.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig, parse_run_config

# A smoke run: under 3 minutes on 2 cores; far too short to learn (see README).
QUICK: dict[str, Any] = {
    "num-rounds": 2,
    "fraction-train": 0.03,
    "local-steps": 4,
    "evaluate-every": 2,
    "fraction-evaluate": 0.0,
}


def load_config_file(path: Path) -> dict[str, Any]:
    """A TOML file with the run-config keys at top level or under ``[tool.flwr.app.config]``."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read it as TOML ({err})") from None
    return data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)


def resolve(config: Path | None, sets: dict[str, str], quick: bool) -> tuple[FedConfig, dict]:
    """Defaults < ``--quick`` < ``--config`` file < ``--set``; server keys split off."""
    raw: dict[str, Any] = dict(QUICK) if quick else {}
    if config is not None:
        raw.update(load_config_file(config))
    raw.update(sets)
    server = {k: raw.pop(k) for k in ("resume", "baselines") if k in raw}
    return parse_run_config(raw), server


def n_clients(cfg: FedConfig) -> int:
    from fedrec.client.runtime import dataset_and_split, resolve_data_dir
    from fedrec.shared.partition import partition_users

    _, split = dataset_and_split(resolve_data_dir(cfg.data), cfg.protocol, cfg.seed)
    return len(partition_users(split, scheme=cfg.partition, n_silos=cfg.silos, seed=cfg.seed))


def simulate(
    cfg: FedConfig,
    out: Path,
    *,
    resume: bool = False,
    baselines: str = "popularity,itemknn",
    num_cpus: int | None = None,
    ray_address: str | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the federation in Flower's simulation runtime; returns metrics.json's content.

    ``ray_address`` (e.g. ``"auto"`` or ``"10.0.0.5:6379"``) joins an existing Ray cluster
    (started with ``ray start --head`` / ``ray start --address=...``) instead of starting a
    local one: Flower's Ray backend then places one client actor per CPU of the whole cluster.
    Every node needs fedrec installed and the data at the same ``FEDREC_DATA`` path; the run
    directory is written by this (driver) process only."""
    import json
    import os

    from flwr.simulation import run_simulation

    from fedrec.client.app import app as client_app
    from fedrec.server.app import make_server_app

    cpus = num_cpus or os.cpu_count() or 1
    n = n_clients(cfg)
    server_app = make_server_app(
        cfg, run_dir=out, resume=resume, baselines=baselines, on_round=on_round
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Flower's in-memory simulation runtime polls every virtual node's inbox every 0.1 s in
    # this (driver) process; with hundreds of nodes that loop keeps a core busy. Ray runs the
    # client actors at nice 15: without this the driver's polling would starve them.
    os.nice(max(0, 15 - os.nice(0)))
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "error",
        "log_to_driver": True,
    }
    if ray_address:
        init_args["address"] = ray_address  # the cluster's resources, not this machine's
    else:
        init_args |= {"num_cpus": cpus, "num_gpus": 0}
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": init_args,
        },
    )
    metrics = out / "metrics.json"
    if not metrics.is_file():
        raise RuntimeError(
            f"the simulation ended without writing {metrics}: see the Flower log above"
        )
    return json.loads(metrics.read_text())
