"""SecAgg+ core (shared/federation/secagg.py): exact sums, dropouts, thresholds, refusals, state."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from scipy.stats import chi2

from fedrec.shared.federation.secagg import (
    ENC_KEY_INFO,
    PAIR_MASK_INFO,
    SELF_MASK_INFO,
    BelowThreshold,
    SecAggClient,
    SecAggError,
    SecAggServer,
    agree,
    default_threshold,
    neighbour_graph,
    prg,
    private_key,
)


def cohort_of(n: int) -> list[int]:
    # sparse, unordered ids, one above 2**63 (Flower node ids are uint64)
    return [2**63 + 5] + [1000 + 7 * i for i in range(n - 1)][::-1]


def through_config_record(state: dict) -> dict:
    """What Flower does to a client's context.state: a ConfigRecord, serialized and back."""
    return dict(config_record_from_proto(config_record_to_proto(ConfigRecord(state))))


class Round:
    """Drives one round: the server object, the clients, with optional dropouts per stage."""

    def __init__(self, n, k, *, bits=32, dim=50, seed=0, t=None, min_survivors=1, serialize=False):
        self.cohort = cohort_of(n)
        self.bits, self.dim, self.serialize = bits, dim, serialize
        self.server = SecAggServer(
            self.cohort,
            k=k,
            threshold=t,
            bits=bits,
            dim=dim,
            min_survivors=min_survivors,
            seed=seed,
        )
        t = self.server.threshold
        self.clients = {i: SecAggClient(i, bits=bits, threshold=t) for i in self.cohort}
        self.states = {i: through_config_record(c.to_state()) for i, c in self.clients.items()}
        rng = np.random.default_rng(seed)
        self.xs = {i: rng.integers(0, 2**bits, dim, dtype=np.uint64) for i in self.cohort}
        self.requests: dict[int, tuple[list[int], list[int]]] = {}

    def call(self, node, method, *args):
        if not self.serialize:
            return getattr(self.clients[node], method)(*args)
        client = SecAggClient.from_state(self.states[node])
        out = getattr(client, method)(*args)
        self.states[node] = through_config_record(client.to_state())
        return out

    def run(self, *, drop_setup=(), drop_share=(), drop_masked=(), drop_unmask=()):
        self.keys = {i: self.call(i, "setup") for i in self.cohort if i not in drop_setup}
        self.group_keys = {i: self.server.group_keys_for(i, self.keys) for i in self.keys}
        shares = {
            i: self.call(i, "share_keys", g)
            for i, g in self.group_keys.items()
            if g and i not in drop_share
        }
        self.routed = self.server.route(shares)
        self.masked = {
            i: self.call(i, "masked_input", cts, self.xs[i])
            for i, cts in self.routed.items()
            if i not in drop_masked
        }
        replies = {}
        for i in self.masked:
            self.requests[i] = self.server.unmask_request(i, self.masked)
            if i not in drop_unmask:
                replies[i] = self.call(i, "unmask", *self.requests[i])
        self.replies = replies
        return self.server.aggregate(self.masked, replies)

    def expected(self, nodes):
        total = np.zeros(self.dim, dtype=np.uint64)
        for i in nodes:
            total += self.xs[i]
        return total & np.uint64(2**self.bits - 1)


# ---------------------------------------------------------------------------------------- PRG


def test_prg_deterministic_separated_and_in_range():
    seed = bytes(range(32))
    a = prg(seed, 1000, 32, SELF_MASK_INFO)
    assert a.dtype == np.uint64 and a.shape == (1000,)
    assert np.array_equal(a, prg(seed, 1000, 32, SELF_MASK_INFO))
    assert np.array_equal(a[:10], prg(seed, 10, 32, SELF_MASK_INFO))  # one stream per key
    assert np.mean(a == prg(seed, 1000, 32, PAIR_MASK_INFO)) < 0.01  # domain separation
    assert np.mean(a == prg(bytes(32), 1000, 32, SELF_MASK_INFO)) < 0.01
    # seeds that agree after Flower's 32-bit XOR fold still give unrelated streams
    folded = bytes(range(4, 8)) + bytes(range(4)) + bytes(range(8, 32))
    assert np.mean(a == prg(folded, 1000, 32, SELF_MASK_INFO)) < 0.01
    for bits in (1, 7, 32, 62, 64):
        v = prg(seed, 4000, bits, SELF_MASK_INFO)
        assert int(v.max()) < 2**bits
        assert int(v.max()) >= (2**bits - 1) * 0.99  # the top of the range is reached
    small = prg(seed, 20000, 4, PAIR_MASK_INFO)
    counts = np.bincount(small.astype(np.int64), minlength=16)
    assert chi2.sf(((counts - 1250.0) ** 2 / 1250.0).sum(), 15) > 1e-6
    with pytest.raises(ValueError):
        prg(b"short", 10, 32, SELF_MASK_INFO)


# -------------------------------------------------------------------------------------- graph


