"""Shamir sharing on pycryptodome's C GF(2^128) multiply (fedrec.shared.federation.shamir)
against pycryptodome's own Shamir, on random data: the same shares for the same polynomial, the
same combination for any shares, the same errors, and the fallback when the C path is unusable."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from Crypto.Protocol import SecretSharing
from Crypto.Protocol.SecretSharing import Shamir

from fedrec.shared.federation import shamir


def _stream(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


@pytest.mark.parametrize("seed", range(6))
def test_split_gives_pycryptodomes_shares_for_the_same_coefficients(monkeypatch, seed):
    rng = np.random.default_rng(100 + seed)
    t = int(rng.integers(1, 20))
    n = int(rng.integers(t, 40))
    secret = rng.bytes(16)
    assert shamir.fast()  # decided (its self-check draws random bytes) before the stream is set
    # both draw the t - 1 random coefficients from the same (here: seeded) byte stream
    monkeypatch.setattr(SecretSharing, "rng", _stream(seed))
    want = Shamir.split(t, n, secret, ssss=False)
    monkeypatch.setattr(shamir, "get_random_bytes", _stream(seed))
    got = shamir.split(t, n, secret)
    assert got == want


@pytest.mark.parametrize("seed", range(6))
def test_combine_equals_pycryptodomes_on_any_shares(seed):
    """Lagrange at 0 for arbitrary 16-byte values at distinct random indices (not only real
    shares): every field operation of the combination is exercised, and it must agree."""
    rng = np.random.default_rng(200 + seed)
    assert shamir.fast()  # else this would compare pycryptodome with itself
    for _ in range(10):
        k = int(rng.integers(1, 18))
        top = 2**31 if rng.random() < 0.5 else 64  # any index, or a SecAgg+ group's
        idx = {int(i) for i in rng.integers(1, top, size=k)}
        shares = [(i, rng.bytes(16)) for i in idx]
        assert shamir.combine(shares) == Shamir.combine(shares, ssss=False)


@pytest.mark.parametrize("t,n", [(1, 1), (2, 3), (5, 9), (16, 31)])
def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not(t, n):
    rng = np.random.default_rng(t * 31 + n)
    secret = rng.bytes(16)
    shares = shamir.split(t, n, secret)
    for _ in range(5):
        pick = [shares[i] for i in rng.choice(n, t, replace=False)]
        assert shamir.combine(pick) == secret
        assert Shamir.combine(pick, ssss=False) == secret  # pycryptodome reads them too
    if t > 1:
        assert shamir.combine(shares[: t - 1]) != secret


def test_bad_input_is_refused_like_pycryptodome():
    good = shamir.split(2, 3, bytes(range(16)))
    with pytest.raises(ValueError, match="Duplicate share"):
        shamir.combine([good[0], good[0]])
    with pytest.raises(ValueError, match="16 bytes"):
        shamir.combine([good[0], (2, b"short")])
    with pytest.raises(ValueError, match="index"):
        shamir.combine([(0, good[0][1]), good[1]])
    with pytest.raises(ValueError, match="no shares"):
        shamir.combine([])
    with pytest.raises(ValueError, match="16 bytes"):
        shamir.split(2, 3, b"too short")
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(4, 3, bytes(16))


def test_an_unusable_c_path_falls_back_to_pycryptodome_and_says_so(monkeypatch, caplog):
    def missing():
        raise AttributeError("module 'Crypto.Cipher._mode_gcm' has no attribute '_GHASH'")

    monkeypatch.setattr(shamir, "_STATE", {})
    monkeypatch.setattr(shamir, "_load_ghash", missing)
    calls = []
    real = Shamir.split
    monkeypatch.setattr(Shamir, "split", lambda *a, **k: calls.append(a) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="fedrec.secagg"):
        shares = shamir.split(3, 5, bytes(16))
    assert not shamir.fast() and calls  # pycryptodome's split did the work
    assert "falls back" in caplog.text and "_GHASH" in caplog.text
    assert shamir.combine(shares[1:4]) == bytes(16)


def test_a_c_path_that_disagrees_is_not_used(monkeypatch, caplog):
    """The self-check at first use compares with pycryptodome: a GHASH that computes another
    product (here: its key ignored) is caught, not trusted."""
    real = shamir._load_ghash

    def wrong():
        cls, impl = real()
        return (lambda key, c: cls(bytes(16)[:-1] + b"\x01", c)), impl

    monkeypatch.setattr(shamir, "_STATE", {})
    monkeypatch.setattr(shamir, "_load_ghash", wrong)
    with caplog.at_level(logging.WARNING, logger="fedrec.secagg"):
        assert not shamir.fast()
    assert "disagreed" in caplog.text
    secret = bytes(range(16))
    assert shamir.combine(shamir.split(4, 7, secret)[2:6]) == secret


def test_bench_combine_times_the_three_ways_and_checks_their_secrets(tmp_path, monkeypatch):
    import json
    import sys

    from fedrec.simulations import bench_combine

    monkeypatch.setattr(shamir, "_STATE", {})  # the bench switches paths; keep that here
    out = tmp_path / "combine.json"
    argv = ["bench_combine", "--out", str(out), "--secrets", "3,5", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threshold", "2", "--shares", "3"])
    bench_combine.main()
    doc = json.loads(out.read_text())
    assert [r["secrets"] for r in doc["unmasking"]] == [3, 5]
    for row in doc["unmasking"]:
        assert set(row["median_seconds"]) == {
            "reference",
            "reference-pool",
            "ghash",
            "ghash-new-index-sets",
        }
    assert doc["sharing_one_client"]["median_seconds"]["ghash"] > 0
    assert shamir.fast()  # left on the C path
    monkeypatch.setattr(sys, "argv", [*argv, "--threshold", "4", "--shares", "3"])
    with pytest.raises(SystemExit, match="threshold"):
        bench_combine.main()


def test_the_portable_ghash_gives_the_same_shares_and_secrets(monkeypatch):
    """The C code without the carry-less multiply instruction (what a CPU without it runs)."""
    from Crypto.Cipher import _mode_gcm

    assert shamir.fast()
    cls, _impl = shamir._STATE["ghash"]
    monkeypatch.setitem(shamir._STATE, "ghash", (cls, _mode_gcm._ghash_portable))
    shamir._lagrange_keys.cache_clear()
    try:
        rng = np.random.default_rng(7)
        for t, n in ((1, 2), (3, 5), (16, 31)):
            secret = rng.bytes(16)
            monkeypatch.setattr(SecretSharing, "rng", _stream(t))
            want = Shamir.split(t, n, secret, ssss=False)
            monkeypatch.setattr(shamir, "get_random_bytes", _stream(t))
            assert shamir.split(t, n, secret) == want
            pick = [want[i] for i in rng.choice(n, t, replace=False)]
            assert shamir.combine(pick) == secret
            assert shamir.consistent(want, t)
    finally:
        shamir._lagrange_keys.cache_clear()


@pytest.mark.parametrize("t,n", [(2, 4), (4, 6), (8, 14), (16, 30)])
def test_one_altered_share_anywhere_breaks_consistency(t, n):
    """consistent() catches one altered share at every position when there are more than t;
    both paths (GHASH and pycryptodome's elements) agree."""
    rng = np.random.default_rng(t * 100 + n)
    shares = shamir.split(t, n, rng.bytes(16))
    assert shamir.consistent(shares, t)
    for pos in range(n):
        bad = list(shares)
        i, value = bad[pos]
        bad[pos] = (i, bytes(a ^ b for a, b in zip(value, rng.bytes(16), strict=True)))
        assert not shamir.consistent(bad, t), pos
    assert shamir.consistent(shares[: t + 1], t)
    with pytest.raises(ValueError, match="fewer than the threshold"):
        shamir.consistent(shares[: t - 1], t)


def test_the_consistency_check_sees_what_comparing_two_subsets_misses():
    """Sorted by index, the first and the last t of 30 shares (t = 16) give index 15 the same
    Lagrange weight: altering that one share moves both subsets' secrets alike, so comparing
    them (the server's earlier check without a commitment) passes; the polynomial check does
    not."""
    from fedrec.shared.federation.secagg import combine_secret, shares_consistent, split_secret

    rng = np.random.default_rng(3)
    secret = rng.bytes(16)
    sh = split_secret(secret, 16, 31)[:30]
    assert int.from_bytes(sh[14][:4], "little") == 15
    sh[14] = sh[14][:4] + bytes(a ^ b for a, b in zip(sh[14][4:], rng.bytes(16), strict=True))
    assert combine_secret(sh[:16]) == combine_secret(sh[-16:]) != secret  # the blind spot
    assert not shares_consistent(sh, 16)


def test_the_reference_path_checks_consistency_alike(monkeypatch):
    rng = np.random.default_rng(11)
    shares = shamir.split(5, 9, rng.bytes(16))
    monkeypatch.setitem(shamir._STATE, "fast", False)
    assert shamir.consistent(shares, 5)
    bad = list(shares)
    bad[2] = (bad[2][0], bytes(16))
    assert not shamir.consistent(bad, 5)
