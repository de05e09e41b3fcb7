"""The run directory (docs/federation.md): atomic JSON writes and version stamps."""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

STAMPED = ("fedrec", "flwr", "torch", "transformers", "peft", "opacus", "numpy", "implicit")


def versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour a result depends on."""
    out = {"python": platform.python_version()}
    for name in STAMPED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float (inf, nan) replaced by ``None``.

    Python's ``json`` writes them as ``Infinity``/``NaN``, which is not JSON: strict parsers
    (``jq``, JavaScript, most other languages) reject the whole document. ``null`` is what such
    a value means here: no finite number (for example, no PRV bound for a group-privacy run)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def dumps(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always produces valid JSON (non-finite floats become ``null``)."""
    return json.dumps(json_safe(data), allow_nan=False, **kwargs)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one.
    Non-finite floats are written as ``null`` (see :func:`json_safe`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