def test_neighbour_graph_ring_and_complete():
    cohort = cohort_of(12)
    g = neighbour_graph(cohort, 4, seed=3)
    assert set(g) == set(cohort)
    for v, ns in g.items():
        assert len(ns) == 4 and v not in ns and len(set(ns)) == 4
        assert all(v in g[u] for u in ns)  # symmetric
    assert g == neighbour_graph(list(reversed(cohort)), 4, seed=3)  # input order irrelevant
    assert any(neighbour_graph(cohort, 4, seed=s) != g for s in range(4, 8))
    full = neighbour_graph(cohort, 11, seed=0)
    assert all(len(ns) == 11 for ns in full.values())
    assert neighbour_graph(cohort, 50, seed=0) == full
    with pytest.raises(ValueError):
        neighbour_graph(cohort, 3, seed=0)  # odd k in a sparse graph
    with pytest.raises(ValueError):
        neighbour_graph([1, 1, 2], 2, seed=0)
    assert [default_threshold(s) for s in (2, 3, 5, 9)] == [2, 2, 3, 5]
    with pytest.raises(ValueError):
        SecAggServer(cohort, k=4, threshold=6, bits=32, dim=5, min_survivors=1, seed=0)
    with pytest.raises(ValueError):
        SecAggServer(cohort, k=4, threshold=1, bits=32, dim=5, min_survivors=1, seed=0)


# ----------------------------------------------------------------------------------- exact sum


@pytest.mark.parametrize(
    "n,k,bits,seed",
    [(5, 4, 32, 0), (6, 100, 16, 1), (8, 4, 32, 2), (12, 4, 62, 3), (12, 4, 1, 4), (10, 9, 62, 5)],
)
def test_exact_sum(n, k, bits, seed):
    r = Round(n, k, bits=bits, seed=seed)
    total, survivors = r.run()
    assert survivors == sorted(r.cohort)
    assert total.dtype == np.uint64 and np.array_equal(total, r.expected(r.cohort))


def test_masked_vectors_look_uniform():
    bits, dim = 8, 6000
    r = Round(5, 4, bits=bits, dim=dim, seed=7)
    r.xs = {i: np.full(dim, 3 + j, dtype=np.uint64) for j, i in enumerate(r.cohort)}
    total, _ = r.run()
    assert np.array_equal(total, r.expected(r.cohort))
    for i, y in r.masked.items():
        x = r.xs[i]
        assert y.dtype == np.uint64 and int(y.max()) < 2**bits
        assert np.mean(y == x) < 0.02  # ~1/256 by chance
        assert len(np.unique((y - x) & np.uint64(255))) > 200  # the mask is not a constant shift
        counts = np.bincount(y.astype(np.int64), minlength=256)
        expected = dim / 256
        assert chi2.sf(((counts - expected) ** 2 / expected).sum(), 255) > 1e-6
        assert abs(float(y.mean()) - 127.5) < 6  # sd of the mean ~ 74/sqrt(6000) ~ 1
    # two clients' masked vectors are unrelated
    ys = list(r.masked.values())
    assert np.mean(ys[0] == ys[1]) < 0.02


# ------------------------------------------------------------------------------------ dropouts


@pytest.mark.parametrize("n,k,n_drop", [(8, 4, 1), (8, 4, 2), (6, 5, 1), (6, 5, 2), (12, 4, 2)])
def test_dropout_after_share_keys(n, k, n_drop):
    r = Round(n, k, seed=n + n_drop)
    ring_neighbours = r.server.graph[r.cohort[0]]
    dropped = [r.cohort[0], ring_neighbours[0]][:n_drop]  # adjacent: the hardest case
    total, survivors = r.run(drop_masked=dropped)
    assert survivors == sorted(set(r.cohort) - set(dropped))
    assert np.array_equal(total, r.expected(survivors))
    # the dropped nodes' mask keys were asked for, never together with their seeds
    asked_b = {o for s, _ in r.requests.values() for o in s}
    asked_sk = {o for _, d in r.requests.values() for o in d}
    assert asked_sk == set(dropped) and not asked_b & asked_sk


def test_dropout_at_setup_and_share_keys():
    r = Round(10, 4, seed=11)
    total, survivors = r.run(drop_setup=[r.cohort[1]], drop_share=[r.cohort[2]])
    assert survivors == sorted(set(r.cohort) - {r.cohort[1], r.cohort[2]})
    assert np.array_equal(total, r.expected(survivors))


def test_node_with_too_few_repliers_is_left_out():
    r = Round(10, 4, seed=2)  # t = 3
    node = r.cohort[0]
    gone = r.server.graph[node][:3]  # node's group: 5 - 3 = 2 < t
    total, survivors = r.run(drop_setup=gone)
    assert r.group_keys[node] == {} and node not in r.server.active
    assert node not in survivors and not set(gone) & set(survivors)
    assert len(survivors) >= 5
    assert np.array_equal(total, r.expected(survivors))
    for i in survivors:
        assert node not in r.group_keys[i]
    with pytest.raises(SecAggError, match="share-keys stage is over"):
        r.server.group_keys_for(node, r.keys)


