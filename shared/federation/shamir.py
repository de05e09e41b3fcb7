"""Shamir secret sharing of 16-byte secrets over GF(2^128): pycryptodome's scheme, at C speed.

What the shares are is pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` (the scheme
Flower's ``create_shares`` / ``combine_shares`` use): a random polynomial of degree
``threshold - 1`` over GF(2^128) (modulus ``x^128 + x^7 + x^2 + x + 1``) whose constant term
is the secret, share ``i`` its value at ``x = i``; a secret is rebuilt by Lagrange
interpolation at 0. For the same polynomial, :func:`split` gives byte for byte the shares
pycryptodome's ``Shamir.split`` gives, and :func:`combine` the secret its ``Shamir.combine``
gives (``tests/test_shamir.py`` checks both on random inputs).

Why: pycryptodome multiplies field elements in pure Python (about 25 us a product). A SecAgg+
client shares two secrets among its k + 1 neighbours (2 (k + 1) (t - 1) products: about 30 ms at
k = 30, t = 16, three quarters of its share-keys stage), and the server rebuilds one secret per
survivor (about 14 ms each: 943 of them a round in the default federation).

How: the field is the one AES-GCM's GHASH works in, and pycryptodome implements GHASH in C
(``Crypto.Cipher._mode_gcm._GHASH``, with the CPU's carry-less multiply where there is one).
GHASH with key ``H`` over blocks ``X_1..X_m`` is ``X_1 H^m + ... + X_m H``: Horner's rule, the
same evaluation ``Shamir.split`` does by hand. GCM writes a field element with the bits in the
opposite order (the first bit of the block is the coefficient of ``x^0``; pycryptodome's Shamir
reads the 16 bytes as a big-endian integer whose lowest bit is that coefficient), so each block
is bit-reversed on the way in and out. Nothing here computes a field product itself.

- :func:`split` draws the ``t - 1`` random coefficients with pycryptodome's own generator
  (``Crypto.Random.get_random_bytes``, what ``Shamir.split`` uses) and evaluates the polynomial
  at each public index with GHASH keyed by the index: the secret coefficients are GHASH's data,
  never its key (the key drives the table lookups of its portable C code).
- :func:`combine` weighs each share by its Lagrange coefficient at 0, a function of the public
  indices only, computed once per index set with pycryptodome's own field elements (product and
  inverse, cached), then one GHASH product per share with the coefficient as the key.

Where this module's first use in a process finds GHASH missing or not equal to pycryptodome's
Shamir on fresh random inputs (another pycryptodome version, say), it logs a warning and every
call goes to pycryptodome's pure-Python Shamir instead: the same results, slower.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from Crypto.Protocol.SecretSharing import Shamir, _Element
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


@functools.lru_cache(maxsize=4096)
def _lagrange_keys(indices: tuple[int, ...]) -> tuple[bytes, ...]:
    """GCM-encoded Lagrange coefficients at 0 for distinct public ``indices``:
    ``l_j = prod_{m != j} x_m / (x_j + x_m)`` (in characteristic 2, minus is plus), computed as
    pycryptodome's ``Shamir.combine`` computes them."""
    xs: list[Any] = [_Element(i) for i in indices]
    keys = []
    for j, xj in enumerate(xs):
        num: Any = _Element(1)
        den: Any = _Element(1)
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm
                den = den * (xj + xm)
        keys.append(_swap((num * den.inverse()).encode()))
    return tuple(keys)


def _combine_fast(shares: Sequence[tuple[int, bytes]]) -> bytes:
    indices = tuple(int(i) for i, _ in shares)
    keys = _lagrange_keys(indices)
    acc = 0
    for key, (_, value) in zip(keys, shares, strict=True):
        acc ^= int.from_bytes(_ghash(key, _swap(bytes(value))), "big")  # y_j * l_j
    return _swap(acc.to_bytes(BLOCK, "big"))


def _self_check() -> bool:
    """GHASH-based sharing equals pycryptodome's Shamir on fresh random inputs."""
    _STATE["ghash"] = _load_ghash()
    for t, n in ((1, 1), (2, 3), (5, 9), (16, 31)):
        secret = get_random_bytes(BLOCK)
        fast = _split_fast(t, n, secret)
        if _combine_fast(fast[:t]) != secret or _combine_fast(fast[-t:]) != secret:
            return False
        ref = Shamir.split(t, n, secret, ssss=False)
        if Shamir.combine(fast[-t:], ssss=False) != secret or _combine_fast(ref[:t]) != secret:
            return False
        # the same polynomial evaluates to the same bytes: a known one, through both paths
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


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The 16-byte secret whose shares these are (as many as the threshold; ``Shamir.combine``'s
    contract: fewer, or altered ones, give another value). Raises ValueError on a duplicate
    index, an index outside 1..2^32-1 or a share that is not 16 bytes."""
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
    if not fast():
        return Shamir.combine(list(shares), ssss=False)
    return _combine_fast(shares)
