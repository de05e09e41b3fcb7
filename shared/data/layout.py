"""The fedrec data layout: a folder of tab-separated UTF-8 files with a header line.

``interactions.tsv`` (required)
    ``user_id``, ``item_id`` (non-negative integers), ``timestamp`` (integer Unix seconds),
    optional ``rating`` (number). Row order is meaningful: it breaks timestamp ties when a user's
    history is put in time order (docs/evaluation.md), so keep the original order of your export.
``items.tsv`` (required)
    ``item_id`` (unique non-negative integer) and one or more text columns (e.g. ``title``,
    ``year``, ``genres``, ``description``). Items may have no interactions (new items).
``users.tsv`` (optional)
    ``user_id`` (unique) and profile columns (e.g. ``age``, ``occupation``). Profiles feed cold
    start; they are NOT protected by DP-SGD (see the privacy statement).
``dataset.json`` (optional)
    ``{"name": ..., "item_text_template": "{title} ({year}). Genres: {genres}",
    "user_text_template": "..."}``. Without it, item text is "column: value" pairs joined.

Loading is all-or-nothing: the first problem raises :class:`DataError` naming file, line and
column; no partial data set is ever returned. ``fedrec data validate DIR`` runs this loader.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.shared.data.dataset import Dataset, render, template_fields
from fedrec.shared.data.errors import DataError

INTERACTIONS = "interactions.tsv"
ITEMS = "items.tsv"
USERS = "users.tsv"
META = "dataset.json"

_INT = re.compile(r"[0-9]+")
_OTHER_DELIMITERS = {",": "comma", ";": "semicolon", "|": "pipe"}


@dataclass
class _Table:
    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]  # 1-based file line of each row

    def column(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [r[j] for r in self.rows]


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"byte 0x{raw[e.start]:02x} at character {col} is not valid UTF-8",
            file=path,
            line=line,
            fix="Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).",
        ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(
            f"cannot read the file ({e.strerror or e})",
            file=path,
            fix="Check that it is a regular file this user may read (permissions, a dangling "
            "link, a network mount).",
        ) from None


def _read_table(path: Path, required: Sequence[str], *, min_columns: int = 0) -> _Table:
    if not path.exists():
        raise DataError("file not found", file=path, fix="Create it (see `fedrec data --help`).")
    raw = _read_bytes(path)
    text = _decode(path, raw)
    if not text.strip():
        raise DataError("the file is empty", file=path, fix="It needs a header line and rows.")
    ends_with_newline = text.endswith("\n")
    lines = text.split("\n")
    if ends_with_newline:
        lines.pop()
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    header = lines[0].split("\t")
    if len(header) == 1:
        for sep, name in _OTHER_DELIMITERS.items():
            if sep in header[0]:
                raise DataError(
                    f"the header looks {name}-separated ('{header[0][:60]}')",
                    file=path,
                    line=1,
                    fix="fedrec files are tab-separated; convert the delimiter to a tab.",
                )
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError("duplicate column name", file=path, line=1, column=name)
        seen.add(name)
    for name in required:
        if name not in header:
            close = difflib.get_close_matches(name, header, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise DataError(
                f"required column is missing (found {header})",
                file=path,
                line=1,
                column=name,
                fix=f"{hint}The header must name the columns {list(required)}.",
            )
    if len(header) < min_columns:
        raise DataError(
            f"needs at least {min_columns} columns, found {len(header)}", file=path, line=1
        )
    rows: list[list[str]] = []
    numbers: list[int] = []
    last = len(lines) - 1
    for i in range(1, len(lines)):
        fields = lines[i].split("\t")
        if len(fields) != len(header):
            if i == last and not ends_with_newline:
                raise DataError(
                    f"truncated last line: it has {len(fields)} of {len(header)} fields and no "
                    "line end",
                    file=path,
                    line=i + 1,
                    fix="The file was probably cut off while being written; export it again.",
                )
            what = "blank line" if not lines[i].strip() else f"{len(fields)} fields"
            raise DataError(
                f"{what}, but the header has {len(header)} columns",
                file=path,
                line=i + 1,
                fix="Every row needs one tab-separated value per header column.",
            )
        rows.append(fields)
        numbers.append(i + 1)
    if not rows:
        raise DataError("the file has a header but no rows", file=path, line=1)
    return _Table(path, header, rows, numbers)


_INT64_MAX = int(np.iinfo(np.int64).max)


def _int_column(table: _Table, name: str) -> np.ndarray:
    values = table.column(name)
    out = np.empty(len(values), dtype=np.int64)
    for k, v in enumerate(values):
        if not _INT.fullmatch(v):
            raise DataError(
                f"'{v}' is not a non-negative integer",
                file=table.path,
                line=table.lines[k],
                column=name,
                fix="Ids and timestamps must be whole numbers (map string ids to integers first).",
            )
        if int(v) > _INT64_MAX:
            raise DataError(
                f"{v} is too large (at most {_INT64_MAX}, the largest 64-bit integer)",
                file=table.path,
                line=table.lines[k],
                column=name,
                fix="Map ids to small integers first; timestamps are Unix seconds.",
            )
        out[k] = int(v)
    return out


def _float_column(table: _Table, name: str) -> np.ndarray:
    values = table.column(name)
    out = np.empty(len(values), dtype=np.float64)
    for k, v in enumerate(values):
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = np.nan
        if not np.isfinite(out[k]):
            raise DataError(
                f"'{v}' is not a finite number", file=table.path, line=table.lines[k], column=name
            )
    return out


def _unique_ids(table: _Table, name: str) -> np.ndarray:
    ids = _int_column(table, name)
    first: dict[int, int] = {}
    for k, v in enumerate(ids.tolist()):
        if v in first:
            raise DataError(
                f"duplicate id {v} (first on line {first[v]})",
                file=table.path,
                line=table.lines[k],
                column=name,
                fix="Each id may appear once in this file.",
            )
        first[v] = table.lines[k]
    return ids


def _fields(table: _Table, ids: np.ndarray, key: str) -> dict[int, dict[str, str]]:
    cols = [c for c in table.header if c != key]
    idx = [table.header.index(c) for c in cols]
    return {
        int(i): {c: row[j].strip() for c, j in zip(cols, idx, strict=True)}
        for i, row in zip(ids.tolist(), table.rows, strict=True)
    }


def _read_meta(root: Path, item_cols: list[str], user_cols: list[str] | None) -> dict:
    path = root / META
    meta: dict = {}
    if path.is_file():
        try:
            meta = json.loads(_decode(path, _read_bytes(path)))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from None
        if not isinstance(meta, dict):
            raise DataError("must be a JSON object", file=path)
        unknown = set(meta) - {"name", "item_text_template", "user_text_template", "source"}
        if unknown:
            raise DataError(f"unknown keys {sorted(unknown)}", file=path)
    for key, cols in (("item_text_template", item_cols), ("user_text_template", user_cols)):
        template = meta.get(key)
        if template is None or cols is None:
            continue
        _check_template(template, cols, path=path, key=key)
    return meta


def _check_template(template: object, cols: list[str], *, path: Path, key: str) -> None:
    """A template must be a ``str.format`` string over the file's columns that formats."""
    fix = (
        'Write it like "{title} ({year})": one {column} per field, braces doubled ({{ }}) '
        "for literal ones."
    )
    if not isinstance(template, str):
        raise DataError(f"must be a string, not {type(template).__name__}", file=path,
                        column=key)  # fmt: skip
    try:
        names = template_fields(template)
    except ValueError as e:
        raise DataError(f"template {template!r} is malformed: {e}", file=path, column=key,
                        fix=fix) from None  # fmt: skip
    missing = [f for f in names if f not in cols]
    if missing:
        raise DataError(
            f"template {template!r} uses fields {missing} that the file does not have",
            file=path,
            column=key,
            fix=f"Available fields: {cols}.",
        )
    try:
        render(template, {c: "x" for c in cols})
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"template {template!r} does not format: {e}", file=path, column=key,
                        fix=fix) from None  # fmt: skip