def test_dropout_during_unmask_within_threshold():
    r = Round(8, 4, seed=5)  # t = 3, groups of 5
    quiet = [r.cohort[3]]
    total, survivors = r.run(drop_masked=[r.cohort[0]], drop_unmask=quiet)
    assert r.cohort[3] in survivors  # its input is in the sum, its shares were not needed
    assert np.array_equal(total, r.expected(survivors))


def test_dropout_during_unmask_below_threshold_releases_nothing():
    r = Round(5, 4, seed=6)  # complete graph, t = 3
    late = r.cohort[:3]
    with pytest.raises(BelowThreshold, match="below threshold"):
        r.run(drop_unmask=late)  # 2 holders left per node < 3
    # the refusal changed nothing: once the late replies arrive the round completes
    replies = {**r.replies, **{i: r.clients[i].unmask(*r.requests[i]) for i in late}}
    total, survivors = r.server.aggregate(r.masked, replies)
    assert np.array_equal(total, r.expected(survivors))


def test_min_survivors_refusal_before_any_share_is_asked():
    r = Round(6, 5, seed=8, min_survivors=5)
    with pytest.raises(BelowThreshold, match="min_survivors"):
        r.run(drop_masked=r.cohort[:2])
    assert r.requests == {}  # no node was asked for shares
    # and aggregate cannot be called around it
    with pytest.raises(SecAggError):
        r.server.aggregate(r.masked, {})


def test_too_many_dropouts_for_a_group_is_refused_at_unmask_request():
    r = Round(8, 4, seed=9)  # t = 3; 3 of a node's 4 neighbours send no masked input
    node = r.cohort[0]
    gone = r.server.graph[node][:3]
    with pytest.raises(BelowThreshold):
        r.run(drop_masked=gone)
    assert r.requests == {}


# ------------------------------------------------------------------------ client-side refusals


def _client_after_masked_input(seed=0):
    r = Round(6, 5, seed=seed)
    r.keys = {i: r.clients[i].setup() for i in r.cohort}
    shares = {i: r.clients[i].share_keys(r.server.group_keys_for(i, r.keys)) for i in r.cohort}
    r.routed = r.server.route(shares)
    r.masked = {i: r.clients[i].masked_input(r.routed[i], r.xs[i]) for i in r.cohort}
    return r


def test_client_refuses_a_node_as_both_survivor_and_dropped():
    r = _client_after_masked_input()
    me, other = r.cohort[0], r.cohort[1]
    client = r.clients[me]
    everyone = sorted(r.cohort)
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        client.unmask(everyone, [other])
    with pytest.raises(SecAggError, match="sent its masked input"):
        client.unmask([i for i in everyone if i != me], [me])
    with pytest.raises(SecAggError, match="no shares"):
        client.unmask(everyone + [424242], [])
    with pytest.raises(BelowThreshold):
        client.unmask([me, other], [])  # 2 < t = 4
    # nothing was released by the refusals: a proper request is answered, once
    b, sk = client.unmask(everyone, [])
    assert sorted(b) == everyone and sk == {}
    with pytest.raises(SecAggError, match="not allowed"):
        client.unmask([me], [other])
    assert client.to_state()["sk1"] == b"" and client.to_state()["b-shares"] == []


def test_client_refuses_group_below_threshold_and_bad_keys():
    c = SecAggClient(1, bits=32, threshold=3)
    pk = c.setup()
    other = SecAggClient(2, bits=32, threshold=3).setup()
    with pytest.raises(BelowThreshold):
        c.share_keys({1: pk, 2: other})
    third = SecAggClient(3, bits=32, threshold=3).setup()
    with pytest.raises(SecAggError, match="own public keys"):
        c.share_keys({1: (pk[0], other[1]), 2: other, 3: third})
    with pytest.raises(SecAggError, match="identical"):
        c.share_keys({1: pk, 2: other, 3: other})
    with pytest.raises(SecAggError, match="unreadable"):
        c.share_keys({1: pk, 2: other, 3: (b"junk", third[1])})
    assert len(c.share_keys({1: pk, 2: other, 3: third})) == 2  # still usable
    with pytest.raises(BelowThreshold):
        c.masked_input([], np.zeros(5, dtype=np.uint64))  # 0 + 1 < 3 shares


