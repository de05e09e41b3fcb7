"""What a client process keeps between rounds: its users, its examples, the model and scorer.

A Flower simulation runs many virtual clients in a few worker processes, and a SuperNode runs one
client for many rounds: the data set, split and model come from
:mod:`fedrec.shared.federation.data_and_model` (built once per process, as the server builds
them); each client's state is cached here, keyed by the settings it depends on. Its privacy
budget is kept in :mod:`fedrec.client.budget`.

Where a client's data comes from:

- ``node_config["data-dir"]`` (a device, see docs/deployment.md): a folder in the fedrec layout
  holding that device's own interactions and the public catalog; all its users are its data.
- otherwise (simulation): the run's data set, split by the protocol, partitioned by
  ``partition`` and ``silos``; ``node_config["partition-id"]`` picks this client's users.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.client.local_train import ClientExamples, build_examples
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.data_and_model import (  # built as the server builds them
    dataset_and_split,
    dataset_digest,
    model_for,
    resolve_data_dir,
)
from fedrec.shared.federation.segments import count_table, n_segments, parse_fields, segments_of
from fedrec.shared.model.candidates import CandidateScorer
from fedrec.shared.model.central import ProfileBank
from fedrec.shared.model.towers import RecModel
from fedrec.shared.partition import partition_users
from fedrec.shared.splitting import Split


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
    # with segment-prior: this client's training interactions counted per (segment, item),
    # exact (the noise is drawn when a round releases it, see client.app)
    segment_counts: np.ndarray | None = None


def with_canaries(
    per_user: list[tuple[np.ndarray, np.ndarray]], path: Path, name: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``per_user`` histories ``(items, timestamps)`` plus this client's canaries from an
    empirical-audit file (see :mod:`fedrec.shared.privacy.empirical`):
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
# Per split (kept alive here, so its id is not reused): its partitions by (scheme, silos, seed).
# A simulation process serves hundreds of one-user clients; each partitioning all training rows
# again cost about 5 ms of a 50 ms round body.
_PARTITIONS: dict[int, tuple[Split, dict[Any, list[np.ndarray]]]] = {}


def _partitions(split: Split, cfg: FedConfig) -> list[np.ndarray]:
    entry = _PARTITIONS.get(id(split))
    if entry is None or entry[0] is not split:
        entry = (split, {})
        _PARTITIONS[id(split)] = entry
    key = (cfg.partition, cfg.silos, cfg.seed)
    if key not in entry[1]:
        entry[1][key] = partition_users(
            split, scheme=cfg.partition, n_silos=cfg.silos, seed=cfg.seed
        )
    return entry[1][key]


def _user_rows(split: Split, user: int) -> np.ndarray:
    """Row indices of ``user``'s training interactions, in time order: a split's training rows
    are sorted by user (as :meth:`Split.train_histories` reads them), so they are one range."""
    lo, hi = np.searchsorted(split.train_user, [user, user + 1])
    return np.arange(lo, hi)


def public_name(node_config: dict[str, Any]) -> str:
    """The client's name in replies and the ledger, from its node config alone: ``client-id``
    or its data folder's name on a device, ``p<partition-id>`` in simulation."""
    if "data-dir" in node_config:
        return str(node_config.get("client-id", Path(str(node_config["data-dir"])).name))
    if "partition-id" in node_config:
        return f"p{int(node_config['partition-id'])}"
    return "unnamed"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory in this process for reuse (once per process).

    A local step allocates and frees temporaries of 0.5-3 MB (a batch's token rows, its item
    vectors). By default glibc returns freed memory to the system: a block above its (dynamic)
    mmap threshold is unmapped on free, and the heap's free top is trimmed beyond twice that
    threshold, so later steps fault fresh pages in again; on the 2-core VM fedrec is measured on,
    a product of two fresh 2 MB temporaries took up to 4 ms that way against 0.2 ms with these
    settings (a micro-benchmark). Here the mmap threshold is fixed at 32 MiB (glibc's maximum on
    64-bit; fixing it turns the dynamic threshold off), freed heap is trimmed only beyond 1 GiB,
    and the heap grows 64 MiB at a time: the process keeps its high-water mark of memory
    instead. ``FEDREC_MALLOC_TUNE=0`` leaves malloc as it is. Returns whether the settings were
    applied (False then, and on a C library without ``mallopt``, e.g. macOS or musl)."""
    if os.environ.get("FEDREC_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, 32 * 2**20),
                (_M_TRIM_THRESHOLD, 2**30),
                (_M_TOP_PAD, 64 * 2**20),
            )
        )
    except (OSError, AttributeError):
        return False


def client_state(cfg: FedConfig, node_config: dict[str, Any]) -> ClientState:
    """Build (or reuse) this client's state from the run config and its node config."""
    keep_freed_memory()
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
        name = public_name(node_config)
    else:
        parts = _partitions(split, cfg)
        if not 0 <= part < len(parts):
            raise ValueError(
                f"partition-id {part} is out of range: this run has {len(parts)} clients "
                f"(partition={cfg.partition}); start the simulation with that many SuperNodes"
            )
        users, name = parts[part], public_name(node_config)
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
        rows = _user_rows(split, u)  # time order within a user
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
    counts = None
    if cfg.segment_prior:
        fields = parse_fields(cfg.segment_prior)
        segs = segments_of(ds.user_fields, split.user_ids[users], fields)
        counts = count_table(
            [items for items, _times in per_user], segs, split.n_items, n_segments(fields)
        )
    state = ClientState(
        model,
        _SCORERS[id(model)],
        split,
        users,
        examples,
        dataset_digest(ds),
        name,
        ds,
        counts,
    )
    _CLIENTS[key] = state
    return state
