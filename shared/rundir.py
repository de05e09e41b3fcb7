"""The run directory (DESIGN section 6): atomic JSON writes and version stamps."""

from __future__ import annotations

import json
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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