def test_tampered_or_misrouted_ciphertexts_raise():
    r = Round(5, 4, seed=12)
    r.keys = {i: r.clients[i].setup() for i in r.cohort}
    shares = {i: r.clients[i].share_keys(r.server.group_keys_for(i, r.keys)) for i in r.cohort}
    routed = r.server.route(shares)
    a, b, c = sorted(r.cohort)[:3]
    target = r.clients[b]
    x = r.xs[b]
    good = dict(routed[b])

    def with_ct(src, ct):
        return [(s, ct if s == src else v) for s, v in good.items()]

    flipped = bytearray(good[a])
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(SecAggError, match="authentication"):
        target.masked_input(with_ct(a, bytes(flipped)), x)
    # a's ciphertext for c delivered to b: b cannot decrypt it
    for_c = dict(shares[a])[c]
    with pytest.raises(SecAggError, match="authentication"):
        target.masked_input(with_ct(a, for_c), x)
    # c's ciphertext for b relabelled as from a
    with pytest.raises(SecAggError, match="authentication"):
        target.masked_input(with_ct(a, good[c]), x)
    # properly encrypted by a for b, but the plaintext names another dst / src
    sk2_a = private_key(r.clients[a].to_state()["sk2"])
    key_ab = agree(sk2_a, r.keys[b][1], ENC_KEY_INFO)
    wrong_dst = encrypt(key_ab, share_keys_plaintext_concat(a, c, b"x" * 20, b"y" * 20))
    with pytest.raises(SecAggError, match="addressed to"):
        target.masked_input(with_ct(a, wrong_dst), x)
    wrong_src = encrypt(key_ab, share_keys_plaintext_concat(c, b, b"x" * 20, b"y" * 20))
    with pytest.raises(SecAggError, match="is from"):
        target.masked_input(with_ct(a, wrong_src), x)
    with pytest.raises(SecAggError, match="two ciphertexts"):
        target.masked_input(list(good.items()) + [(a, good[a])], x)
    with pytest.raises(SecAggError, match="not a group neighbour"):
        target.masked_input([(b, good[a])], x)
    # the untampered delivery still works afterwards (refusals changed nothing)
    assert target.masked_input(list(good.items()), x).shape == x.shape


# ----------------------------------------------------------------------- server-side validation


def test_server_validates_client_replies():
    r = _client_after_masked_input(seed=3)
    s = r.server
    me = r.cohort[0]
    bad = dict(r.masked)
    bad[me] = r.masked[me].astype(np.int64)
    with pytest.raises(SecAggError, match=f"node {me}"):
        s.unmask_request(me, bad)
    bad[me] = r.masked[me][:-1]
    with pytest.raises(SecAggError, match=f"node {me}"):
        s.unmask_request(me, bad)
    bad[me] = r.masked[me].copy()
    bad[me][0] = np.uint64(2**32)
    with pytest.raises(SecAggError, match=f"node {me}"):
        s.unmask_request(me, bad)
    with pytest.raises(SecAggError, match=f"node {me}"):
        s.check_masked(me, r.masked[me].astype(np.float64))
    assert np.array_equal(s.check_masked(me, r.masked[me]), r.masked[me])
    bad = dict(r.masked)
    bad[987654] = r.masked[me]
    with pytest.raises(SecAggError, match="987654"):
        s.unmask_request(me, bad)

    requests = {i: s.unmask_request(i, r.masked) for i in r.cohort}
    with pytest.raises(SecAggError, match="changed"):
        s.unmask_request(me, {i: y for i, y in r.masked.items() if i != me})
    replies = {i: r.clients[i].unmask(*requests[i]) for i in r.cohort}
    b_me, sk_me = replies[me]
    extra = dict(replies)
    extra[me] = ({**b_me, 5555: b"z" * 36}, sk_me)
    with pytest.raises(SecAggError, match=f"node {me}"):
        s.aggregate(r.masked, extra)
    # two holders swap their share of one owner: index check names the holder
    other = r.cohort[1]
    swapped = dict(replies)
    b_o, sk_o = replies[other]
    swapped[me] = ({**b_me, r.cohort[2]: b_o[r.cohort[2]]}, sk_me)
    with pytest.raises(SecAggError, match=f"node {me}: share of node {r.cohort[2]} has index"):
        s.aggregate(r.masked, swapped)
    total, survivors = s.aggregate(r.masked, replies)
    assert np.array_equal(total, r.expected(survivors))
    with pytest.raises(SecAggError, match="twice"):
        s.aggregate(r.masked, replies)


def test_server_validates_share_keys_replies():
    r = Round(6, 4, seed=4)
    r.keys = {i: r.clients[i].setup() for i in r.cohort}
    with pytest.raises(SecAggError, match="not in this round"):
        r.server.group_keys_for(1, r.keys)
    with pytest.raises(SecAggError, match="cohort"):
        r.server.group_keys_for(r.cohort[0], {**r.keys, 31337: r.keys[r.cohort[0]]})
    with pytest.raises(SecAggError, match="same public key under several nodes"):
        r.server.group_keys_for(r.cohort[0], {**r.keys, r.cohort[1]: r.keys[r.cohort[0]]})
    with pytest.raises(SecAggError, match=f"node {r.cohort[1]}"):
        r.server.check_setup_reply(r.cohort[1], (b"junk", r.keys[r.cohort[1]][1]))
    groups = {i: r.server.group_keys_for(i, r.keys) for i in r.cohort}
    with pytest.raises(SecAggError, match="changed"):
        r.server.group_keys_for(r.cohort[0], {i: r.keys[i] for i in r.cohort[1:]})
    shares = {i: r.clients[i].share_keys(groups[i]) for i in r.cohort}
    a = r.cohort[0]
    with pytest.raises(SecAggError, match=f"node {a}: no ciphertext"):
        r.server.route({**shares, a: shares[a][:-1]})
    outsider = next(i for i in r.cohort if i not in groups[a])
    with pytest.raises(SecAggError, match=f"node {a}: ciphertext for {outsider}"):
        r.server.route({**shares, a: shares[a] + [(outsider, b"ct")]})
    with pytest.raises(SecAggError, match="31337"):
        r.server.route({**shares, 31337: []})
    # the per-reply check lets a caller drop one bad client instead of aborting the round
    with pytest.raises(SecAggError, match=f"node {a}"):
        r.server.check_share_reply(a, shares[a][1:])
    shares_ok = {i: v for i, v in shares.items() if i != a}
    routed = r.server.route(shares_ok)
    assert a not in routed and all(a not in dict(items) for items in routed.values())
    r.masked = {i: r.clients[i].masked_input(routed[i], r.xs[i]) for i in routed}
    reqs = {i: r.server.unmask_request(i, r.masked) for i in r.masked}
    assert all(a not in s + d for s, d in reqs.values())  # never shared: neither kind asked
    replies = {i: r.clients[i].unmask(*reqs[i]) for i in r.masked}
    total, survivors = r.server.aggregate(r.masked, replies)
    assert survivors == sorted(shares_ok) and np.array_equal(total, r.expected(survivors))
    for dst, items in routed.items():  # every ciphertext goes to its dst, from a group member
        assert {src for src, _ in items} == set(groups[dst]) - {dst, a}


