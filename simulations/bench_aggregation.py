"""Server aggregation throughput: client updates per second for 10 to 10,000 clients.

Run: ``python -m fedrec.simulations.bench_aggregation --out FILE [--clients 10,100,1000,10000]``

Synthetic updates with the default model's travelling tensors (FFA-LoRA: the B matrices, item
bias, recency weights; ``--aggregator fedavg`` adds the A matrices) go through fedrec's real
``FedRecStrategy.aggregate_train``: Flower ``Message`` replies, the metric whitelist, key /
shape / finiteness checks, the unweighted mean, the server optimizer and one ledger line per
client (a temporary file). Two references, measured in the same run on the same replies:
Flower's stock ``flwr.serverapp.strategy.FedAvg.aggregate_train`` (its reply consistency
check, decoding every array, the weighted mean, the metric mean), which is what fedrec's checks
and ledger cost on top of, and the bare mean of already decoded tensors
(``torch.stack(...).mean(0)`` per tensor), the arithmetic alone. Medians of ``--repeats`` runs;
message construction is not timed (in a real round it happens in Flower's transport).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedrec.server.strategy import FedRecStrategy
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.federation.params import from_record, nbytes, to_record
from fedrec.shared.rundir import versions, write_json


def template(aggregator: str, *, r: int = 8, items: int = 1682) -> dict[str, torch.Tensor]:
    """The default MiniLM model's travelling tensors (shapes as ``travelling_state`` gives them
    for ML-100K: LoRA on the last layer's FFN output projection 1536 -> 384, item bias, the 20
    recency logits); values are synthetic."""
    base = "base_model.model.encoder.layer.5.output.dense"
    t = {f"{base}.lora_B.weight": torch.zeros(384, r)}
    if aggregator == "fedavg":
        t[f"{base}.lora_A.weight"] = torch.zeros(r, 1536)
    t["head.item_bias"] = torch.zeros(items)
    t["head.pos_logits"] = torch.zeros(20)
    return t


def _identity() -> None:
    """Messages are built inside a Flower task; give this process one, as the runtime does."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, attr, value)


def replies(tmpl: dict[str, torch.Tensor], n: int, seed: int) -> list[Message]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for node in range(1, n + 1):
        upd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tmpl.items()}
        to_node = Message(content=RecordDict(), dst_node_id=node, message_type="train")
        metrics = MetricRecord({"num-examples": 30, "trained": 1, "loss": 3.9, "epsilon": 2.1,
                                "steps": 8, "noise-multiplier": 1.1, "sample-rate": 0.5,
                                "seconds": 2.0, "total-steps": 8})  # fmt: skip
        client = ConfigRecord({"name": f"p{node}", "reason": ""})
        content = RecordDict({"metrics": metrics, "arrays": to_record(upd), "client": client})
        out.append(Message(content=content, reply_to=to_node))
    return out


def bench(ns: list[int], *, aggregator: str, repeats: int) -> dict[str, Any]:
    _identity()
    tmpl = template(aggregator)
    cfg = FedConfig(aggregator=aggregator, min_replies=2)
    points = []
    for n in ns:
        msgs = replies(tmpl, n, seed=n)
        t_fed, t_ref, t_flwr = [], [], []
        for rep in range(repeats):
            with tempfile.TemporaryDirectory() as d:
                s = FedRecStrategy(cfg, template=dict(tmpl), ledger=Path(d) / "ledger.jsonl")
                s.current = dict(tmpl)
                t = time.perf_counter()
                arrays, _ = s.aggregate_train(rep + 1, msgs)
                t_fed.append(time.perf_counter() - t)
                assert arrays is not None
            stock = FedAvg(fraction_evaluate=0.0)
            t = time.perf_counter()
            arrays, _ = stock.aggregate_train(rep + 1, msgs)
            t_flwr.append(time.perf_counter() - t)
            assert arrays is not None
            ups = [from_record(m.content.array_records["arrays"]) for m in msgs]
            t = time.perf_counter()
            {k: torch.stack([u[k] for u in ups]).mean(0) for k in tmpl}
            t_ref.append(time.perf_counter() - t)
        fed, ref = statistics.median(t_fed), statistics.median(t_ref)
        flwr = statistics.median(t_flwr)
        points.append({"clients": n, "seconds_median": fed, "reference_seconds_median": ref,
                       "flower_fedavg_seconds_median": flwr, "updates_per_second": n / fed,
                       "ratio_to_flower_fedavg": fed / flwr,
                       "ratio_to_bare_mean": fed / ref})  # fmt: skip
        print(f"{n:>6} clients: {n / fed:,.0f} updates/s ({fed:.3f} s; Flower FedAvg "
              f"{flwr:.3f} s; bare mean {ref:.4f} s)")  # fmt: skip
    return {
        "kind": "aggregation",
        "aggregator": aggregator,
        "update_bytes": nbytes(tmpl),
        "repeats": repeats,
        "points": points,
        "summary": [
            f"{p['clients']:,} clients: {p['updates_per_second']:,.0f} updates/s "
            f"(round aggregation {p['seconds_median']:.3f} s; "
            f"{p['ratio_to_flower_fedavg']:.2f}x Flower's stock FedAvg "
            f"({p['flower_fedavg_seconds_median']:.3f} s); {p['ratio_to_bare_mean']:.0f}x the "
            f"bare mean of decoded tensors ({p['reference_seconds_median'] * 1000:.1f} ms))"
            for p in points
        ]
        + [f"update size {nbytes(tmpl):,} bytes ({aggregator}); medians of {repeats} runs"],
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clients", default="10,100,1000,10000")
    ap.add_argument("--aggregator", default="ffa", choices=("ffa", "fedavg"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        ns = [int(x) for x in args.clients.split(",") if x.strip()]
        if not ns or min(ns) < 2:
            raise ValueError
    except ValueError:
        ap.error(f"--clients {args.clients!r}: comma-separated integers >= 2, e.g. 10,100,1000")
    write_json(args.out, bench(ns, aggregator=args.aggregator, repeats=args.repeats))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
