"""SecAgg+ secure aggregation, the cryptographic core (no Flower messaging).

The protocol of Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead" (CCS 2020), in its honest-but-curious form, as two plain
classes: :class:`SecAggClient` (one per node; its whole state goes through :meth:`to_state` /
:meth:`from_state`, a flat dict a Flower ``ConfigRecord`` can hold, so it lives in the client's
``context.state`` between messages) and :class:`SecAggServer` (one per round). The lead's
Message-API wiring moves their arguments and results between the two.

No cryptographic primitive is written here: they come from Flower's own SecAgg+ primitives
(the ones its legacy ``secaggplus_mod`` / ``SecAggPlusWorkflow`` use), from pycryptodome and
from ``cryptography`` (X25519, HKDF, AES). What is written here is how they are combined. The
one exception is :mod:`.shamir`: fedrec's own code for pycryptodome's Shamir scheme on
pycryptodome's C field multiply, checked byte for byte against ``Shamir`` in the tests and at
first use, with ``Shamir`` itself as the fallback.

- key pairs: X25519 (``cryptography``; RFC 7748, raw 32-byte keys), where Flower's helpers use
  ECDH on NIST P-384: the same Diffie-Hellman role at the 128-bit level the rest of the protocol
  has (16-byte seeds, AES-128 in Fernet), and about 7x cheaper (an agreement 0.06 ms against
  0.41 ms, two per neighbour per round on every device; a parsed private key 0.2 ms less). The
  pairwise-mask key ``sk1`` is derived from a fresh 16-byte seed (HKDF-SHA256 to the 32 bytes of
  an X25519 private key), so that what is secret-shared is that seed;
- agreement (:func:`agree`): X25519 + HKDF-SHA256 to 32 bytes, urlsafe base64 (the format of
  Flower's ``generate_shared_key``, a Fernet key), with a different HKDF ``info`` for the
  share-encryption key and for the pairwise-mask seed; an exchange that yields the all-zero
  secret (a small-order public key) is refused;
- share encryption: Flower's ``encrypt`` / ``decrypt`` (Fernet: AES-128-CBC + HMAC-SHA256,
  so a tampered or misrouted ciphertext fails authentication), the plaintext built by
  ``share_keys_plaintext_concat`` which binds the source and destination node ids;
- secret sharing: pycryptodome's Shamir over GF(2^128) (what Flower's ``create_shares`` /
  ``combine_shares`` wrap), on the two 16-byte secrets (the self-mask seed ``b`` and the mask
  key's seed) as one block each, in Flower's share format (a 4-byte index, then the 16-byte
  share). Flower's wrappers PKCS#7-pad every secret, so a 16-byte secret became two blocks and
  a 48-byte P-384 scalar four. 128-bit seeds keep the protocol at the 128-bit level (AES-128
  in Fernet). pycryptodome multiplies in GF(2^128) in pure Python, which made the split most
  of a client's share-keys cost and the combination (about 20 ms at t = 16) most of the
  server's unmasking: :mod:`.shamir` computes the same scheme, with the same shares for the
  same polynomial, on pycryptodome's C multiply in that field (its GHASH), and falls back to
  pycryptodome's ``Shamir`` where that is not usable.
  The server checks a rebuilt ``b`` against the SHA-256 commitment the node sent with its
  share-keys reply (:func:`seed_commitment`; one Shamir combination, and an altered share shows
  even when exactly ``t`` shares are at hand), and a rebuilt ``sk1`` against the node's public
  key.

One deliberate difference: the mask expansion. Flower's ``pseudo_rand_gen`` XOR-folds the seed
into 32 bits and seeds NumPy's MT19937 with it. MT19937 is not a cryptographic generator and 32
bits of seed are brute-forceable: a server holding ``y = x + PRG(b) + ...`` could try all 2^32
self-mask seeds and strip the self mask (the pairwise masks likewise), which defeats the
protocol. :func:`prg` instead derives an AES-256 key with HKDF-SHA256 from the full seed (the
16-byte self-mask seed, or the X25519 agreed key), with a domain-separation ``info``
(:data:`SELF_MASK_INFO` / :data:`PAIR_MASK_INFO`, so a self-mask stream and a pairwise stream
never coincide even for equal seeds), and runs AES in CTR mode over zero bytes. The nonce is
fixed (all zeros): a CTR key must never encrypt two different streams under one nonce, and
here each derived key expands exactly one stream per round, since key pairs and self-mask seeds
are fresh every round. Each value takes 8 bytes of keystream masked to ``bits``: exactly uniform
on ``[0, 2**bits)`` because ``2**bits`` divides ``2**64``.

Arithmetic: vectors are 1-D ``numpy.uint64`` arrays with values in ``[0, 2**bits)``,
``1 <= bits <= 62``. Sums and differences are computed in uint64, which wraps mod ``2**64``;
since ``2**bits`` divides ``2**64``, masking the result with ``2**bits - 1`` gives the result
mod ``2**bits`` exactly.

The round, step by step (``t`` the Shamir threshold, ``k`` the neighbour count):

1. The server fixes the cohort and the neighbour graph (:func:`neighbour_graph`: a seeded
   shuffled ring where each node's neighbours are the ``k // 2`` nodes on each side; with
   ``k >= len(cohort) - 1`` the complete graph, i.e. plain SecAgg). A node's *group* is itself +
   its neighbours (``k + 1`` nodes).
2. ``setup``: every client makes two key pairs, ``(pk1, sk1)`` for pairwise masks and
   ``(pk2, sk2)`` for encrypting shares, and returns ``(pk1, pk2)``.
3. ``share-keys``: :meth:`SecAggServer.group_keys_for` gives each client the keys of its group
   members that replied (itself included). A node whose group has fewer than ``t`` repliers is
   out of the round (an empty dict: send it nothing); removing it can push a neighbour below
   ``t`` too, so the rule is applied until nothing changes. The client draws a 16-byte
   self-mask seed ``b``, Shamir-shares ``b`` and ``sk1``'s seed (threshold ``t``, one share per
   group member in sorted node-id order: member ``i`` gets share index ``i + 1``), keeps its shares
   and encrypts each neighbour's pair under X25519(``sk2``, neighbour's ``pk2``).
4. ``masked-input``: :meth:`SecAggServer.route` forwards each ciphertext to its destination,
   among the nodes that completed share-keys. The client decrypts and checks them, needs at
   least ``t - 1`` of them, and returns
   ``y = x + PRG(b) + sum_j sign(i, j) PRG(X25519(sk1_i, pk1_j)) mod 2**bits`` over the neighbours
   ``j`` it received a ciphertext from (``sign = +1`` if ``i > j`` else ``-1``). The server
   forwards a ciphertext only when both ends completed share-keys, so "i masks with j" and
   "j masks with i" always agree and the pairwise masks of two survivors cancel in the sum.
5. ``unmask``: :meth:`SecAggServer.unmask_request` tells each survivor (a node that sent ``y``)
   which of its group members survived and which dropped (completed share-keys, sent no ``y``).
   The client returns its ``b`` share of each survivor and its ``sk1`` share of each dropped
   node. It refuses a request naming one node in both lists: with both ``b`` and ``sk1`` of a
   node the server could remove all of that node's masks and read its ``x``. This is the core
   invariant; the server never asks for it (the survivor set is fixed at the first request),
   and the client checks it anyway, answers one unmask request per round, and wipes its
   secrets afterwards.
6. :meth:`SecAggServer.aggregate` rebuilds each survivor's ``b`` and each dropped node's ``sk1``
   from ``t`` shares, subtracts the self masks and the dropped nodes' pairwise masks with their
   survivor neighbours, and returns the sum of the survivors' ``x`` mod ``2**bits``. With fewer
   than ``t`` shares for any node, or fewer than ``min_survivors`` survivors, it raises
   :class:`BelowThreshold` and releases nothing.

Threat model and limits: the server is honest-but-curious (it follows the protocol and the
checks above keep it from learning more than the sum even if it tries to read replies it should
not get); fewer than ``t`` colluding members of a group learn nothing of a member's secrets (the
default ``t`` is a strict majority of the group). Not covered: a malicious server that asks
*different* clients for different share kinds of one node, forges public keys (no PKI/signed
keys) or chooses the graph (the paper's consistency-check round, signatures and verifiable
graph are not implemented); Sybil clients. ``min_survivors`` bounds how few inputs a released
sum may contain (the sum of one input is that input).

Errors: :class:`SecAggError` (a ``ValueError``) for protocol violations (bad keys, misrouted or
tampered ciphertexts, unknown nodes, malformed replies, calls out of order), each naming the
node; :class:`BelowThreshold` (a ``ValueError``) when a threshold is not met. A method that
raises leaves the object unchanged (nothing is released by a refused call).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedrec.shared.federation import shamir

SELF_MASK_INFO = b"fedrec-secagg-selfmask"
PAIR_MASK_INFO = b"fedrec-secagg-pairmask"
SEED_BYTES = 16  # the self-mask seed b and the mask key's seed: one Shamir block each
MASK_KEY_INFO = b"fedrec-secagg-maskkey"
ENC_KEY_INFO = b"fedrec-secagg-enckey"  # agree(sk2, pk2'): the Fernet key of a pair's shares
PAIR_SEED_INFO = b"fedrec-secagg-pairseed"  # agree(sk1, pk1'): the pairwise-mask seed
KEY_BYTES = 32  # X25519 public and private keys, raw
MAX_BITS = 62
_CTR_NONCE = bytes(16)  # fixed: every derived key expands a single stream (fresh keys per round)
_MAX_NODE_ID = 2**64 - 1  # Flower node ids are uint64 (and share_keys_plaintext_concat packs 8 B)

# client stages, in order; a method runs only right after the previous one
STAGE_INIT = "init"
STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share-keys"
STAGE_MASKED_INPUT = "masked-input"
STAGE_DONE = "unmask"  # unmask answered: secrets wiped, nothing more to give
CLIENT_STAGES = (STAGE_INIT, STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT, STAGE_DONE)

GroupKeys = dict[int, tuple[bytes, bytes]]


class SecAggError(ValueError):
    """A protocol violation: bad keys, misrouted ciphertexts, unknown nodes, bad replies."""


class BelowThreshold(ValueError):
    """Too few shares (below the Shamir threshold) or too few survivors: nothing is released."""


# ---------------------------------------------------------------------------------- primitives


def prg(seed: bytes, dim: int, bits: int, info: bytes) -> np.ndarray:
    """``dim`` uint64 values uniform on ``[0, 2**bits)``, expanded from ``seed`` by AES-256-CTR.

    The AES key is HKDF-SHA256(``seed``, ``info``); ``info`` separates the uses
    (:data:`SELF_MASK_INFO`, :data:`PAIR_MASK_INFO`). Deterministic in (seed, info, dim, bits);
    a prefix-consistent stream (a longer ``dim`` extends a shorter one).
    """
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError("prg: the seed must be at least 16 bytes")
    if not isinstance(info, bytes) or not info:
        raise ValueError("prg: info (domain separation) must be non-empty bytes")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
        raise ValueError(f"prg: dim must be a non-negative int, got {dim!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"prg: bits must be in [1, 64], got {bits!r}")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(_CTR_NONCE)).encryptor()
    stream = encryptor.update(bytes(8 * dim)) + encryptor.finalize()
    out = np.frombuffer(stream, dtype="<u8").astype(np.uint64)  # a writable native copy
    out &= np.uint64((1 << bits) - 1)
    return out


def mask_key(seed: bytes, binding: bytes) -> x25519.X25519PrivateKey:
    """The pairwise-mask private key ``sk1`` (X25519) derived from a 16-byte seed:
    HKDF-SHA256 to 32 bytes, the private key itself (X25519 clamps any 32 bytes into a valid
    scalar, RFC 7748). ``binding`` (the node's fresh ``pk2`` of the same round) goes into HKDF's
    info, so each published ``pk1`` is a separate 128-bit search: no batch search over many
    nodes' keys at once."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"mask_key: the seed must be {SEED_BYTES} bytes")
    if not isinstance(binding, bytes) or not binding:
        raise ValueError("mask_key: binding (the node's pk2) must be non-empty bytes")
    info = MASK_KEY_INFO + b"|" + binding
    okm = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(seed)
    return x25519.X25519PrivateKey.from_private_bytes(okm)


def new_key_pair() -> tuple[x25519.X25519PrivateKey, bytes]:
    """A fresh X25519 private key and its raw 32-byte public key."""
    sk = x25519.X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: x25519.X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


def private_key(raw: bytes) -> x25519.X25519PrivateKey:
    """An X25519 private key from its raw 32 bytes (as the client state keeps it)."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise SecAggError(f"a private key must be {KEY_BYTES} raw bytes")
    return x25519.X25519PrivateKey.from_private_bytes(raw)


def agree(sk: x25519.X25519PrivateKey, pk: bytes, info: bytes) -> bytes:
    """X25519 with ``pk`` (raw bytes), then HKDF-SHA256 with ``info`` to 32 bytes, urlsafe
    base64 (a Fernet key, the format of Flower's ``generate_shared_key``). Symmetric in the two
    parties. A small-order ``pk`` (the all-zero shared secret, which ``cryptography`` refuses)
    raises :class:`SecAggError`."""
    try:
        shared = sk.exchange(x25519.X25519PublicKey.from_public_bytes(pk))
    except ValueError as err:
        raise SecAggError(f"key agreement failed ({err}): a small-order or malformed key") from None
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return base64.urlsafe_b64encode(key)


def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares (pycryptodome, GF(2^128)) of a 16-byte secret: ``num`` shares, any
    ``threshold`` rebuild it; share ``i`` (1-based) is ``i`` (4 bytes, little-endian) + 16
    bytes, Flower's share format."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"split_secret: the secret must be {SEED_BYTES} bytes")
    return [i.to_bytes(4, "little") + sh for i, sh in shamir.split(threshold, num, secret)]


def combine_secret(shares: Sequence[bytes]) -> bytes:
    """The 16-byte secret from shares of :func:`split_secret` (at least the threshold of them;
    fewer, or altered ones, give a different value). The server checks a rebuilt mask key
    against its public key, and a rebuilt self-mask seed against the node's commitment (or, for
    a node that sent none, checks that all its shares lie on one polynomial when it holds more
    than the threshold: :func:`shares_consistent`)."""
    return shamir.combine([(int.from_bytes(sh[:4], "little"), sh[4:20]) for sh in shares])


def shares_consistent(shares: Sequence[bytes], threshold: int) -> bool:
    """Whether shares of :func:`split_secret` all lie on one polynomial of degree below
    ``threshold`` (:func:`.shamir.consistent`: with more than ``threshold`` of them, one altered
    share always shows)."""
    return shamir.consistent(
        [(int.from_bytes(sh[:4], "little"), sh[4:20]) for sh in shares], threshold
    )


def _combine_or_none(shares: Sequence[bytes]) -> bytes | None:
    """:func:`combine_secret`, or None where it raises ValueError (in this process)."""
    try:
        return combine_secret(shares)
    except ValueError:
        return None


def _combine_reference_or_none(shares: Sequence[bytes]) -> bytes | None:
    """pycryptodome's ``Shamir.combine`` of :func:`split_secret` shares, or None where it
    raises ValueError: a pool worker's job. The pool is the fallback path's (see
    :data:`PARALLEL_COMBINE_MIN`), and a spawned worker would otherwise make its own choice."""
    from Crypto.Protocol.SecretSharing import Shamir

    try:
        return Shamir.combine(
            [(int.from_bytes(sh[:4], "little"), sh[4:20]) for sh in shares], ssss=False
        )
    except ValueError:
        return None


# The pool is for pycryptodome's pure-Python Shamir.combine (about 10-20 ms for a threshold of
# 15; the unmask stage combines one secret per survivor, up to 943 a round), which .shamir falls
# back to where its C path is not usable; on that path (about 0.3 ms a secret) the secrets are
# combined in this process. Below this many secrets a round combines them in its own process
# either way: starting workers would cost more than it saves. The shares and the rebuilt
# secrets go to the worker processes (children of the server process, same host, through pipes)
# and back; nothing is written anywhere.
PARALLEL_COMBINE_MIN = 64
MAX_COMBINE_WORKERS = 8
_POOL: Any = None  # (pool, pid of the process that made it)
_POOL_FAILED = False  # a pool failed once in this process: combine here from then on


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # the CPUs this process may use (cgroups, affinity)
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return min(n, MAX_COMBINE_WORKERS)


def _combine_pool(workers: int) -> Any:
    """A process pool kept for the process' life (spawned: safe beside Ray's and gRPC's threads;
    rebuilt in a forked child, which must not use its parent's)."""
    global _POOL
    if _POOL is not None and _POOL[1] != os.getpid():
        _POOL = None
    if _POOL is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        _POOL = (pool, os.getpid())
    return _POOL[0]


def _drop_pool() -> None:
    global _POOL
    if _POOL is not None and _POOL[1] == os.getpid():
        _POOL[0].shutdown(wait=False, cancel_futures=True)
    _POOL = None


def combine_many(
    groups: Sequence[Sequence[bytes]], *, workers: int | None = None
) -> list[bytes | None]:
    """:func:`combine_secret` of each group of shares (None where a group does not combine):
    here when :func:`.shamir.fast`, else in a pool of ``workers`` processes (default: the CPUs
    this process may use, at most :data:`MAX_COMBINE_WORKERS`) when there are at least
    :data:`PARALLEL_COMBINE_MIN` groups and more than one worker; otherwise here. The same
    combination either way: only where it runs changes. If the pool cannot start, fails or
    takes too long (at least 60 s, 0.2 s a secret), the secrets are combined here, a warning
    says why, and this process does not try a pool again. The caller checks every secret
    (commitments, public keys) either way."""
    global _POOL_FAILED
    n = _workers() if workers is None else workers
    if n < 2 or len(groups) < PARALLEL_COMBINE_MIN or _POOL_FAILED or shamir.fast():
        return [_combine_or_none(g) for g in groups]
    try:
        pool = _combine_pool(n)
        chunk = max(1, len(groups) // (4 * n))
        work = [list(g) for g in groups]
        timeout = max(60.0, 0.2 * len(groups))
        return list(pool.map(_combine_reference_or_none, work, chunksize=chunk, timeout=timeout))
    except Exception as err:  # noqa: BLE001 - any pool failure: combine here instead
        _POOL_FAILED = True
        _drop_pool()
        import logging

        logging.getLogger("fedrec.secagg").warning(
            "combining %d Shamir secrets in this process from now on: the worker pool failed "
            "(%s: %s)",
            len(groups),
            type(err).__name__,
            err,
        )
        return [_combine_or_none(g) for g in groups]


# a fixed private key that only probes public keys for small order (the server, at setup)
_PROBE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, KEY_BYTES + 1)))