# --------------------------------------------------------------------------------------- state


def test_state_round_trip_through_every_stage():
    r = Round(9, 4, seed=13, serialize=True)
    total, survivors = r.run(drop_masked=[r.cohort[4]], drop_unmask=[r.cohort[5]])
    assert np.array_equal(total, r.expected(survivors))
    final = r.states[r.cohort[0]]
    assert final["stage"] == "unmask" and final["sk1"] == b"" and final["seed"] == b""
    for value in final.values():  # ConfigRecord types only, no dicts
        assert isinstance(value, int | str | bytes | list)


def test_state_mid_protocol_keeps_the_stage_order():
    c = SecAggClient(7, bits=20, threshold=2)
    state = through_config_record(c.to_state())
    with pytest.raises(SecAggError, match="not allowed"):
        SecAggClient.from_state(state).masked_input([], np.zeros(3, dtype=np.uint64))
    c.setup()
    state = through_config_record(c.to_state())
    restored = SecAggClient.from_state(state)
    assert restored.to_state() == c.to_state()
    with pytest.raises(SecAggError, match="stage"):
        SecAggClient.from_state({**state, "stage": "share-keys"})  # no seed yet
    with pytest.raises(SecAggError, match="missing"):
        SecAggClient.from_state({k: v for k, v in state.items() if k != "sk1"})


# ------------------------------------------------------------------- secrets, shares, mask key


def test_mask_key_from_seed_and_key_agreement():
    from cryptography.hazmat.primitives.asymmetric import x25519

    from fedrec.shared.federation.secagg import (
        PAIR_SEED_INFO,
        mask_key,
        new_key_pair,
        public_bytes,
    )

    def raw(seed: bytes, binding: bytes = b"pk2") -> bytes:
        return mask_key(seed, binding).private_bytes_raw()

    assert raw(b"\x01" * 16) == raw(b"\x01" * 16)  # deterministic
    assert raw(b"\x01" * 16) != raw(b"\x02" * 16)
    assert raw(b"\x01" * 16) != raw(b"\x01" * 16, b"another pk2")  # bound to the node
    assert isinstance(mask_key(b"\x01" * 16, b"x"), x25519.X25519PrivateKey)
    with pytest.raises(ValueError, match="16 bytes"):
        mask_key(b"\x01" * 32, b"x")
    # the client's pk1 is the public key of the key derived from its seed
    c = SecAggClient(7, bits=16, threshold=2)
    pk1, _ = c.setup()
    assert len(pk1) == 32 and pk1 == public_bytes(mask_key(c.sk1_seed, c.pk2))
    # agreement: symmetric, separated by info, different for another pair
    (sa, pa), (sb, pb), (_, pc) = new_key_pair(), new_key_pair(), new_key_pair()
    assert agree(sa, pb, ENC_KEY_INFO) == agree(sb, pa, ENC_KEY_INFO)
    assert agree(sa, pb, ENC_KEY_INFO) != agree(sa, pb, PAIR_SEED_INFO)
    assert agree(sa, pb, ENC_KEY_INFO) != agree(sa, pc, ENC_KEY_INFO)
    # a small-order public key (here the all-zero point) is refused, not agreed on
    with pytest.raises(SecAggError, match="small-order"):
        agree(sa, bytes(32), ENC_KEY_INFO)


def test_server_drops_a_small_order_setup_key():
    cohort = cohort_of(3)
    server = SecAggServer(cohort, k=2, threshold=2, bits=16, dim=4, min_survivors=2, seed=0)
    n = cohort[0]
    good = SecAggClient(n, bits=16, threshold=2).setup()
    assert server.check_setup_reply(n, good) == good
    for bad in ((bytes(32), good[1]), (good[0], (1).to_bytes(32, "little"))):
        with pytest.raises(SecAggError, match="small-order"):
            server.check_setup_reply(n, bad)
    with pytest.raises(SecAggError, match="unreadable"):
        server.check_setup_reply(n, (good[0][:31], good[1]))


