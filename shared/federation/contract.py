"""The message contract between fedrec's ServerApp and ClientApp: what each message holds.

Both sides import these names (``server/`` never imports ``client/``; ``tests/test_layering.py``
checks it), so the server's reply check (:mod:`fedrec.server.strategy`) and the client's replies
(:mod:`fedrec.client.app`) cannot drift apart.

Server -> client (train and evaluate): an ``ArrayRecord`` :data:`ARRAYS` (the global travelling
tensors, :mod:`fedrec.shared.federation.params`) and a ``ConfigRecord`` :data:`CONFIG` holding
every ``FedConfig`` key (kebab-case, :meth:`FedConfig.to_flat`) plus :data:`EXTRA_KEYS`.

Client -> server (train): a ``MetricRecord`` :data:`METRICS` with exactly :data:`TRAIN_METRICS`,
a ``ConfigRecord`` :data:`CLIENT` with :data:`CLIENT_FIELDS`, and, when the client trained,
:data:`ARRAYS` (its travelling tensors) and, in round :data:`SEGMENT_ROUND` of a run with
``segment-prior``, :data:`SEGMENTS` (its noised segment counts). Evaluate replies:
:data:`METRICS` with exactly :data:`EVAL_METRICS`. Never item ids, histories or texts.
"""

from __future__ import annotations

# record names in a message's RecordDict; CONFIG and ARRAYS are Flower FedAvg's default keys
CONFIG = "config"
ARRAYS = "arrays"
METRICS = "metrics"
CLIENT = "client"
# with run config segment-prior, in the run's first round: an ArrayRecord holding one array,
# "counts" (segments x catalog items, float64): the client's interaction counts per (segment,
# item), noised under local DP (fedrec.shared.federation.segments)
SEGMENTS = "segments"
SEGMENT_ROUND = 1  # the server round whose train replies carry it
REPLY_RECORDS = frozenset({METRICS, ARRAYS, CLIENT, SEGMENTS})  # anything else is rejected

# round-config keys beside FedConfig's: Flower's round number, the server's catalog fingerprint
# (:func:`fedrec.shared.federation.data_and_model.catalog_digest`), the run directory (where a
# simulated client mirrors its budget file)
EXTRA_KEYS = ("server-round", "catalog", "run-dir")

# a train reply's metrics, all of them, always (under DP the data-dependent ones are constants)
TRAIN_METRICS = (
    "num-examples",
    "trained",
    "loss",
    "epsilon",
    "steps",
    "total-steps",
    "noise-multiplier",
    "sample-rate",
    "seconds",
)
# an evaluate reply's metrics: sums over the client's test queries, weighted by num-queries
EVAL_METRICS = ("num-queries", "HR@10", "NDCG@10")

# the CLIENT record: the client's name (``p<partition>`` in simulation), why it did not train
# ("" if it did), and its accountant's (sigma, q, steps) runs as JSON (public parameters)
CLIENT_FIELDS = ("name", "reason", "history")
