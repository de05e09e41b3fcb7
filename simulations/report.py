"""Markdown tables from run directories, so that README numbers come from results files.

Run: ``python -m fedrec.simulations.report runs/baselines-A runs/baselines-B runs/baselines-C``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = {
    "A": ["HR@10", "NDCG@10", "MRR@10", "Recall@20", "NDCG@20", "AUC"],
    "B": ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "AUC"],
    "C": ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "AUC"],
}


def _params(entry: dict[str, Any]) -> str:
    params = entry.get("params") or {}
    if "backbone" in params:
        return ""
    return ", ".join(f"{k} {v}" for k, v in params.items())


def tables(run: Path) -> str:
    """One Markdown table per test set of a run's ``metrics.json``."""
    result = json.loads((run / "metrics.json").read_text())
    protocol = result["protocol"]
    cols = COLUMNS[protocol]
    tests = result["split"]["tests"] if result.get("split") else result["model"]["metrics"]
    tests = {k: (v if isinstance(v, int) else v.get("n_queries", "?")) for k, v in tests.items()}
    out = []
    for test, n in tests.items():
        lines = [
            f"| protocol {protocol}, {test} ({n} users) | " + " | ".join(cols) + " |",
            "| --- " * (len(cols) + 1) + "|",
        ]
        rows = dict(result["baselines"])
        if "model" in result:  # a train-central run: fedrec's own row first
            rows = {"**fedrec (central)**": result["model"], **rows}
        for name, entry in rows.items():
            m = entry["metrics"][test]
            label = name + (f" ({_params(entry)})" if _params(entry) else "")
            lines.append(f"| {label} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n\n".join(tables(Path(a)) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