@pytest.mark.parametrize("t,n", [(2, 3), (5, 9), (16, 31)])
def test_shamir_shares_rebuild_with_threshold_only(t, n):
    from fedrec.shared.federation.secagg import combine_secret, split_secret

    rng = np.random.default_rng(t)
    secret = rng.bytes(16)
    shares = split_secret(secret, t, n)
    assert len(shares) == n and all(len(s) == 20 for s in shares)
    assert [int.from_bytes(s[:4], "little") for s in shares] == list(range(1, n + 1))
    for _ in range(5):
        pick = [shares[i] for i in rng.choice(n, t, replace=False)]
        assert combine_secret(pick) == secret
    assert combine_secret(shares[: t - 1]) != secret  # below the threshold: another value


def test_server_catches_an_altered_share_of_a_survivor():
    """More than t holders answer: an altered self-mask share shows as inconsistent subsets."""
    r = Round(9, 8, seed=3)  # complete graph, t = 5, 9 holders per node
    r.keys = {i: r.call(i, "setup") for i in r.cohort}
    groups = {i: r.server.group_keys_for(i, r.keys) for i in r.cohort}
    r.routed = r.server.route({i: r.call(i, "share_keys", g) for i, g in groups.items()})
    masked = {i: r.call(i, "masked_input", cts, r.xs[i]) for i, cts in r.routed.items()}
    replies = {}
    for i in masked:
        req = r.server.unmask_request(i, masked)
        replies[i] = r.call(i, "unmask", *req)
    victim, holder = r.cohort[0], r.cohort[-1]
    b, sk = replies[holder]
    share = bytearray(b[victim])
    share[10] ^= 1
    replies[holder] = ({**b, victim: bytes(share)}, sk)
    with pytest.raises(SecAggError, match="inconsistent"):
        r.server.aggregate(masked, replies)


def test_masked_input_decrypts_with_the_keys_agreed_at_share_keys(monkeypatch):
    """The share-encryption keys agreed at share_keys (X25519) travel in the client's state and
    are used at masked_input (no second agreement); they and the mask key's seed are dropped
    once used."""
    from fedrec.shared.federation import secagg

    r = Round(5, 4, seed=8, serialize=True)
    r.keys = {i: r.call(i, "setup") for i in r.cohort}
    groups = {i: r.server.group_keys_for(i, r.keys) for i in r.cohort}
    r.routed = r.server.route({i: r.call(i, "share_keys", g) for i, g in groups.items()})
    assert all(r.states[i]["sk1-seed"] == b"" for i in r.cohort)  # shared, then dropped
    assert all(len(r.states[i]["enc-keys"]) == 4 for i in r.cohort)

    real = secagg.agree

    def only_pair_seeds(sk, pk, info):
        # pairwise-mask seeds (sk1 with pk1) still agree; the decryption key must not
        if info != secagg.PAIR_SEED_INFO:
            raise AssertionError("a second agreement for the share-encryption key")
        return real(sk, pk, info)

    monkeypatch.setattr(secagg, "agree", only_pair_seeds)
    masked = {i: r.call(i, "masked_input", cts, r.xs[i]) for i, cts in r.routed.items()}
    assert all(r.states[i]["enc-keys"] == [] for i in r.cohort)
    replies = {}
    for i in masked:
        replies[i] = r.call(i, "unmask", *r.server.unmask_request(i, masked))
    total, survivors = r.server.aggregate(masked, replies)
    assert np.array_equal(total, r.expected(survivors))


def test_an_altered_mask_key_share_is_caught_by_the_public_key():
    """A dropped node's mask key rebuilt from exactly the threshold of shares, one altered: the
    rebuilt key does not match the node's pk1 and the round is refused."""
    r = Round(5, 4, seed=9)  # complete graph, t = 3
    gone = r.cohort[0]
    r.keys = {i: r.call(i, "setup") for i in r.cohort}
    groups = {i: r.server.group_keys_for(i, r.keys) for i in r.cohort}
    r.routed = r.server.route({i: r.call(i, "share_keys", g) for i, g in groups.items()})
    masked = {
        i: r.call(i, "masked_input", cts, r.xs[i]) for i, cts in r.routed.items() if i != gone
    }
    replies = {}
    for i in list(masked)[:3]:  # exactly t holders answer
        replies[i] = r.call(i, "unmask", *r.server.unmask_request(i, masked))
    holder = next(iter(replies))
    b, sk = replies[holder]
    share = bytearray(sk[gone])
    share[7] ^= 1
    replies[holder] = (b, {**sk, gone: bytes(share)})
    with pytest.raises(SecAggError, match="does not match its public key"):
        r.server.aggregate(masked, replies)


