"""The per-node message index for Flower's in-memory link state (fedrec.server.sim_runtime):
the same answers as Flower's own ``get_message_ins`` on random message traffic."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import pytest
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from fedrec.server import sim_runtime


class FakeState:
    """What ``get_message_ins`` and ``store_message_ins`` touch in ``InMemoryLinkState``: the
    lock, the store, and a ``_check_stored_messages`` that deletes expired messages (Flower's
    deletes expired ones and ones whose nodes left the federation)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.message_ins_store: dict[str, SimpleNamespace] = {}
        self.expired: set[str] = set()

    def _check_stored_messages(self, message_ids: set[str], run_id: int | None = None) -> None:
        for mid in message_ids & self.expired:
            self.message_ins_store.pop(mid, None)

    def store_message_ins(self, message: SimpleNamespace) -> str | None:
        mid = message.metadata.message_id
        if message.metadata.dst_node_id < 0:  # an invalid destination: refused, not stored
            return None
        self.message_ins_store.setdefault(mid, message)
        return mid

    # Flower's own method, unbound, on this state
    get_message_ins = InMemoryLinkState.get_message_ins


class Indexed(FakeState):
    pass


sim_runtime.install(Indexed)


def _msg(mid: str, dst: int, run: int) -> SimpleNamespace:
    meta = SimpleNamespace(message_id=mid, dst_node_id=dst, run_id=run, delivered_at="")
    return SimpleNamespace(metadata=meta)


@pytest.mark.parametrize("seed", range(12))
def test_indexed_link_state_answers_like_flowers(seed):
    rng = random.Random(seed)
    flower, ours = FakeState(), Indexed()
    # some messages stored before the index exists (it is built from the store on first use)
    for i in range(rng.randrange(0, 6)):
        dst = rng.randrange(4)
        for s in (flower, ours):
            FakeState.store_message_ins(s, _msg(f"pre{i}", dst, 1))
    nodes = list(range(6))
    for step in range(400):
        op = rng.random()
        if op < 0.35:  # store (sometimes a duplicate id, sometimes an invalid destination)
            mid = f"m{rng.randrange(step + 1)}" if rng.random() < 0.1 else f"m{step}"
            dst = rng.choice(nodes) if rng.random() > 0.05 else -1
            run = rng.choice((1, 1, 2))
            got = [s.store_message_ins(_msg(mid, dst, run)) for s in (flower, ours)]
            assert got[0] == got[1]
        elif op < 0.45:  # a message expires (Flower's check deletes it when it looks)
            if flower.message_ins_store:
                mid = rng.choice(sorted(flower.message_ins_store))
                flower.expired.add(mid)
                ours.expired.add(mid)
        elif op < 0.5:  # the ServerApp deletes a message (its reply was pulled)
            if flower.message_ins_store:
                mid = rng.choice(sorted(flower.message_ins_store))
                for s in (flower, ours):
                    s.message_ins_store.pop(mid, None)
        else:  # the engine polls one node, as vce_api does (limit 1), or with a run filter
            node = rng.choice(nodes)
            limit = rng.choice((1, 1, 1, 2))
            run_id = rng.choice((None, None, 1, 2))
            a = flower.get_message_ins(node, limit, run_id=run_id)
            b = ours.get_message_ins(node, limit, run_id=run_id)
            assert [m.metadata.message_id for m in a] == [m.metadata.message_id for m in b]
            assert all(m.metadata.delivered_at != "" for m in b)
        # the undelivered messages that still exist are the same
        pend = [
            {k for k, m in s.message_ins_store.items() if m.metadata.delivered_at == ""}
            for s in (flower, ours)
        ]
        # Flower's scan deletes expired messages of every node on any call; ours when their
        # node is polled: compare what either could still deliver
        live = [p - s.expired for p, s in zip(pend, (flower, ours), strict=True)]
        assert live[0] == live[1]


def test_install_only_for_the_flower_version_it_was_written_for(monkeypatch):
    class Other(FakeState):
        pass

    monkeypatch.setenv(sim_runtime.ENV, "0")
    assert not sim_runtime.install(Other) and not getattr(Other, "_fedrec_indexed", False)
    monkeypatch.delenv(sim_runtime.ENV)
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    assert not sim_runtime.install()  # another Flower: left alone
    assert sim_runtime.install(Other) and Other._fedrec_indexed
    assert sim_runtime.install(Other)  # idempotent: not wrapped twice
    assert Other.get_message_ins.__qualname__.endswith("indexed_get.<locals>.get_message_ins")
