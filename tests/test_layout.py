"""The fedrec data layout: valid data loads; bad input names its file, line and column."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedrec.shared.data import DataError, load_dataset, write_dataset

ITEMS = "item_id\ttitle\tgenres\n1\tAlpha\tDrama\n2\tBeta\tComedy\n3\tGamma\tDrama\n"
INTER = "user_id\titem_id\ttimestamp\trating\n7\t1\t100\t4\n7\t2\t100\t3\n8\t3\t50\t5\n"


def make(tmp_path: Path, items: str | bytes = ITEMS, inter: str | bytes = INTER) -> Path:
    root = tmp_path / "d"
    root.mkdir()
    for name, text in (("items.tsv", items), ("interactions.tsv", inter)):
        data = text.encode() if isinstance(text, str) else text
        (root / name).write_bytes(data)
    return root


def error(tmp_path: Path, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        load_dataset(make(tmp_path, **kw))
    return e.value


def test_valid_folder_loads_in_row_order(tmp_path):
    ds = load_dataset(make(tmp_path))
    assert ds.n_users == 2 and ds.n_items == 3 and ds.n_interactions == 3
    assert ds.item_ids_of_interactions.tolist() == [1, 2, 3]  # file order kept
    assert ds.ratings.tolist() == [4.0, 3.0, 5.0]
    assert ds.item_texts()[0] == "title: Alpha. genres: Drama"


def test_missing_column(tmp_path):
    e = error(tmp_path, inter="user_id\titem_id\n7\t1\n")
    assert e.column == "timestamp" and e.line == 1 and e.file.endswith("interactions.tsv")


def test_misspelled_column_suggests_the_right_name(tmp_path):
    e = error(tmp_path, inter=INTER.replace("item_id", "itemid", 1))
    assert e.column == "item_id" and "did you mean 'itemid'" in str(e)


def test_wrong_delimiter(tmp_path):
    e = error(tmp_path, inter=INTER.replace("\t", ","))
    assert "comma-separated" in str(e) and e.line == 1


def test_non_integer_id(tmp_path):
    e = error(tmp_path, inter=INTER.replace("8\t3\t50", "u8\t3\t50"))
    assert (e.line, e.column) == (4, "user_id") and "'u8'" in str(e)


def test_duplicate_item_id(tmp_path):
    e = error(tmp_path, items=ITEMS + "2\tDelta\tWar\n")
    assert (e.line, e.column) == (5, "item_id") and "first on line 3" in str(e)


def test_interaction_with_unknown_item(tmp_path):
    e = error(tmp_path, inter=INTER + "8\t99\t60\t1\n")
    assert (e.line, e.column) == (5, "item_id") and "item 99" in str(e)


def test_empty_file(tmp_path):
    e = error(tmp_path, inter="")
    assert "empty" in str(e) and e.file.endswith("interactions.tsv")


def test_header_only(tmp_path):
    assert "no rows" in str(error(tmp_path, items="item_id\ttitle\n"))


def test_non_utf8_bytes(tmp_path):
    e = error(tmp_path, items=ITEMS.encode().replace(b"Beta", b"B\xe9ta"))
    assert e.line == 3 and "not valid UTF-8" in str(e) and "0xe9" in str(e)


def test_truncated_last_line(tmp_path):
    e = error(tmp_path, inter=INTER + "8\t1")
    assert e.line == 5 and "truncated" in str(e)


def test_wrong_field_count_inside(tmp_path):
    e = error(tmp_path, inter=INTER.replace("7\t2\t100\t3", "7\t2\t100"))
    assert e.line == 3 and "3 fields" in str(e)


def test_bad_template_field(tmp_path):
    root = make(tmp_path)
    (root / "dataset.json").write_text('{"item_text_template": "{title} {plot}"}')
    with pytest.raises(DataError, match=r"\['plot'\]"):
        load_dataset(root)


def test_last_line_without_newline_but_complete_is_fine(tmp_path):
    ds = load_dataset(make(tmp_path, inter=INTER.rstrip("\n")))
    assert ds.n_interactions == 3


def test_write_is_atomic_and_replaces(tmp_path):
    root = tmp_path / "w"
    items = {1: {"title": "A"}, 2: {"title": "B"}}
    write_dataset(root, interactions=[(1, 1, 5), (1, 2, 6)], items=items)
    write_dataset(root, interactions=[(1, 2, 7)], items=items)
    ds = load_dataset(root)
    assert ds.n_interactions == 1 and ds.ratings is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp folders left


def test_write_never_replaces_a_folder_that_is_not_a_data_folder(tmp_path, monkeypatch):
    """A folder holding anything but the layout's files, or a file, is refused before anything
    is written (``fedrec data synth`` on a user's folder deleted it); an empty folder is used;
    the published folder is readable by others (not mkdtemp's 0700)."""
    items = {1: {"title": "A"}}
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="not a fedrec data folder .*sub, thesis.txt"):
        write_dataset(precious, interactions=[(1, 1, 5)], items=items)
    assert (precious / "thesis.txt").read_text() == "years of work"
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match="not a folder"):
        write_dataset(a_file, interactions=[(1, 1, 5)], items=items)
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "precious"]  # nothing else
    empty = tmp_path / "empty"
    empty.mkdir()
    out = write_dataset(empty, interactions=[(1, 1, 5)], items=items)
    assert load_dataset(out).n_interactions == 1
    assert out.stat().st_mode & 0o055 == 0o055 & ~_umask()
    # the current folder (or one holding it) is refused: replacing it pulled it from under
    # the shell; a new folder below it is fine
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for where in (".", ".."):
        with pytest.raises(ValueError, match="current folder"):
            write_dataset(where, interactions=[(1, 1, 5)], items=items)
    assert Path.cwd() == here and here.is_dir()
    assert load_dataset(write_dataset("d", interactions=[(1, 1, 5)], items=items)).n_interactions
    # ... also by another path to it (a symlinked parent); a symlink is never replaced
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path)
    with pytest.raises(ValueError, match="current folder"):
        write_dataset(alias / "here", interactions=[(1, 1, 5)], items=items)
    link = tmp_path / "link"
    link.symlink_to(here / "d")
    with pytest.raises(ValueError, match="symbolic link.*give the real path"):
        write_dataset(link, interactions=[(1, 1, 5)], items=items)
    assert link.is_symlink() and Path.cwd() == here

    # a folder it cannot read: a clear error, not a traceback (as root every folder reads,
    # so the listing is made to fail as it does for a user without the permission)
    def denied(self):  # noqa: ANN001, ANN202
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(ValueError, match="cannot be read \\(Permission denied\\)"):
        write_dataset(here / "d", interactions=[(1, 1, 5)], items=items)


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_failed_write_leaves_old_folder(tmp_path):
    root = tmp_path / "w"
    items = {1: {"title": "A"}}
    write_dataset(root, interactions=[(1, 1, 5)], items=items)
    with pytest.raises(ValueError, match="tab"):
        write_dataset(root, interactions=[(1, 1, 5)], items={1: {"title": "bad\tvalue"}})
    assert load_dataset(root).n_interactions == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_synthetic_loads(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    assert ds.n_users == 60 and ds.n_items == 90
    assert np.all(ds.timestamps[:-1] <= ds.timestamps[1:])
    shutil.copytree(synth_dir, tmp_path / "copy")
    assert load_dataset(tmp_path / "copy").item_texts() == ds.item_texts()


def test_write_from_a_deleted_current_folder(tmp_path, monkeypatch):
    """A shell whose folder was deleted can still replace a data folder given by its full path
    (Path.cwd() raised FileNotFoundError inside the current-folder check)."""
    items = {1: {"title": "A"}, 2: {"title": "B"}}
    root = write_dataset(tmp_path / "w", interactions=[(1, 1, 5)], items=items)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    out = write_dataset(root, interactions=[(1, 1, 5), (1, 2, 6)], items=items)
    assert load_dataset(out).n_interactions == 2