def _equivalent_encodings(pk: bytes) -> list[bytes]:
    """Other byte strings that X25519 treats as the same key: the top bit set, u + p (when it
    fits in 255 bits), and the point plus a small-order point (same result for every clamped
    private key)."""
    u = int.from_bytes(pk, "little")
    p = 2**255 - 19
    out = [(u | (1 << 255)).to_bytes(32, "little")]
    if u + p < 2**255:
        out.append((u + p).to_bytes(32, "little"))
    # u-coordinates of P + T for T of order 2 (u = 0): the Montgomery formula u' = 1/u mod p...
    # is a different, equivalent key for clamped scalars only if it agrees alike; keep it when it
    # does (checked below against the fingerprint and a real agreement)
    out.append(pow(u, p - 2, p).to_bytes(32, "little"))
    return out


def test_equivalent_key_encodings_are_one_key_and_their_nodes_are_dropped():
    """A colluder re-encoding an honest node's pk1 (other bytes, same X25519 key) would cancel
    that node's pairwise masks: the server tells keys apart by fingerprint, drops every node
    holding a key another node also holds, and refuses such a key set outright."""
    from fedrec.shared.federation.secagg import PAIR_SEED_INFO, key_fingerprint, new_key_pair

    honest = SecAggClient(1, bits=16, threshold=2).setup()
    sk_other, _ = new_key_pair()
    copies = []
    for enc in _equivalent_encodings(honest[0]):
        same_for_all = agree(sk_other, enc, PAIR_SEED_INFO) == agree(
            sk_other, honest[0], PAIR_SEED_INFO
        )
        assert (key_fingerprint(enc) == key_fingerprint(honest[0])) == same_for_all
        if same_for_all:
            copies.append(enc)
    assert len(copies) >= 2 and all(c != honest[0] for c in copies)
    cohort = cohort_of(4)
    server = SecAggServer(cohort, k=3, threshold=2, bits=16, dim=4, min_survivors=2, seed=0)
    keys = {n: SecAggClient(n, bits=16, threshold=2).setup() for n in cohort[1:3]}
    keys[cohort[0]] = honest
    colluder = cohort[3]
    keys[colluder] = (copies[0], SecAggClient(colluder, bits=16, threshold=2).setup()[1])
    assert SecAggServer.equivalent_keys(keys) == sorted([cohort[0], colluder])
    with pytest.raises(SecAggError, match="same public key under several nodes"):
        server.group_keys_for(cohort[1], keys)


def _commit_round(seed: int) -> tuple[Round, dict, dict]:
    """A complete-graph round (t = 3) routed with the clients' seed commitments, every node
    masking; returns the round, the masked inputs and the commitments."""
    r = Round(5, 4, seed=seed)
    r.keys = {i: r.call(i, "setup") for i in r.cohort}
    groups = {i: r.server.group_keys_for(i, r.keys) for i in r.cohort}
    shares = {i: r.call(i, "share_keys", g) for i, g in groups.items()}
    commits = {i: r.clients[i].commitment() for i in r.cohort}
    r.routed = r.server.route(shares, commits)
    masked = {i: r.call(i, "masked_input", cts, r.xs[i]) for i, cts in r.routed.items()}
    return r, masked, commits


def test_seed_commitments_check_the_rebuilt_seed_with_one_combination(monkeypatch):
    """With commitments, each survivor's self-mask seed is rebuilt once (not twice) and checked
    against its commitment: exact sum, one Shamir combination per node."""
    from fedrec.shared.federation import secagg

    r, masked, _ = _commit_round(11)
    replies = {i: r.call(i, "unmask", *r.server.unmask_request(i, masked)) for i in masked}
    calls = []
    real = secagg.combine_secret
    monkeypatch.setattr(secagg, "combine_secret", lambda sh: calls.append(1) or real(sh))
    total, survivors = r.server.aggregate(masked, replies)
    assert np.array_equal(total, r.expected(survivors)) and len(calls) == len(r.cohort)


def test_an_altered_seed_share_is_caught_even_at_exactly_the_threshold():
    """Exactly t holders answer and one alters a survivor's share: without a commitment that
    would go unnoticed (a wrong sum); the commitment catches it and nothing is released."""
    r, masked, _ = _commit_round(12)
    replies = {}
    for i in list(masked)[:3]:  # exactly t
        replies[i] = r.call(i, "unmask", *r.server.unmask_request(i, masked))
    holder = next(iter(replies))
    b, sk = replies[holder]
    victim = next(o for o in b if o != holder)
    share = bytearray(b[victim])
    share[9] ^= 1
    replies[holder] = ({**b, victim: bytes(share)}, sk)
    with pytest.raises(SecAggError, match="does not match its commitment"):
        r.server.aggregate(masked, replies)


def test_bad_seed_commitments_are_refused_at_routing():
    r = Round(5, 4, seed=13)
    r.keys = {i: r.call(i, "setup") for i in r.cohort}
    groups = {i: r.server.group_keys_for(i, r.keys) for i in r.cohort}
    shares = {i: r.call(i, "share_keys", g) for i, g in groups.items()}
    commits = {i: r.clients[i].commitment() for i in r.cohort}
    commits[r.cohort[0]] = b"short"
    with pytest.raises(SecAggError, match="bad or unexpected seed commitments"):
        r.server.route(shares, commits)


