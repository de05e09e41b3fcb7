"""Shamir secret sharing of 16-byte secrets over GF(2^128): pycryptodome's scheme, at C speed.

This is fedrec's own code for Shamir's split and combine, the one exception to "no
cryptographic code written here" in :mod:`.secagg`. What it computes is pycryptodome's
``Crypto.Protocol.SecretSharing.Shamir`` (the scheme Flower's ``create_shares`` /
``combine_shares`` use): a random polynomial of degree ``threshold - 1`` over GF(2^128)
(modulus ``x^128 + x^7 + x^2 + x + 1``) whose constant term is the secret, share ``i`` its value
at ``x = i``; a secret is rebuilt by Lagrange interpolation at 0. For the same polynomial,
:func:`split` gives byte for byte the shares ``Shamir.split`` gives, and :func:`combine` the
secret ``Shamir.combine`` gives, for any shares (``tests/test_shamir.py`` checks both on random
inputs, and this module checks them again at its first use in every process).

Why: pycryptodome multiplies field elements in pure Python (about 25 us a product). A SecAgg+
client shares two secrets among its k + 1 neighbours (about 2 (k + 1) (t - 1) products, 930 at
k = 30, t = 16: most of its share-keys stage), and the server rebuilds one secret per survivor
(about 20 ms each at t = 16; up to 943 a round in the default federation).

How: the field is the one AES-GCM's GHASH works in, and pycryptodome implements GHASH in C
(its private ``Crypto.Cipher._mode_gcm._GHASH``, on the CPU's carry-less multiply where there
is one). GHASH with key ``H`` over blocks ``X_1..X_m`` is ``X_1 H^m + ... + X_m H``: Horner's
rule, the evaluation ``Shamir.split`` does by hand. GCM writes a field element with the bits in
the opposite order (the first bit of the block is the coefficient of ``x^0``; pycryptodome's
Shamir reads the 16 bytes as a big-endian integer whose lowest bit is that coefficient), so each
block is bit-reversed on the way in and out. The field products all run in pycryptodome's C
code (and the one inversion per index set in its ``_Element``); what is written here is the
polynomial evaluation and interpolation around them, additions (XOR) and the bit order.

- :func:`split` draws the ``t - 1`` random coefficients with pycryptodome's own generator
  (``Crypto.Random.get_random_bytes``, what ``Shamir.split`` uses, in the same number and
  order) and evaluates the polynomial at each public index with GHASH keyed by the index.
- :func:`combine` weighs each share by its Lagrange coefficient at 0, a function of the public
  indices only (computed on GHASH with one inversion, cached per index set), one GHASH product
  per share with the coefficient as the key.
- :func:`consistent` checks further shares against the polynomial the first ``t`` fix (the
  server's check of a node's shares when it has more than ``t`` and no commitment).

Secret values (coefficients, shares) are only ever GHASH's data, never its key; the key is
always public (an index or a Lagrange coefficient). The CLMUL code is constant-time in both;
the portable C code builds its tables from the key and reads them by the data's bits with
pycryptodome's cache-timing defence, so the data is the side meant to be secret. The Python
around it (the bit reversal by table lookup, integer XOR) is no more constant-time than
pycryptodome's pure-Python Shamir, which it replaces; neither is hardened against timing.

Where this module's first use in a process finds GHASH (or ``_Element``) missing or not equal to
pycryptodome's Shamir on fresh random inputs (another pycryptodome version, say), it logs a
warning and every call goes to pycryptodome's pure-Python Shamir instead: the same results,
slower.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Random import get_random_bytes

BLOCK = 16
_REV = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))  # each byte's bits reversed
_ZERO = bytes(BLOCK)
_STATE: dict[str, Any] = {}  # "fast": bool, decided at first use; "ghash": (class, C module)


def _swap(block: bytes) -> bytes:
    """pycryptodome's Shamir encoding <-> GCM's block (an involution): the 128 bits reversed."""
    return bytes(_REV[b] for b in reversed(block))


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(BLOCK, "big")


def _ghash(key: bytes, data: bytes) -> bytes:
    """GCM-encoded ``X_1 H^m + ... + X_m H`` for ``data`` = ``X_1..X_m``, ``key`` = ``H``."""
    cls, impl = _STATE["ghash"]
    return bytes(cls(key, impl).update(data).digest())


def _load_ghash() -> tuple[Any, Any]:
    from Crypto.Cipher import _mode_gcm

    gcm: Any = _mode_gcm  # private names, no stubs: the self-check vouches for them
    return gcm._GHASH, getattr(gcm, "_ghash_clmul", None) or gcm._ghash_portable


def _index_key(i: int) -> bytes:
    return _swap(i.to_bytes(BLOCK, "big"))


def _split_fast(threshold: int, num: int, secret: bytes) -> list[tuple[int, bytes]]:
    coeffs = [get_random_bytes(BLOCK) for _ in range(threshold - 1)]  # highest degree first
    data = b"".join(_swap(c) for c in coeffs)
    const = _swap(secret)
    out = []
    for i in range(1, num + 1):
        # Horner over the random coefficients gives sum c_j i^(t-1-j) with every power >= 1;
        # adding the secret (the constant term) is an XOR
        y = _ghash(_index_key(i), data) if data else _ZERO
        out.append((i, _swap(_xor(y, const))))
    return out


_ONE = _swap((1).to_bytes(BLOCK, "big"))  # GCM-encoded 1


def _mul(a: bytes, b: bytes) -> bytes:
    """GCM-encoded product of two PUBLIC field elements (``b`` becomes GHASH's key)."""
    return _ghash(b, a)


def _inverse(a: bytes) -> bytes:
    """GCM-encoded inverse of a public nonzero element, by pycryptodome's ``_Element``."""
    from Crypto.Protocol.SecretSharing import _Element  # private: inside the checked path

    element: Any = _Element(_swap(a))
    return _swap(element.inverse().encode())


@functools.lru_cache(maxsize=4096)
def _lagrange_keys(indices: tuple[int, ...], at: int = 0) -> tuple[bytes, ...]:
    """GCM-encoded Lagrange basis values at ``at`` for distinct public ``indices``:
    ``L_j(at) = prod_{m != j} (at + x_m) / (x_j + x_m)`` (characteristic 2: minus is plus; at 0,
    ``x_m / (x_j + x_m)``, as ``Shamir.combine`` weighs its shares). Only public values enter:
    the products run on GHASH, the t denominators are inverted together (one inversion)."""
    xs = [_index_key(i) for i in indices]
    a = _index_key(at) if at else _ZERO
    nums, dens = [], []
    for j, xj in enumerate(xs):
        num, den = _ONE, _ONE
        for m, xm in enumerate(xs):
            if m != j:
                num = _mul(num, _xor(a, xm))
                den = _mul(den, _xor(xj, xm))
        nums.append(num)
        dens.append(den)
    # batch inversion: prefix products, one inverse, then back to front
    prefix = [_ONE]
    for d in dens:
        prefix.append(_mul(prefix[-1], d))
    inv = _inverse(prefix[-1])
    out: list[bytes] = [b""] * len(xs)
    for j in range(len(xs) - 1, -1, -1):
        out[j] = _mul(nums[j], _mul(inv, prefix[j]))  # num_j / den_j
        inv = _mul(inv, dens[j])
    return tuple(out)


def _interpolate(shares: Sequence[tuple[int, bytes]], at: int) -> bytes:
    """GCM-encoded value at ``at`` of the polynomial through ``shares``: sum_j y_j L_j(at),
    the share values (secret) as GHASH's data, the public basis values as its key."""
    keys = _lagrange_keys(tuple(int(i) for i, _ in shares), at)
    acc = 0
    for key, (_, value) in zip(keys, shares, strict=True):
        acc ^= int.from_bytes(_ghash(key, _swap(bytes(value))), "big")
    return acc.to_bytes(BLOCK, "big")


def _combine_fast(shares: Sequence[tuple[int, bytes]]) -> bytes:
    return _swap(_interpolate(shares, 0))


def _self_check() -> bool:
    """GHASH-based sharing equals pycryptodome's Shamir on fresh random inputs."""
    _STATE["ghash"] = _load_ghash()
    for t, n in ((1, 1), (2, 3), (5, 9), (16, 31)):
        secret = get_random_bytes(BLOCK)
        fast = _split_fast(t, n, secret)
        if _combine_fast(fast[:t]) != secret or _combine_fast(fast[-t:]) != secret:
            return False
        if any(_swap(_interpolate(fast[:t], i)) != y for i, y in fast[t:]):
            return False
        ref = Shamir.split(t, n, secret, ssss=False)
        if Shamir.combine(fast[-t:], ssss=False) != secret or _combine_fast(ref[:t]) != secret:
            return False
        # the same polynomial evaluates to the same bytes: a known one, through both paths
        from Crypto.Protocol.SecretSharing import _Element

        x: Any = _Element(7)
        coeffs: list[Any] = [_Element(get_random_bytes(BLOCK)) for _ in range(t - 1)]
        coeffs.append(_Element(secret))
        want: Any = _Element(0)
        for c in coeffs:
            want = x * want + c
        data = b"".join(_swap(c.encode()) for c in coeffs[:-1])
        got = _xor(_ghash(_index_key(7), data) if data else _ZERO, _swap(secret))
        if _swap(got) != want.encode():
            return False
    return True


def fast() -> bool:
    """Whether this process uses the GHASH path (decided, and logged if not, at first use)."""
    if "fast" not in _STATE:
        try:
            ok = _self_check()
            why = "it disagreed with pycryptodome's Shamir on random inputs"
        except Exception as err:  # noqa: BLE001 - any failure: the reference path instead
            ok, why = False, f"{type(err).__name__}: {err}"
        if not ok:
            logging.getLogger("fedrec.secagg").warning(
                "Shamir sharing falls back to pycryptodome's pure-Python Shamir (slower, same "
                "results): its C GF(2^128) multiply (GHASH) is not usable here (%s)",
                why,
            )
        _STATE["fast"] = ok
    return bool(_STATE["fast"])


def split(threshold: int, num: int, secret: bytes) -> list[tuple[int, bytes]]:
    """``num`` shares ``(i, 16 bytes)``, ``i = 1..num``, of a 16-byte ``secret``; any
    ``threshold`` of them rebuild it (``Shamir.split(threshold, num, secret)``'s contract)."""
    if len(secret) != BLOCK:
        raise ValueError(f"the secret must be {BLOCK} bytes")
    if not 1 <= threshold <= num:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= shares ({num})")
    if num >= 2**32:
        raise ValueError("too many shares")
    if not fast():
        return Shamir.split(threshold, num, secret, ssss=False)
    return _split_fast(threshold, num, secret)


def _check_shares(shares: Sequence[tuple[int, bytes]]) -> None:
    seen = set()
    for i, value in shares:
        if not isinstance(i, int) or not 1 <= i < 2**32:
            raise ValueError(f"bad share index {i!r}")
        if i in seen:
            raise ValueError("Duplicate share")
        if len(value) != BLOCK:
            raise ValueError(f"a share must be {BLOCK} bytes")
        seen.add(i)
    if not shares:
        raise ValueError("no shares")


def _interpolate_reference(shares: Sequence[tuple[int, bytes]], at: int) -> bytes:
    """:func:`_interpolate` with pycryptodome's pure-Python field elements (the fallback)."""
    from Crypto.Protocol.SecretSharing import _Element

    xs: list[Any] = [_Element(int(i)) for i, _ in shares]
    a: Any = _Element(at)
    acc: Any = _Element(0)
    for j, (_, value) in enumerate(shares):
        num: Any = _Element(1)
        den: Any = _Element(1)
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (a + xm)
                den = den * (xs[j] + xm)
        acc = acc + _Element(bytes(value)) * num * den.inverse()
    return _swap(acc.encode())


def consistent(shares: Sequence[tuple[int, bytes]], threshold: int) -> bool:
    """Whether all ``shares`` lie on one polynomial of degree below ``threshold``: the first
    ``threshold`` fix it, and each further share must be its value at that share's index.

    With more than ``threshold`` shares, one altered share always shows: altered among the
    first ``threshold`` (index ``x_j``), the polynomial moves by a multiple of ``L_j``, whose
    only roots are the other first indices, so every further share disagrees; altered among the
    further ones, it disagrees itself. (Comparing two threshold-subsets' secrets does not do
    this: an index in both can carry the same Lagrange weight in each, and then one altered
    share moves both secrets alike.) Raises ValueError as :func:`combine` does, and when there
    are fewer than ``threshold`` shares."""
    _check_shares(shares)
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, fewer than the threshold {threshold}")
    first = list(shares[:threshold])
    for i, value in shares[threshold:]:
        want = _interpolate(first, i) if fast() else _interpolate_reference(first, i)
        if _swap(want) != bytes(value):
            return False
    return True


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The 16-byte secret whose shares these are (as many as the threshold; ``Shamir.combine``'s
    contract: fewer, or altered ones, give another value). Raises ValueError on a duplicate
    index, an index outside 1..2^32-1 or a share that is not 16 bytes."""
    _check_shares(shares)
    if not fast():
        return Shamir.combine(list(shares), ssss=False)
    return _combine_fast(shares)