def _default_template(cols: list[str]) -> str:
    return ". ".join(f"{c}: {{{c}}}" for c in cols)


def load_dataset(root: str | Path, *, name: str | None = None) -> Dataset:
    """Load and validate a fedrec data folder; raise :class:`DataError` on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            "not a directory",
            file=root,
            fix="Pass a folder with interactions.tsv and items.tsv (`fedrec data fetch ml-100k`).",
        )
    items = _read_table(root / ITEMS, ["item_id"], min_columns=2)
    item_ids = _unique_ids(items, "item_id")
    item_fields = _fields(items, item_ids, "item_id")
    item_cols = [c for c in items.header if c != "item_id"]

    users_path = root / USERS
    user_fields: dict[int, dict[str, str]] = {}
    user_cols: list[str] | None = None
    if users_path.exists():
        users = _read_table(users_path, ["user_id"], min_columns=2)
        user_fields = _fields(users, _unique_ids(users, "user_id"), "user_id")
        user_cols = [c for c in users.header if c != "user_id"]

    inter = _read_table(root / INTERACTIONS, ["user_id", "item_id", "timestamp"])
    user_ids = _int_column(inter, "user_id")
    inter_items = _int_column(inter, "item_id")
    timestamps = _int_column(inter, "timestamp")
    ratings = _float_column(inter, "rating") if "rating" in inter.header else None

    order = np.sort(item_ids)
    pos = np.searchsorted(order, inter_items)
    known = (pos < order.size) & (order[np.minimum(pos, order.size - 1)] == inter_items)
    if not known.all():
        bad = np.flatnonzero(~known)
        more = f" ({bad.size - 1} more rows like it)" if bad.size > 1 else ""
        raise DataError(
            f"item {inter_items[bad[0]]} is not in {ITEMS}{more}",
            file=inter.path,
            line=inter.lines[bad[0]],
            column="item_id",
            fix=f"Add the item to {ITEMS} or drop its interactions.",
        )

    meta = _read_meta(root, item_cols, user_cols)
    return Dataset(
        name=name or meta.get("name") or root.name,
        user_ids=user_ids,
        item_ids_of_interactions=inter_items,
        timestamps=timestamps,
        ratings=ratings,
        item_ids=order,
        item_fields=item_fields,
        item_text_template=meta.get("item_text_template") or _default_template(item_cols),
        user_fields=user_fields,
        user_text_template=(
            meta.get("user_text_template") or (_default_template(user_cols) if user_cols else None)
        ),
    )


def _tsv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    for row in rows:
        for v in row:
            if "\t" in str(v) or "\n" in str(v):
                raise ValueError(f"value {v!r} contains a tab or line break; clean it first")
    out = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    return "\n".join(out) + "\n"


def _check_replaceable(root: Path) -> None:
    """Refuse to write a data folder over anything but an empty folder or a fedrec data folder
    (only the layout's files): never delete someone's files."""
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink():
        raise DataError(
            f"{root} is a symbolic link; refusing to replace it (the new folder would take the "
            f"link's place, not its target's): give the real path, {root.resolve()}"
        )
    try:
        cwd: Path | None = Path.cwd().resolve()
    except FileNotFoundError:  # the shell's folder was deleted: it is not the existing root
        cwd = None
    real = root.resolve()  # the same folder by any path
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise DataError(
            f"{root} is the current folder or holds it; replacing it would pull the folder out "
            "from under this shell: write the data to a new folder, e.g. data/synth"
        )
    if not root.is_dir():
        raise DataError(
            f"{root} exists and is not a folder; refusing to replace it: choose another path "
            "for the data folder"
        )
    known = {INTERACTIONS, ITEMS, USERS, META}
    try:
        other = sorted(p.name for p in root.iterdir() if p.name not in known or not p.is_file())
    except OSError as err:
        raise DataError(
            f"{root} exists and cannot be read ({err.strerror or err}); refusing to replace it: "
            "choose another folder, or fix its permissions"
        ) from None
    if other:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        raise DataError(
            f"{root} exists and is not a fedrec data folder (it holds {shown}); refusing to "
            "replace it: choose a new folder, or remove it first"
        )


def write_dataset(
    root: str | Path,
    *,
    interactions: Sequence[tuple[int, int, int] | tuple[int, int, int, float]],
    items: dict[int, dict[str, str]],
    users: dict[int, dict[str, str]] | None = None,
    meta: dict | None = None,
) -> Path:
    """Write a fedrec data folder atomically: a temp folder renamed into place when complete.

    ``interactions`` rows are ``(user_id, item_id, timestamp[, rating])`` in the order to keep.
    An existing folder at ``root`` is replaced only after the new one is fully written, and
    only if it is empty or a fedrec data folder (ValueError otherwise: nothing is written).
    """
    root = Path(os.path.abspath(root))  # "." has no name to put a temp folder beside
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private
    try:
        has_rating = bool(interactions) and len(interactions[0]) == 4
        head = ["user_id", "item_id", "timestamp"] + (["rating"] if has_rating else [])
        (tmp / INTERACTIONS).write_text(_tsv(head, interactions), encoding="utf-8")
        item_cols = list(next(iter(items.values())).keys())
        rows = [[i, *(f[c] for c in item_cols)] for i, f in sorted(items.items())]
        (tmp / ITEMS).write_text(_tsv(["item_id", *item_cols], rows), encoding="utf-8")
        if users:
            user_cols = list(next(iter(users.values())).keys())
            rows = [[u, *(f[c] for c in user_cols)] for u, f in sorted(users.items())]
            (tmp / USERS).write_text(_tsv(["user_id", *user_cols], rows), encoding="utf-8")
        if meta:
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if root.exists():
            old = root.with_name(f".{root.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
