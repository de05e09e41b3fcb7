"""Flower 1.41's simulation runtime, made linear in the number of pending messages.

In a simulation, Flower's engine thread (``vce_api.add_messages_to_queue``) asks the in-memory
link state, ten times a second, for the next message of **every** simulated node, and
``InMemoryLinkState.get_message_ins`` answers each of those calls by scanning (and re-validating)
every stored message. With ``N`` nodes and ``M`` messages in flight that is ``N * M`` checks a
tick: about 900,000 for a 943-client round, run under the state's lock and the GIL beside the
ServerApp and the threads feeding Ray. A profile of the simulation process in a 471-client
SecAgg+ round put 55-65 % of its samples in that scan.

:func:`install` gives ``InMemoryLinkState`` a per-node index of undelivered messages: a message
is filed under its destination when stored, and ``get_message_ins(node, limit)`` walks only that
node's entries, with the same validation (``_check_stored_messages``, which deletes expired or
invalid messages), the same order (storage order) and the same delivery marking as Flower's.
What it does not do is re-validate the *other* nodes' messages on every call: an expired message
is still deleted, when its own node is next polled (every node is, every tick), and expired
messages already delivered are handled by ``get_message_res`` as before.
``tests/test_sim_runtime.py`` drives Flower's method and this one through the same random
store/deliver/expire/delete sequences and requires the same answers. It assumes what Flower's
``InMemoryGrid`` guarantees: message ids are never reused (each push gets a fresh uuid4); an id
stored again after an expired message of that id was still pending could go undelivered.

Installed by the ServerApp when it runs inside a simulation (its grid is Flower's
``InMemoryGrid``, the engine in the same process); only for the Flower version it was written
against; ``FEDREC_FLOWER_LINKSTATE_INDEX=0`` leaves Flower as it is (``bench_round`` measures
both).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fedrec.server")

FLWR_VERSION = "1.41.0"  # the in-memory link state this was written against
ENV = "FEDREC_FLOWER_LINKSTATE_INDEX"
# whether install() ran in this process, and with what outcome (None: never called, e.g. a
# deployment's ServerApp; metrics.json's "runtime" records it)
INSTALLED: bool | None = None
_INDEX = "_fedrec_pending"  # the instance attribute: {dst node id: [message ids, stored order]}


def _index(state: Any) -> dict[int, list[str]]:
    """The state's per-node index, built from the store the first time (messages stored before
    the index existed are filed in storage order)."""
    idx = state.__dict__.get(_INDEX)
    if idx is None:
        idx = {}
        for mid, msg in state.message_ins_store.items():
            if msg.metadata.delivered_at == "":
                idx.setdefault(msg.metadata.dst_node_id, []).append(mid)
        state.__dict__[_INDEX] = idx
    return idx


def indexed_store(original: Callable[..., str | None]) -> Callable[..., str | None]:
    """``store_message_ins`` that also files a newly stored message under its destination."""

    def store_message_ins(self: Any, message: Any) -> str | None:
        with self.lock:
            idx = _index(self)
            known = message.metadata.message_id in self.message_ins_store
            mid = original(self, message)
            if mid is not None and not known and mid in self.message_ins_store:
                pending = idx.setdefault(message.metadata.dst_node_id, [])
                if mid in pending:  # an id deleted and stored again goes last, as in the dict
                    pending.remove(mid)
                pending.append(mid)
            return mid

    return store_message_ins


def indexed_get(original: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    """``get_message_ins`` that walks only ``node_id``'s pending messages (Flower's own method
    for calls without a limit)."""

    def get_message_ins(
        self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Any]:
        if limit is None:
            return original(self, node_id, limit, run_id=run_id)
        if limit < 1:
            raise AssertionError("`limit` must be >= 1")
        out: list[Any] = []
        with self.lock:
            idx = _index(self)
            pending = idx.get(node_id, [])
            keep: list[str] = []
            for i, mid in enumerate(pending):
                if len(out) == limit:
                    keep.extend(pending[i:])
                    break
                self._check_stored_messages({mid})  # Flower's validation (deletes bad ones)
                msg = self.message_ins_store.get(mid)
                if msg is None or msg.metadata.delivered_at != "":
                    continue  # deleted, or delivered by another path: no longer pending
                if msg.metadata.dst_node_id != node_id:
                    continue
                if run_id is not None and msg.metadata.run_id != run_id:
                    keep.append(mid)
                    continue
                out.append(msg)
            if keep:
                idx[node_id] = keep
            else:
                idx.pop(node_id, None)
        if out:
            from flwr.supercore.date import now

            delivered_at = now().isoformat()
            for msg in out:
                msg.metadata.delivered_at = delivered_at
        return out

    return get_message_ins


def install(cls: Any = None) -> bool:
    """Give Flower's ``InMemoryLinkState`` (or ``cls``) the per-node index; True if it has it.
    Refused (False, with a log line) for another Flower version or with ``ENV=0``."""
    if cls is not None:  # another class (a test's): not what this process's runs use
        return _install(cls)
    global INSTALLED
    INSTALLED = _install(None)
    return INSTALLED


def _install(cls: Any) -> bool:
    if os.environ.get(ENV, "1") == "0":
        log.info("%s=0: Flower's in-memory link state left as it is", ENV)
        return False
    if cls is None:
        import flwr

        if flwr.__version__ != FLWR_VERSION:
            log.info(
                "flwr %s, not %s: Flower's in-memory link state left as it is",
                flwr.__version__,
                FLWR_VERSION,
            )
            return False
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

        cls = InMemoryLinkState
    if getattr(cls, "_fedrec_indexed", False):
        return True
    cls.store_message_ins = indexed_store(cls.store_message_ins)
    cls.get_message_ins = indexed_get(cls.get_message_ins)
    cls._fedrec_indexed = True
    log.info("Flower's in-memory link state: per-node message index installed")
    return True