COMMIT_INFO = b"fedrec-secagg-seedcommit|"


def seed_commitment(node: int, pk2: bytes, seed: bytes) -> bytes:
    """SHA-256 of the node's self-mask seed ``b``, with a label, its node id and its fresh
    ``pk2`` of the round (so a guess can be tested against one commitment only, not against a
    node's commitments of every round at once): sent with its share-keys reply, so that the
    server can check a ``b`` rebuilt from exactly ``threshold`` shares (an altered share shows)
    with one Shamir combination. Hiding: for a survivor the server learns ``b`` at unmasking
    anyway (the protocol); for a node that dropped before masking, ``b`` stays hidden by
    SHA-256's preimage resistance over 128 uniform bits used once."""
    return hashlib.sha256(
        COMMIT_INFO + node.to_bytes(8, "little") + len(pk2).to_bytes(2, "little") + pk2 + seed
    ).digest()


@functools.lru_cache(maxsize=8192)  # a round's server checks each key a few times
def key_fingerprint(pk: bytes) -> bytes:
    """What a public key is as far as X25519 agreement goes: ``X25519(probe, pk)`` for a fixed
    private key. X25519 ignores the top bit of an encoding, reduces non-canonical u-coordinates
    mod p and clears the cofactor, so different byte strings can be the same key for every
    honest client (the top bit flipped, u + p, a small-order point added); they all have one
    fingerprint. Keys are told apart by it, never by their bytes: a colluder who re-encodes an
    honest node's pk1 must not pass for a distinct node, or its masks would cancel that node's
    pairwise masks. A small-order key (the all-zero result) raises :class:`SecAggError`."""
    try:
        return _PROBE.exchange(x25519.X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise SecAggError("a small-order or malformed X25519 key") from None


def _pair_seed(sk1: x25519.X25519PrivateKey, pk1: bytes) -> bytes:
    """The pairwise-mask seed: X25519 + HKDF agreement (symmetric in the two parties)."""
    return agree(sk1, pk1, PAIR_SEED_INFO)


def _modmask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return bits


def _is_node_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_NODE_ID


def _check_cohort(cohort: Iterable[Any]) -> list[int]:
    nodes = list(cohort)
    bad = [n for n in nodes if not _is_node_id(n)]
    if bad:
        raise ValueError(f"cohort: node ids must be ints in [0, 2**64), got {bad[:5]!r}")
    if len(set(nodes)) != len(nodes):
        raise ValueError("cohort: duplicate node ids")
    if len(nodes) < 2:
        raise ValueError(f"cohort: need at least 2 nodes, got {len(nodes)}")
    return nodes


def neighbour_graph(cohort: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """SecAgg+'s sparse communication graph: node -> sorted neighbours (itself excluded).

    A seeded "Harary-like" ring: the cohort (sorted, so the result does not depend on its input
    order) is shuffled with ``random.Random(seed)``; each node's neighbours are the ``k // 2``
    nodes on each side of it in the ring, so the graph is ``k``-regular and symmetric. ``k``
    must be even; with ``k >= len(cohort) - 1`` the graph is complete (plain SecAgg).
    The graph is public; the shuffle needs no cryptographic randomness against an
    honest-but-curious server.
    """
    nodes = _check_cohort(cohort)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    n = len(nodes)
    if k >= n - 1:
        return {v: sorted(u for u in nodes if u != v) for v in nodes}
    if k < 2 or k % 2:
        raise ValueError(f"k must be even and >= 2 (or >= cohort size - 1), got {k}")
    ring = sorted(nodes)
    random.Random(seed).shuffle(ring)
    half = k // 2
    return {
        v: sorted(ring[(i + off) % n] for off in range(-half, half + 1) if off != 0)
        for i, v in enumerate(ring)
    }


def default_threshold(k_plus_one: int) -> int:
    """Shamir threshold for a group of ``k_plus_one`` nodes: a strict majority, at least 2."""
    if isinstance(k_plus_one, bool) or not isinstance(k_plus_one, int) or k_plus_one < 2:
        raise ValueError(f"group size must be an int >= 2, got {k_plus_one!r}")
    return k_plus_one // 2 + 1


def _check_threshold(threshold: Any, group_size: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"threshold must be an int, got {threshold!r}")
    if not 2 <= threshold <= group_size:
        raise ValueError(f"threshold must be in [2, {group_size}] (group size), got {threshold}")
    return threshold


def _check_vector(v: Any, dim: int | None, bits: int, what: str) -> np.ndarray:
    """A 1-D integer vector with values in [0, 2**bits): returned as uint64 (a copy)."""
    if not isinstance(v, np.ndarray):
        raise SecAggError(f"{what}: expected a numpy array, got {type(v).__name__}")
    if v.ndim != 1 or v.size == 0:
        raise SecAggError(f"{what}: expected a non-empty 1-D vector, got shape {v.shape}")
    if dim is not None and v.shape != (dim,):
        raise SecAggError(f"{what}: expected shape ({dim},), got {v.shape}")
    if not np.issubdtype(v.dtype, np.integer):
        raise SecAggError(f"{what}: expected an integer dtype, got {v.dtype}")
    if np.issubdtype(v.dtype, np.signedinteger) and int(v.min()) < 0:
        raise SecAggError(f"{what}: negative values")
    if int(v.max()) >= 1 << bits:
        raise SecAggError(f"{what}: values must be < 2**{bits}")
    return v.astype(np.uint64, copy=True)


def _check_share(share: Any, index: int, owner: int, holder: int) -> bytes:
    """A Shamir share of a 16-byte secret: 4-byte little-endian index, then 16 bytes."""
    if not isinstance(share, bytes) or len(share) != 4 + SEED_BYTES:
        raise SecAggError(f"node {holder}: malformed share of node {owner}")
    got = int.from_bytes(share[:4], "little", signed=False)
    if got != index:
        raise SecAggError(
            f"node {holder}: share of node {owner} has index {got}, expected {index} "
            "(its position in the owner's share group)"
        )
    return share


def _parse_public_key(pk: Any, who: str) -> x25519.X25519PublicKey:
    if not isinstance(pk, bytes):
        raise SecAggError(f"{who}: a public key must be bytes, got {type(pk).__name__}")
    if len(pk) != KEY_BYTES:
        raise SecAggError(
            f"{who}: unreadable public key (X25519 keys are {KEY_BYTES} bytes, got {len(pk)})"
        )
    try:
        return x25519.X25519PublicKey.from_public_bytes(pk)
    except ValueError as err:
        raise SecAggError(f"{who}: unreadable public key ({err})") from None


def _key_pair(v: Any, who: str) -> tuple[bytes, bytes]:
    if not isinstance(v, tuple | list) or len(v) != 2:
        raise SecAggError(f"{who}: expected (pk1, pk2), got {type(v).__name__}")
    pk1, pk2 = v
    _parse_public_key(pk1, who)
    _parse_public_key(pk2, who)
    return (pk1, pk2)


# ---------------------------------------------------------------------------------- the client


class SecAggClient:
    """One node's side of a SecAgg+ round; call the stages in order, one each per round.

    Between messages keep ``client.to_state()`` (a flat dict for a Flower ``ConfigRecord``) and
    continue with ``SecAggClient.from_state(...)``. A stage that raises changes nothing.
    """

    def __init__(self, node_id: int, *, bits: int, threshold: int) -> None:
        if not _is_node_id(node_id):
            raise ValueError(f"node_id must be an int in [0, 2**64), got {node_id!r}")
        self.node_id = node_id
        self.bits = _check_bits(bits)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise ValueError(f"threshold must be an int >= 2, got {threshold!r}")
        self.threshold = threshold
        self._wipe()
        self.stage = STAGE_INIT

    def _wipe(self) -> None:
        self.sk1 = self.pk1 = self.sk2 = self.pk2 = b""
        self.seed = self.sk1_seed = b""
        self.group: GroupKeys = {}  # node -> (pk1, pk2), itself included
        self.b_shares: dict[int, bytes] = {}  # owner -> share held (its own included)
        self.sk1_shares: dict[int, bytes] = {}
        self.mask_set: list[int] = []  # neighbours it masked with (sent it a ciphertext)
        # the share-encryption key agreed with each neighbour (X25519 on sk2) at share_keys,
        # reused to decrypt that neighbour's shares at masked_input (one agreement, not two)
        self.enc_keys: dict[int, bytes] = {}

    def _expect(self, stage: str, method: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"node {self.node_id}: {method} is not allowed in stage {self.stage!r} "
                f"(expected {stage!r})"
            )

    # stage 0 -----------------------------------------------------------------------------
    def setup(self) -> tuple[bytes, bytes]:
        """Fresh key pairs for this round (any earlier round's secrets are dropped)."""
        sk2, pk2 = new_key_pair()
        sk1_seed = os.urandom(SEED_BYTES)
        sk1 = mask_key(sk1_seed, pk2)
        self._wipe()
        self.sk1_seed = sk1_seed
        self.sk1, self.pk1 = sk1.private_bytes_raw(), public_bytes(sk1)
        self.sk2, self.pk2 = sk2.private_bytes_raw(), pk2
        self.stage = STAGE_SETUP
        return self.pk1, self.pk2

    # stage 1 -----------------------------------------------------------------------------
    def share_keys(self, group_keys: Mapping[int, Any]) -> list[tuple[int, bytes]]:
        """Share ``b`` and ``sk1`` among the group; return ``[(dst, ciphertext)]`` by dst."""
        self._expect(STAGE_SETUP, "share_keys")
        me = self.node_id
        if not isinstance(group_keys, Mapping):
            raise SecAggError(f"node {me}: group keys must be a mapping node -> (pk1, pk2)")
        group: GroupKeys = {}
        for nid, pair in group_keys.items():
            if not _is_node_id(nid):
                raise SecAggError(f"node {me}: bad node id {nid!r} in the group keys")
            group[nid] = _key_pair(pair, f"node {me}: keys of node {nid}")
        if group.get(me) != (self.pk1, self.pk2):
            raise SecAggError(f"node {me}: its own public keys are missing or altered")
        flat = [pk for pair in group.values() for pk in pair]
        if len(set(flat)) != len(flat):
            raise SecAggError(f"node {me}: some public keys in the group are identical")
        if len(group) < self.threshold:
            raise BelowThreshold(
                f"node {me}: group of {len(group)} is below the threshold {self.threshold}"
            )

        seed = os.urandom(SEED_BYTES)
        order = sorted(group)  # share i + 1 goes to order[i]; the server checks the same order
        b_shares = split_secret(seed, self.threshold, len(order))
        # the mask key's 16-byte seed (one Shamir block), from which the server can rebuild
        # sk1 if this node drops after sharing; the split is most of this stage's cost
        sk1_shares = split_secret(self.sk1_seed, self.threshold, len(order))
        sk2 = private_key(self.sk2)
        out: list[tuple[int, bytes]] = []
        enc_keys: dict[int, bytes] = {}
        for idx, nid in enumerate(order):
            if nid == me:
                continue
            try:
                key = agree(sk2, group[nid][1], ENC_KEY_INFO)
            except SecAggError as err:
                raise SecAggError(f"node {me}: pk2 of node {nid}: {err}") from None
            enc_keys[nid] = key
            plain = share_keys_plaintext_concat(me, nid, b_shares[idx], sk1_shares[idx])
            out.append((nid, encrypt(key, plain)))
        mine = order.index(me)
        self.group, self.seed, self.enc_keys = group, seed, enc_keys
        self.sk1_seed = b""  # shared: not needed any more
        self.b_shares = {me: b_shares[mine]}
        self.sk1_shares = {me: sk1_shares[mine]}
        self.stage = STAGE_SHARE_KEYS
        return out

    def commitment(self) -> bytes:
        """The commitment to this round's self-mask seed (after :meth:`share_keys`)."""
        if self.stage != STAGE_SHARE_KEYS or len(self.seed) != SEED_BYTES:
            raise SecAggError(f"node {self.node_id}: no self-mask seed to commit to")
        return seed_commitment(self.node_id, self.pk2, self.seed)

    # stage 2 -----------------------------------------------------------------------------
    def masked_input(self, ciphertexts: Sequence[Any], x: np.ndarray) -> np.ndarray:
        """Store the neighbours' shares and return the masked vector ``y`` (uint64)."""
        self._expect(STAGE_SHARE_KEYS, "masked_input")
        me = self.node_id
        vec = _check_vector(x, None, self.bits, f"node {me}: input x")
        b_new: dict[int, bytes] = {}
        sk1_new: dict[int, bytes] = {}
        for item in ciphertexts:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise SecAggError(f"node {me}: expected (src, ciphertext) pairs")
            src, ct = item
            if not _is_node_id(src) or src == me or src not in self.group:
                raise SecAggError(f"node {me}: ciphertext from {src!r}, not a group neighbour")
            if src in b_new:
                raise SecAggError(f"node {me}: two ciphertexts from node {src}")
            if not isinstance(ct, bytes):
                raise SecAggError(f"node {me}: the ciphertext from node {src} is not bytes")
            key = self.enc_keys.get(src) or agree(
                private_key(self.sk2), self.group[src][1], ENC_KEY_INFO
            )
            try:
                plain = decrypt(key, ct)
            except (InvalidToken, ValueError, TypeError):
                raise SecAggError(
                    f"node {me}: the ciphertext from node {src} fails authentication "
                    "(tampered, or not encrypted by that node for this node)"
                ) from None
            if len(plain) < 20:
                raise SecAggError(f"node {me}: malformed plaintext from node {src}")
            actual_src, dst, b_share, sk1_share = share_keys_plaintext_separate(plain)
            if actual_src != src:
                raise SecAggError(
                    f"node {me}: ciphertext said to be from {src} is from {actual_src}"
                )
            if dst != me:
                raise SecAggError(f"node {me}: ciphertext from node {src} is addressed to {dst}")
            b_new[src], sk1_new[src] = b_share, sk1_share
        if len(b_new) + 1 < self.threshold:
            raise BelowThreshold(
                f"node {me}: shares from {len(b_new)} neighbours, need at least "
                f"{self.threshold - 1} (threshold {self.threshold} with itself)"
            )

        y = vec + prg(self.seed, vec.size, self.bits, SELF_MASK_INFO)
        sk1 = private_key(self.sk1)
        for nid in sorted(b_new):
            mask = prg(
                _pair_seed(sk1, self.group[nid][0]),
                vec.size,
                self.bits,
                PAIR_MASK_INFO,
            )
            if me > nid:
                y += mask
            else:
                y -= mask
        y &= _modmask(self.bits)
        self.enc_keys = {}  # used: not needed any more
        self.b_shares.update(b_new)
        self.sk1_shares.update(sk1_new)
        self.mask_set = sorted(b_new)
        self.stage = STAGE_MASKED_INPUT
        return y

    # stage 3 -----------------------------------------------------------------------------
    def unmask(
        self, survivors: Sequence[int], dropped: Sequence[int]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """``({survivor: b share}, {dropped: sk1 share})``; one answer per round, then wiped.

        Refuses a node named in both lists (its ``b`` and ``sk1`` together unmask its input),
        itself named as dropped, nodes it holds no share of, and fewer than ``threshold``
        survivors in its group.
        """
        self._expect(STAGE_MASKED_INPUT, "unmask")
        me = self.node_id
        surv, drop = list(survivors), list(dropped)
        for name, lst in (("survivors", surv), ("dropped", drop)):
            if any(not _is_node_id(n) for n in lst):
                raise SecAggError(f"node {me}: bad node id in the {name} list")
            if len(set(lst)) != len(lst):
                raise SecAggError(f"node {me}: duplicate node ids in the {name} list")
        both = sorted(set(surv) & set(drop))
        if both:
            raise SecAggError(
                f"node {me}: refusing unmask: node(s) {both} named both survivor and dropped "
                "(their self-mask seed and mask key together would reveal their input)"
            )
        if me not in surv:
            raise SecAggError(
                f"node {me}: refusing unmask: it sent its masked input, so it must be listed "
                "as a survivor"
            )
        unknown = sorted(set(surv + drop) - set(self.b_shares))
        if unknown:
            raise SecAggError(f"node {me}: holds no shares of node(s) {unknown}")
        if len(surv) < self.threshold:
            raise BelowThreshold(
                f"node {me}: refusing unmask: {len(surv)} survivors in its group, "
                f"below the threshold {self.threshold}"
            )
        out = (
            {n: self.b_shares[n] for n in sorted(surv)},
            {n: self.sk1_shares[n] for n in sorted(drop)},
        )
        self._wipe()
        self.stage = STAGE_DONE
        return out

    # state ---------------------------------------------------------------------------------
    def to_state(self) -> dict[str, bytes | int | str | list[int] | list[bytes]]:
        """A flat dict of ints, strs, bytes and lists of one of those (a ConfigRecord's types)."""
        ids = sorted(self.group)
        owners = sorted(self.b_shares)
        return {
            "node-id": self.node_id,
            "bits": self.bits,
            "threshold": self.threshold,
            "stage": self.stage,
            "sk1": self.sk1,
            "pk1": self.pk1,
            "sk2": self.sk2,
            "pk2": self.pk2,
            "seed": self.seed,
            "sk1-seed": self.sk1_seed,
            "group-ids": ids,
            "group-pk1": [self.group[n][0] for n in ids],
            "group-pk2": [self.group[n][1] for n in ids],
            "share-owners": owners,
            "b-shares": [self.b_shares[n] for n in owners],
            "sk1-shares": [self.sk1_shares[n] for n in owners],
            "mask-set": list(self.mask_set),
            "enc-ids": sorted(self.enc_keys),
            "enc-keys": [self.enc_keys[n] for n in sorted(self.enc_keys)],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """The client :meth:`to_state` saved (a ConfigRecord works: it is a mapping)."""

        def get(key: str, typ: type) -> Any:
            if key not in state:
                raise SecAggError(f"SecAgg client state: missing {key!r}")
            v = state[key]
            if (typ is int and isinstance(v, bool)) or not isinstance(v, typ):
                raise SecAggError(f"SecAgg client state: {key!r} must be {typ.__name__}")
            return v

        def get_list(key: str, typ: type) -> list[Any]:
            v = list(get(key, list))
            if any(not isinstance(e, typ) or isinstance(e, bool) for e in v):
                raise SecAggError(f"SecAgg client state: {key!r} must be a list of {typ.__name__}")
            return v

        try:
            client = cls(
                get("node-id", int), bits=get("bits", int), threshold=get("threshold", int)
            )
        except SecAggError:
            raise
        except ValueError as err:
            raise SecAggError(f"SecAgg client state: {err}") from None
        stage = get("stage", str)
        if stage not in CLIENT_STAGES:
            raise SecAggError(f"SecAgg client state: unknown stage {stage!r}")
        client.stage = stage
        client.sk1, client.pk1 = get("sk1", bytes), get("pk1", bytes)
        client.sk2, client.pk2 = get("sk2", bytes), get("pk2", bytes)
        client.seed = get("seed", bytes)
        client.sk1_seed = get("sk1-seed", bytes)
        ids, p1, p2 = (
            get_list("group-ids", int),
            get_list("group-pk1", bytes),
            get_list("group-pk2", bytes),
        )
        owners = get_list("share-owners", int)
        bsh, ssh = get_list("b-shares", bytes), get_list("sk1-shares", bytes)
        if not len(ids) == len(p1) == len(p2) or not len(owners) == len(bsh) == len(ssh):
            raise SecAggError("SecAgg client state: list lengths disagree")
        client.group = {n: (a, b) for n, a, b in zip(ids, p1, p2, strict=True)}
        client.b_shares = dict(zip(owners, bsh, strict=True))
        client.sk1_shares = dict(zip(owners, ssh, strict=True))
        client.mask_set = get_list("mask-set", int)
        if "enc-ids" in state or "enc-keys" in state:
            enc_ids, enc = get_list("enc-ids", int), get_list("enc-keys", bytes)
            if (
                len(enc_ids) != len(enc)
                or len(set(enc_ids)) != len(enc_ids)
                or not set(enc_ids) <= set(client.group)
            ):
                raise SecAggError("SecAgg client state: encryption keys do not match the group")
            client.enc_keys = dict(zip(enc_ids, enc, strict=True))
        needs_keys = stage in (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT)
        if needs_keys and not (client.sk1 and client.pk1 and client.sk2 and client.pk2):
            raise SecAggError(f"SecAgg client state: stage {stage!r} without its key pairs")
        if stage in (STAGE_SHARE_KEYS, STAGE_MASKED_INPUT) and len(client.seed) != SEED_BYTES:
            raise SecAggError(f"SecAgg client state: stage {stage!r} without its mask seed")
        if stage == STAGE_SETUP and len(client.sk1_seed) != SEED_BYTES:
            raise SecAggError("SecAgg client state: stage setup without its mask key's seed")
        return client


# ---------------------------------------------------------------------------------- the server


class SecAggServer:
    """The server's side of one SecAgg+ round (one object per round).

    Call order: :meth:`group_keys_for` (for every node, same ``keys``), :meth:`route` (once),
    :meth:`unmask_request` (for every survivor, same ``masked``), :meth:`aggregate` (once).
    Those raise :class:`SecAggError` on any bad client reply, which aborts the round; to drop a
    single bad client instead, filter each reply first with the pure checks
    :meth:`check_setup_reply`, :meth:`check_share_reply`, :meth:`check_masked` and
    :meth:`check_unmask_reply` (a dropped client is then handled like a dropout).
    """

    def __init__(
        self,
        cohort: list[int],
        *,
        k: int,
        threshold: int | None,
        bits: int,
        dim: int,
        min_survivors: int,
        seed: int,
    ) -> None:
        self.cohort = sorted(_check_cohort(cohort))
        self.bits = _check_bits(bits)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self.graph = neighbour_graph(self.cohort, k, seed)
        self.k = len(self.graph[self.cohort[0]])  # effective degree (n - 1 when complete)
        group_size = self.k + 1
        self.threshold = (
            default_threshold(group_size)
            if threshold is None
            else _check_threshold(threshold, group_size)
        )
        if (
            isinstance(min_survivors, bool)
            or not isinstance(min_survivors, int)
            or not 1 <= min_survivors <= len(self.cohort)
        ):
            raise ValueError(
                f"min_survivors must be an int in [1, {len(self.cohort)}], got {min_survivors!r}"
            )
        self.min_survivors = min_survivors
        self._keys: GroupKeys | None = None
        self.active: list[int] = []  # in the round after setup (replied, group >= t)
        self._share_group: dict[int, list[int]] = {}  # owner -> sorted share holders (its keys)
        self._done: set[int] | None = None  # completed share-keys
        self._mask_set: dict[int, set[int]] = {}  # node -> neighbours it masked with
        self._commit: dict[int, bytes] = {}  # node -> commitment to its self-mask seed
        self._survivors: set[int] | None = None
        self._requests: dict[int, tuple[list[int], list[int]]] = {}
        self._aggregated = False

    # after setup ---------------------------------------------------------------------------
    def group_keys_for(self, node: int, keys: Mapping[int, Any]) -> dict[int, tuple[bytes, bytes]]:
        """The public keys to send ``node`` for share-keys: its group members that replied.

        ``keys``: node -> (pk1, pk2) of every node that replied to setup (identical at every
        call; the first call validates and fixes it). A node whose group has fewer than
        ``threshold`` members in the round is dropped from the round, repeatedly until stable:
        it gets ``{}`` (send it nothing) and is left out of every other node's keys.
        """
        if self._done is not None:
            raise SecAggError("group_keys_for after route: the share-keys stage is over")
        if node not in self.graph:
            raise SecAggError(f"node {node!r} is not in this round's cohort")
        if self._keys is None:
            self._fix_keys(keys)
        elif not isinstance(keys, Mapping) or self._normalise(keys) != self._keys:
            raise SecAggError("group_keys_for: the setup keys changed between calls")
        assert self._keys is not None
        if node not in self._share_group:
            return {}
        return {m: self._keys[m] for m in self._share_group[node]}

    def check_setup_reply(self, node: int, pair: Any) -> tuple[bytes, bytes]:
        """One setup reply, checked: ``(pk1, pk2)``, two readable X25519 public keys (pure check).

        Keys repeated across nodes are only caught by :meth:`group_keys_for` (an abort).
        """
        if node not in self.graph:
            raise SecAggError(f"setup reply from node {node!r}, not in this round's cohort")
        pk1, pk2 = _key_pair(pair, f"setup reply of node {node}")
        if pk1 == pk2:
            raise SecAggError(f"setup reply of node {node}: pk1 and pk2 are the same key")
        prints = []
        for name, pk in (("pk1", pk1), ("pk2", pk2)):
            try:  # a small-order key gives the all-zero secret with any private key
                prints.append(key_fingerprint(pk))
            except SecAggError:
                raise SecAggError(
                    f"setup reply of node {node}: {name} is a small-order X25519 key"
                ) from None
        if prints[0] == prints[1]:
            raise SecAggError(f"setup reply of node {node}: pk1 and pk2 are the same key")
        return pk1, pk2

    @staticmethod
    def equivalent_keys(keys: Mapping[int, tuple[bytes, bytes]]) -> list[int]:
        """The nodes whose pk1 or pk2 is the same X25519 key as another key of ``keys`` (by
        :func:`key_fingerprint`, whatever the bytes): all of them, since which one copied the
        other cannot be told. The caller drops them before the round's groups are formed."""
        owners: dict[bytes, set[int]] = {}
        for node, pair in keys.items():
            for pk in pair:
                owners.setdefault(key_fingerprint(pk), set()).add(node)
        return sorted({n for nodes in owners.values() if len(nodes) > 1 for n in nodes})

    @staticmethod
    def _normalise(keys: Mapping[int, Any]) -> GroupKeys:
        return {
            n: (v[0], v[1]) if isinstance(v, tuple | list) and len(v) == 2 else v
            for n, v in keys.items()
        }

    def _fix_keys(self, keys: Mapping[int, Any]) -> None:
        if not isinstance(keys, Mapping):
            raise SecAggError("setup keys must be a mapping node -> (pk1, pk2)")
        fixed: GroupKeys = {}
        for nid, pair in keys.items():
            fixed[nid] = self.check_setup_reply(nid, pair)
        dup = self.equivalent_keys(fixed)
        if dup:
            raise SecAggError(f"setup keys: the same public key under several nodes ({dup})")
        active = set(fixed)
        while True:
            short = {n for n in active if len(self._group(n) & active) < self.threshold}
            if not short:
                break
            active -= short
        self._keys = fixed
        self.active = sorted(active)
        self._share_group = {n: sorted(self._group(n) & active) for n in active}

    def _group(self, node: int) -> set[int]:
        return {node, *self.graph[node]}

    # after share-keys ----------------------------------------------------------------------
    def check_share_reply(self, src: int, items: Sequence[Any]) -> dict[int, bytes]:
        """One share-keys reply, checked (``{dst: ct}``); raises :class:`SecAggError`.

        A pure check (no state change): call it per reply to drop a bad client (leave it out
        of :meth:`route`'s input, i.e. treat it as gone at share-keys) rather than abort.
        """
        if self._keys is None:
            raise SecAggError("share-keys reply before group_keys_for: no setup keys")
        if src not in self._share_group:
            raise SecAggError(f"share-keys reply from node {src!r}, not in the round")
        expected = set(self._share_group[src]) - {src}
        got: dict[int, bytes] = {}
        if not isinstance(items, Sequence):
            raise SecAggError(f"node {src}: share-keys reply must be a list of (dst, ct)")
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise SecAggError(f"node {src}: share-keys reply items must be (dst, ct)")
            dst, ct = item
            if dst not in expected:
                raise SecAggError(f"node {src}: ciphertext for {dst!r}, not in its group")
            if dst in got:
                raise SecAggError(f"node {src}: two ciphertexts for node {dst}")
            if not isinstance(ct, bytes) or not ct:
                raise SecAggError(f"node {src}: the ciphertext for node {dst} is not bytes")
            got[dst] = ct
        if set(got) != expected:
            raise SecAggError(
                f"node {src}: no ciphertext for group member(s) {sorted(expected - set(got))}"
            )
        return got

    def route(
        self,
        shares: Mapping[int, Sequence[Any]],
        commitments: Mapping[int, bytes] | None = None,
    ) -> dict[int, list[tuple[int, bytes]]]:
        """Forward ciphertexts: ``src -> [(dst, ct)]`` ==> ``dst -> [(src, ct)]``.

        ``commitments``: src -> :func:`seed_commitment` of its self-mask seed (32 bytes), kept
        to check the seed rebuilt at :meth:`aggregate`; without one a node's shares are checked
        to lie on one polynomial (when there are more than ``threshold``:
        :func:`shares_consistent`; with exactly ``threshold`` an altered share goes unseen).

        Each src must address exactly its group (the keys it was sent) minus itself
        (:meth:`check_share_reply`; any bad reply raises :class:`SecAggError`). A
        ciphertext is forwarded only between two nodes that both completed share-keys, so the
        pairwise-mask sets agree on both ends. Every completer gets an entry (maybe short: a
        client given fewer than ``threshold - 1`` ciphertexts refuses, i.e. drops out).
        """
        if self._keys is None:
            raise SecAggError("route before group_keys_for: no setup keys")
        if self._done is not None:
            raise SecAggError("route called twice")
        if not isinstance(shares, Mapping):
            raise SecAggError("share-keys replies must be a mapping src -> [(dst, ct)]")
        checked = {src: self.check_share_reply(src, items) for src, items in shares.items()}
        commits = dict(commitments or {})
        bad = sorted(
            n for n, c in commits.items()
            if n not in checked or not isinstance(c, bytes) or len(c) != 32
        )  # fmt: skip
        if bad:
            raise SecAggError(f"share-keys: bad or unexpected seed commitments from {bad}")
        self._commit = commits
        done = set(checked)
        out: dict[int, list[tuple[int, bytes]]] = {}
        for dst in sorted(done):
            srcs = sorted(s for s in done if s != dst and dst in checked[s])
            out[dst] = [(s, checked[s][dst]) for s in srcs]
            self._mask_set[dst] = set(srcs)
        self._done = done
        return out

    # after masked-input --------------------------------------------------------------------
    def unmask_request(self, node: int, masked: Mapping[int, Any]) -> tuple[list[int], list[int]]:
        """``(survivors, dropped)`` among ``node``'s group, to ask ``node`` for shares.

        ``masked``: node -> y of every node that sent one (identical at every call; the first
        call validates it and fixes the survivor set, so no node is ever asked for as both).
        Raises :class:`BelowThreshold` before any share is asked for if fewer than
        ``min_survivors`` survived or some node's masks cannot be removed (fewer than
        ``threshold`` survivors hold its shares).
        """
        if self._done is None:
            raise SecAggError("unmask_request before route")
        if self._aggregated:
            raise SecAggError("unmask_request after aggregate")
        if self._survivors is None:
            self._fix_survivors(masked)
        elif set(masked) != self._survivors:
            raise SecAggError("unmask_request: the set of masked inputs changed between calls")
        assert self._survivors is not None
        if node not in self._survivors:
            raise SecAggError(f"unmask_request for node {node!r}, which sent no masked input")
        holders = self._mask_set[node] | {node}
        survivors = sorted(holders & self._survivors)
        dropped = sorted(holders - self._survivors)
        if set(survivors) & set(dropped):  # cannot happen; the invariant, checked anyway
            raise SecAggError(f"internal: node {node} would be asked for both share kinds")
        self._requests[node] = (survivors, dropped)
        return survivors, dropped

    def check_masked(self, node: int, y: Any) -> np.ndarray:
        """One masked input, checked: a 1-D uint64 array of ``dim`` values < ``2**bits`` from a
        node that completed share-keys. A pure check: call it per reply to drop a bad one
        before the first :meth:`unmask_request` (the node then counts as dropped)."""
        if self._done is None:
            raise SecAggError("masked input before route")
        if node not in self._done:
            raise SecAggError(f"masked input from node {node!r}, which did not share keys")
        if not isinstance(y, np.ndarray) or y.dtype != np.uint64:
            raise SecAggError(f"node {node}: the masked input must be a numpy uint64 array")
        return _check_vector(y, self.dim, self.bits, f"node {node}: masked input")

    def _check_masked(self, masked: Mapping[int, Any]) -> dict[int, np.ndarray]:
        if not isinstance(masked, Mapping):
            raise SecAggError("masked inputs must be a mapping node -> y")
        return {nid: self.check_masked(nid, y) for nid, y in masked.items()}

    def _fix_survivors(self, masked: Mapping[int, Any]) -> None:
        checked = self._check_masked(masked)
        assert self._done is not None
        survivors = set(checked)
        if len(survivors) < self.min_survivors:
            raise BelowThreshold(
                f"{len(survivors)} masked inputs, below min_survivors={self.min_survivors}: "
                "the sum is not released"
            )
        short = self._short_owners(
            survivors, {n: (self._mask_set[n] | {n}) & survivors for n in self._done}
        )
        if short:
            raise BelowThreshold(
                f"fewer than threshold={self.threshold} surviving share holders for node(s) "
                f"{short}: their masks cannot be removed, the sum is not released"
            )
        self._survivors = survivors

    def _needed_owners(self, survivors: set[int]) -> list[int]:
        """Nodes whose secret must be rebuilt: survivors (b), dropped with a survivor (sk1)."""
        assert self._done is not None
        return sorted(n for n in self._done if n in survivors or self._mask_set[n] & survivors)

    def _short_owners(self, survivors: set[int], holders: Mapping[int, set[int]]) -> list[int]:
        return [n for n in self._needed_owners(survivors) if len(holders[n]) < self.threshold]

    # after unmask --------------------------------------------------------------------------
    def aggregate(
        self,
        masked: Mapping[int, Any],
        shares: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]],
    ) -> tuple[np.ndarray, list[int]]:
        """The survivors' sum mod ``2**bits`` (uint64) and the sorted survivor list.

        ``shares``: responder -> ({survivor: b share}, {dropped: sk1 share}), each exactly as
        its :meth:`unmask_request` asked. Raises :class:`BelowThreshold` (nothing released) if
        any node needed for the unmasking has fewer than ``threshold`` shares.
        """
        if self._survivors is None:
            raise SecAggError("aggregate before unmask_request")
        if self._aggregated:
            raise SecAggError("aggregate called twice")
        if set(masked) != self._survivors:
            raise SecAggError("aggregate: the masked inputs differ from those unmasking used")
        checked = self._check_masked(masked)
        survivors = self._survivors
        if len(survivors) < self.min_survivors:
            raise BelowThreshold(f"{len(survivors)} survivors, below {self.min_survivors}")
        if not isinstance(shares, Mapping):
            raise SecAggError("unmask replies must be a mapping node -> (b shares, sk1 shares)")

        collected: dict[int, list[bytes]] = {n: [] for n in self._done or ()}
        for holder, reply in shares.items():
            for owner, share in self.check_unmask_reply(holder, reply).items():
                collected[owner].append(share)

        needed = self._needed_owners(survivors)
        short = {n: len(collected[n]) for n in needed if len(collected[n]) < self.threshold}
        if short:
            raise BelowThreshold(
                f"shares below threshold={self.threshold} for node(s) "
                + ", ".join(f"{n} ({c})" for n, c in sorted(short.items()))
                + ": the sum is not released"
            )

        total = np.zeros(self.dim, dtype=np.uint64)
        for n in sorted(survivors):
            total += checked[n]
        order = sorted(needed)
        t = self.threshold
        for o in order:  # by share index: the same index set for most owners (1..t without
            # dropouts), whose Lagrange coefficients .shamir computes once
            collected[o].sort(key=lambda sh: int.from_bytes(sh[:4], "little"))
        first = dict(zip(order, combine_many([collected[o][:t] for o in order]), strict=True))
        for owner in order:
            # a survivor's b: checked against its commitment (else its shares agree); a dropped
            # node's sk1 seed: checked against pk1 by _rebuild_sk1, one combination either way
            kind = "b" if owner in survivors else "sk1"
            secret = self._combine(owner, collected[owner], kind, first=first[owner])
            if owner in survivors:
                if len(secret) != SEED_BYTES:
                    raise SecAggError(f"node {owner}: rebuilt self-mask seed has a bad length")
                total -= prg(secret, self.dim, self.bits, SELF_MASK_INFO)
                continue
            assert self._keys is not None
            sk1 = self._rebuild_sk1(owner, secret)
            for s in sorted(self._mask_set[owner] & survivors):
                mask = prg(
                    _pair_seed(sk1, self._keys[s][0]),
                    self.dim,
                    self.bits,
                    PAIR_MASK_INFO,
                )
                if s > owner:  # s added +mask
                    total -= mask
                else:
                    total += mask
        total &= _modmask(self.bits)
        self._aggregated = True
        return total, sorted(survivors)

    def check_unmask_reply(self, holder: int, reply: Any) -> dict[int, bytes]:
        """One unmask reply, checked against its request: ``{owner: share}`` (both kinds).

        The reply must hold exactly the b shares and sk1 shares asked for, each a Flower
        Shamir share with the holder's index in the owner's share group. A pure check: call it
        per reply to drop a bad one (fewer shares) rather than abort :meth:`aggregate`.
        """
        if holder not in self._requests:
            raise SecAggError(f"unmask reply from node {holder!r}, which was not asked")
        if not isinstance(reply, tuple | list) or len(reply) != 2:
            raise SecAggError(f"node {holder}: unmask reply must be (b shares, sk1 shares)")
        out: dict[int, bytes] = {}
        want_b, want_sk = self._requests[holder]
        for part, want, kind in ((reply[0], want_b, "b"), (reply[1], want_sk, "sk1")):
            if not isinstance(part, Mapping):
                raise SecAggError(f"node {holder}: {kind} shares must be a mapping")
            if sorted(part) != want:
                raise SecAggError(
                    f"node {holder}: {kind} shares for {sorted(part)}, asked for {want}"
                )
            for owner in want:
                index = self._share_group[owner].index(holder) + 1
                out[owner] = _check_share(part[owner], index, owner, holder)
        return out

    def _combine(self, owner: int, shares: list[bytes], kind: str, *, first: bytes | None) -> bytes:
        """The secret from ``threshold`` shares, checked: a self-mask seed (``kind`` "b")
        against the owner's commitment, or without one, with more shares at hand, by checking
        that they all lie on one polynomial (:func:`shares_consistent`); an sk1 seed is checked
        by the caller against the owner's pk1. One altered share shows either way (without a
        commitment, only with more than ``threshold`` shares). ``first``: the first
        ``threshold`` shares already combined (:func:`combine_many`; None: they did not)."""
        t = self.threshold
        try:
            if first is None:
                raise ValueError("the shares do not combine")
            secret = first
            commit = self._commit.get(owner) if kind == "b" else None
            if commit is not None:
                assert self._keys is not None
                if seed_commitment(owner, self._keys[owner][1], secret) != commit:
                    raise SecAggError(
                        f"node {owner}: its self-mask seed does not match its commitment (an "
                        "altered share)"
                    )
            elif kind == "b" and len(shares) > t and not shares_consistent(shares, t):
                raise SecAggError(f"node {owner}: its shares are inconsistent (one was altered)")
        except ValueError as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"node {owner}: its shares do not combine") from None
        return secret

    def _rebuild_sk1(self, owner: int, secret: bytes) -> x25519.X25519PrivateKey:
        assert self._keys is not None
        try:
            sk1 = mask_key(secret, self._keys[owner][1])
        except (ValueError, TypeError):
            raise SecAggError(f"node {owner}: rebuilt mask key is unreadable") from None
        if public_bytes(sk1) != self._keys[owner][0]:
            raise SecAggError(f"node {owner}: rebuilt mask key does not match its public key")
        return sk1

    @property
    def survivors(self) -> list[int]:
        """The nodes whose masked input is in the sum (fixed at the first unmask request)."""
        return sorted(self._survivors or ())

    @property
    def share_keys_done(self) -> list[int]:
        """The nodes that completed share-keys (fixed by :meth:`route`)."""
        return sorted(self._done or ())


__all__ = [
    "BelowThreshold",
    "PAIR_MASK_INFO",
    "SELF_MASK_INFO",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "default_threshold",
    "neighbour_graph",
    "prg",
]
