"""One way to read settings: every config dataclass (``FedConfig``, ``ModelConfig``,
``TrainConfig``) is parsed, listed and explained by the functions here.

Keys are the field names, written kebab-case (``lora-r``) or snake-case (``lora_r``); values are
coerced to the field's type (``"false"`` is False, ``"8"`` an int, ``"1e-5"`` a float); unknown
keys and values that are not of the type, or not finite, raise ``ValueError`` naming the key.
Each class then checks its own ranges in ``__post_init__``.

A field's help text is the comment next to it in the class body (the lines right above it, or
the end of its line), else the sentences of the class docstring that name it: the code's own
documentation is the one source. ``fedrec config`` prints the keys with defaults and help.
"""

from __future__ import annotations

import ast
import inspect
import io
import math
import re
import tokenize
from dataclasses import MISSING, fields
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


class SettingWarning(UserWarning):
    """A setting that has no effect, or less than asked, with the others given (``lr-id``
    without ``id-residual``): the command line prints it as one ``warning:`` line."""


def key_of(name: str) -> str:
    """A field name as a settings key: ``lora_r`` -> ``lora-r``."""
    return name.replace("_", "-")


def as_bool(value: object) -> bool:
    """``true``/``false`` (also 1/0, yes/no) as a bool; anything else raises ``ValueError``
    (``bool("false")`` would be True)."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in {"true", "1", "yes"}:
        return True
    if str(value).strip().lower() in {"false", "0", "no"}:
        return False
    raise ValueError(value)


def _coerce(kind: type, value: Any) -> Any:
    if kind is bool:
        return as_bool(value)
    if kind in (int, float) and isinstance(value, bool):  # TOML's true is not a number
        raise ValueError(value)
    # TOML's false is not a text (str(False) would be 'False'), nor is a list or a table
    if kind is str and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is int and isinstance(value, str):
        return int(value.strip())
    return kind(value)


def parse_fields(cls: type[T], raw: dict[str, Any], *, where: str = "settings") -> T:
    """``cls(**raw)`` with keys in either spelling and values coerced to the fields' types."""
    defaults = cls()
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).strip().replace("-", "_")
        if name not in known:
            raise ValueError(
                f"{where}: unknown key '{key}'. Known keys: "
                + ", ".join(sorted(key_of(k) for k in known))
            )
        kind = type(getattr(defaults, name))
        try:
            kwargs[name] = _coerce(kind, value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"{where}: key '{key}' = {value!r} is not a valid {kind.__name__}"
            ) from None
        if kind is float and not math.isfinite(kwargs[name]):
            raise ValueError(f"{where}: key '{key}' = {value!r} is not a finite number")
    return cls(**kwargs)


@cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help text (see the module docstring for where it comes from)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line (1-based, in ``source``) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    doc = " ".join((inspect.getdoc(cls) or "").split())
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", doc)
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, line = node.target.id, node.lineno
        above: list[str] = []
        k = line - 1
        while k >= 1 and lines[k - 1].strip().startswith("#") and "# ---" not in lines[k - 1]:
            above.insert(0, comments.get(k, ""))
            k -= 1
        parts = [" ".join(above)] if above else []
        if line in comments:
            parts.append(comments[line])
        text = " ".join(p for p in parts if p)
        if not text:
            text = " ".join(s for s in sentences if f"``{name}``" in s)
        out[name] = " ".join(text.split())
    return out


def describe(cls: type) -> list[dict[str, Any]]:
    """One row per field: key, type, default (as written in a TOML file), value, help."""
    helps = field_help(cls)
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        rows.append({"key": key_of(f.name), "type": type(default).__name__,
                     "default": _show(default), "value": default,
                     "help": helps.get(f.name, "")})  # fmt: skip
    return rows


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
