"""The run's data set, split and model, built the same way by the ServerApp and every client.

Both sides must see the same catalog, split and model architecture: the server to evaluate and
to check replies against, each client to train. Everything is cached per process, keyed by the
settings it depends on (a simulation's worker process serves many virtual clients; loading the
backbone and the catalog cache once per process is what keeps a round cheap).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.backbone import load_backbone
from fedrec.shared.data import load_dataset
from fedrec.shared.data.dataset import Dataset
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.towers import RecModel
from fedrec.shared.splitting import Split, make_split


def resolve_data_dir(data: str) -> Path:
    """``ml-100k`` (in the data home) or a folder in the fedrec layout."""
    from fedrec.shared.data.movielens import default_data_home

    if not data.strip():  # Path("") is the current folder: never what an empty value meant
        raise FileNotFoundError(
            "data is empty: give 'ml-100k' or the path of a folder in the fedrec layout"
        )
    path = Path(data)
    if path.is_dir():
        return path
    home = default_data_home()
    # a relative name is looked up in the data home before a stray file of that name here
    # is blamed: `ml-100k` must reach the fetched copy whatever sits in the current folder
    if not path.is_absolute() and (home / data).is_dir():
        return home / data
    if path.exists():
        raise FileNotFoundError(
            f"data '{data}' is a file, not a folder: give the folder that holds "
            "interactions.tsv and items.tsv"
        )
    if path.is_absolute():  # never looked up in the data home
        raise FileNotFoundError(
            f"data '{data}': no such folder. Point 'data' at a folder in the fedrec layout "
            "(interactions.tsv, items.tsv), or give 'ml-100k' after `fedrec data fetch ml-100k`."
        )
    raise FileNotFoundError(
        f"data '{data}': no such folder here and no data set of that name in {home}. "
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


_DIGESTS: dict[int, tuple[Dataset, str]] = {}


def dataset_digest(ds: Dataset) -> str:
    """:func:`catalog_digest` of ``ds``'s item texts, computed once per data set object (a
    client process asks for it every round; rendering 1,682 texts costs milliseconds)."""
    hit = _DIGESTS.get(id(ds))
    if hit is None or hit[0] is not ds:
        hit = _DIGESTS[id(ds)] = (ds, catalog_digest(ds.item_texts()))
    return hit[1]


_DATA: dict[tuple[Any, ...], tuple[Dataset, Split]] = {}
_MODELS: dict[tuple[Any, ...], RecModel] = {}


def dataset_and_split(data_dir: Path, protocol: str, seed: int) -> tuple[Dataset, Split]:
    """The data set in ``data_dir`` and its split under ``protocol`` (loaded once per process)."""
    key = (str(data_dir), protocol, seed)
    if key not in _DATA:
        ds = load_dataset(data_dir)
        _DATA[key] = (ds, make_split(ds, protocol))
    return _DATA[key]


def model_for(cfg: FedConfig, ds: Dataset, split: Split) -> RecModel:
    """The process's model for these settings (built once; its tensors are overwritten each
    round with the global state)."""
    mcfg = cfg.model_config()
    key = (mcfg, dataset_digest(ds))
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
