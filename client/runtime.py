"""What a client process keeps between rounds: its data, its examples, the model, its budget.

A Flower simulation runs many virtual clients in a few worker processes, and a SuperNode runs one
client for many rounds: loading the backbone and the catalog cache once per process (not once
per round) is what keeps a round cheap. Everything here is keyed by the settings it depends on.

Where a client's data comes from:

- ``node_config["data-dir"]`` (a device, see the README): a folder in the fedrec layout holding
  that device's own interactions and the public catalog; all its users are its data.
- otherwise (simulation): the run's data set, split by the protocol, partitioned by
  ``partition`` and ``silos``; ``node_config["partition-id"]`` picks this client's users.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.client.local_train import ClientExamples, build_examples
from fedrec.shared.backbone import load_backbone
from fedrec.shared.data import load_dataset
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.model.central import ProfileBank
from fedrec.shared.model.towers import RecModel
from fedrec.shared.partition import partition_users
from fedrec.shared.splitting import Split, make_split


def resolve_data_dir(data: str) -> Path:
    """``ml-100k`` (in the data home) or a folder in the fedrec layout."""
    from fedrec.shared.data.movielens import default_data_home

    path = Path(data)
    if path.is_dir():
        return path
    home = default_data_home() / data
    if home.is_dir():
        return home
    raise FileNotFoundError(
        f"data '{data}': no such folder and no data set of that name in {home.parent}. "
        "Run `fedrec data fetch ml-100k` or point 'data' at a folder in the fedrec layout."
    )


def catalog_digest(texts: list[str]) -> str:
    """A short fingerprint of the public catalog: server and clients must index it the same."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def warm_items(split: Split) -> np.ndarray:
    """Items the model may give a learned bias: the catalog minus the protocol's cold items.

    Public knowledge (the catalog and which items are new), never derived from interactions.
    """
    warm = np.ones(split.n_items, dtype=bool)
    if split.cold_items is not None:
        warm[split.cold_items] = False
    return np.flatnonzero(warm)


_DATA: dict[tuple[Any, ...], tuple[Dataset, Split]] = {}
_MODELS: dict[tuple[Any, ...], RecModel] = {}


def dataset_and_split(data_dir: Path, protocol: str, seed: int) -> tuple[Dataset, Split]:
    key = (str(data_dir), protocol, seed)
    if key not in _DATA:
        ds = load_dataset(data_dir)
        _DATA[key] = (ds, make_split(ds, protocol))
    return _DATA[key]


def model_for(cfg: FedConfig, ds: Dataset, split: Split) -> RecModel:
    """The process's model for these settings (built once; its tensors are overwritten each
    round with the global state)."""
    mcfg = cfg.model_config()
    key = (mcfg, catalog_digest(ds.item_texts()))
    if key not in _MODELS:
        base, tok = load_backbone(mcfg.backbone)
        model = RecModel(base, tok, ds.item_texts(), mcfg, warm_items=warm_items(split))
        _release_freed_memory()
        _MODELS[key] = model
    return _MODELS[key]


def _release_freed_memory() -> None:
    """Give the heap memory freed while building the model (the catalog pass's activations)
    back to the OS (glibc ``malloc_trim``), so that it does not stay in the
    client's resident set. A no-op where glibc is not the C library."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


@dataclass
class ClientState:
    """One client's view: its model, DP scorer, examples and the users whose data it holds."""

    model: RecModel
    scorer: CandidateScorer
    split: Split
    users: np.ndarray
    examples: ClientExamples
    catalog: str
    name: str
    dataset: Dataset | None = None


def with_canaries(
    per_user: list[tuple[np.ndarray, np.ndarray]], path: Path, name: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``per_user`` histories ``(items, timestamps)`` plus this client's canaries from an
    empirical-audit file (see :mod:`fedrec.server.empirical`):
    ``{"unit": "interaction", "clients": {name: [item, ...]}}`` in catalog indices.

    Each canary is ONE INTERACTION, the unit the privacy statement claims: it joins the client's
    first user's history after that user's last interaction, one second apart, and goes through
    the same example builder as the real data (under disjoint examples it adds its slot's
    example or replaces it, becoming its target)."""
    try:
        doc = json.loads(path.read_text())
        unit = doc.get("unit")
        if unit != "interaction":
            raise ValueError(
                f"unit {unit!r}: fedrec's canaries are interactions ('interaction'); write "
                "the file with `fedrec audit RUN --empirical`"
            )
        items = np.asarray([int(r) for r in doc["clients"].get(name, [])], dtype=np.int64)
    except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"audit-canaries file {path} is unreadable: {e}") from None
    if not items.size or not per_user:
        return per_user
    hist_items, hist_times = per_user[0]
    start = int(hist_times.max()) + 1 if hist_times.size else 0
    times = start + np.arange(items.size, dtype=np.int64)
    first = (
        np.concatenate([hist_items, items.astype(hist_items.dtype)]),
        np.concatenate([hist_times, times.astype(hist_times.dtype)]),
    )
    return [first, *per_user[1:]]


_SCORERS: dict[int, CandidateScorer] = {}
_CLIENTS: dict[tuple[Any, ...], ClientState] = {}


def client_state(cfg: FedConfig, node_config: dict[str, Any]) -> ClientState:
    """Build (or reuse) this client's state from the run config and its node config."""
    if "data-dir" in node_config:
        data_dir, part = Path(str(node_config["data-dir"])), None
    elif "partition-id" in node_config:
        data_dir, part = resolve_data_dir(cfg.data), int(node_config["partition-id"])
    else:
        raise ValueError(
            "node config has neither 'data-dir' (a device's data folder) nor 'partition-id' "
            "(simulation): start the SuperNode with --node-config \"data-dir='/path/to/data'\""
        )
    key = (cfg, str(data_dir), part)
    if key in _CLIENTS:
        return _CLIENTS[key]
    ds, split = dataset_and_split(data_dir, cfg.protocol, cfg.seed)
    if part is None:
        users = np.unique(split.train_user)
        name = str(node_config.get("client-id", data_dir.name))
    else:
        parts = partition_users(split, scheme=cfg.partition, n_silos=cfg.silos, seed=cfg.seed)
        if not 0 <= part < len(parts):
            raise ValueError(
                f"partition-id {part} is out of range: this run has {len(parts)} clients "
                f"(partition={cfg.partition}); start the simulation with that many SuperNodes"
            )
        users, name = parts[part], f"p{part}"
    model = model_for(cfg, ds, split)
    if id(model) not in _SCORERS:
        _SCORERS[id(model)] = CandidateScorer(model)
    profiles = None
    if cfg.use_profile:
        bank = ProfileBank(model)
        texts = [ds.user_text(int(split.user_ids[u])) for u in users]
        profiles = [bank(t) if t else torch.zeros(model.dim) for t in texts]
    per_user = []
    for u in users:
        rows = np.flatnonzero(split.train_user == u)  # time order within a user
        per_user.append((split.train_item[rows], split.train_time[rows]))
    if cfg.audit_canaries:
        per_user = with_canaries(per_user, Path(cfg.audit_canaries), name)
    examples = build_examples(
        per_user,
        slots=cfg.slots,
        history_len=cfg.history_len,
        key=cfg.seed,
        profiles=profiles,
        sequence=cfg.examples == "sequence",  # under local DP: group privacy (cfg.dp_group())
    )
    state = ClientState(
        model,
        _SCORERS[id(model)],
        split,
        users,
        examples,
        catalog_digest(ds.item_texts()),
        name,
        ds,
    )
    _CLIENTS[key] = state
    return state