@pytest.fixture
def reference_shamir(monkeypatch):
    """pycryptodome's pure-Python Shamir in this process, as where .shamir's C path is
    unusable: the case the worker pool of combine_many is for (its workers always run
    pycryptodome's Shamir.combine)."""
    from fedrec.shared.federation import shamir

    monkeypatch.setitem(shamir._STATE, "fast", False)


def test_combine_many_in_worker_processes_equals_combining_here(reference_shamir):
    """The unmask stage's combinations run in a process pool above PARALLEL_COMBINE_MIN
    secrets: the same pycryptodome call, the same secrets, None for a group that does not
    combine (too few or malformed shares), in order."""
    from fedrec.shared.federation import secagg

    rng = np.random.default_rng(5)
    n = secagg.PARALLEL_COMBINE_MIN + 6
    secrets_ = [rng.bytes(16) for _ in range(n)]
    groups = [secagg.split_secret(s, 4, 7)[:4] for s in secrets_]
    groups[3] = [b"\x01\x00\x00\x00short"] * 4  # malformed: does not combine
    groups[9] = groups[9][:3]  # below the threshold: combines to another value
    assert not secagg._POOL_FAILED
    pooled = secagg.combine_many(groups, workers=2)
    # worker processes of this process combined them (no serial fallback)
    assert secagg._POOL is not None and secagg._POOL[1] == os.getpid()
    assert not secagg._POOL_FAILED
    here = secagg.combine_many(groups, workers=1)
    assert pooled == here
    assert pooled[3] is None and pooled[9] != secrets_[9]
    assert [p for i, p in enumerate(pooled) if i not in (3, 9)] == [
        s for i, s in enumerate(secrets_) if i not in (3, 9)
    ]


def test_a_round_large_enough_to_combine_in_worker_processes_is_exact_with_dropouts(
    monkeypatch, caplog, reference_shamir
):
    """Above PARALLEL_COMBINE_MIN needed secrets the unmask stage combines them in a process
    pool: the released sum is still exactly the survivors' sum, with nodes dropped before
    masking (their sk1 seeds rebuilt) and after it."""
    from fedrec.shared.federation import secagg

    monkeypatch.setattr(secagg, "PARALLEL_COMBINE_MIN", 8)
    calls = []
    real = secagg.combine_many
    monkeypatch.setattr(
        secagg, "combine_many", lambda g, **kw: calls.append(len(g)) or real(g, workers=2)
    )
    r = Round(12, 6, seed=21)
    with caplog.at_level(logging.WARNING, logger="fedrec.secagg"):
        total, survivors = r.run(drop_masked=(r.cohort[0],), drop_unmask=(r.cohort[1],))
    assert calls and calls[0] >= 8  # the pool path ran ...
    assert not secagg._POOL_FAILED and "pool failed" not in caplog.text  # ... in the pool
    assert r.cohort[0] not in survivors and r.cohort[1] in survivors
    assert np.array_equal(total, r.expected(survivors))


def test_an_altered_share_on_the_pool_path_refuses_the_round(monkeypatch, reference_shamir):
    """With the combinations in worker processes, an altered self-mask share still shows as a
    commitment mismatch and nothing is released."""
    from fedrec.shared.federation import secagg

    monkeypatch.setattr(secagg, "PARALLEL_COMBINE_MIN", 4)
    real = secagg.combine_many
    used = []
    monkeypatch.setattr(
        secagg, "combine_many", lambda g, **kw: used.append(len(g)) or real(g, workers=2)
    )
    r, masked, _ = _commit_round(31)
    replies = {}
    for i in list(masked)[:3]:  # exactly t
        replies[i] = r.call(i, "unmask", *r.server.unmask_request(i, masked))
    holder = next(iter(replies))
    b, sk = replies[holder]
    victim = next(o for o in b if o != holder)
    share = bytearray(b[victim])
    share[9] ^= 1
    replies[holder] = ({**b, victim: bytes(share)}, sk)
    with pytest.raises(SecAggError, match="does not match its commitment"):
        r.server.aggregate(masked, replies)
    assert used and used[0] >= 4


def test_a_pool_that_fails_falls_back_to_combining_here_and_says_so(
    monkeypatch, caplog, reference_shamir
):
    from fedrec.shared.federation import secagg

    def broken(_workers):
        raise AssertionError("daemonic processes are not allowed to have children")

    monkeypatch.setattr(secagg, "_combine_pool", broken)
    monkeypatch.setattr(secagg, "_POOL_FAILED", False)
    rng = np.random.default_rng(8)
    secrets_ = [rng.bytes(16) for _ in range(secagg.PARALLEL_COMBINE_MIN)]
    groups = [secagg.split_secret(s, 3, 5)[:3] for s in secrets_]
    with caplog.at_level(logging.WARNING, logger="fedrec.secagg"):
        assert secagg.combine_many(groups, workers=2) == secrets_
    assert "pool failed" in caplog.text and "AssertionError" in caplog.text
    assert secagg._POOL_FAILED  # not tried again in this process
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedrec.secagg"):
        assert secagg.combine_many(groups, workers=2) == secrets_
    assert "pool failed" not in caplog.text
