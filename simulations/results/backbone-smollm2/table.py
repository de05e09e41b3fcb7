"""Print the federated table of this folder's README from the runs' files (never typed).

Usage, from the repository: python simulations/results/backbone-smollm2/table.py

The `silos` preset with SmolLM2 (``runs/``) beside the preset's three MiniLM runs
(``../fed-A-silo10-batch/runs/q10-r3-lr16-seed*``): validation NDCG@10 by round, test NDCG@10 and
HR@10, the epsilon each run spent, the run's wall-clock seconds and its audit.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESET = HERE.parent / "fed-A-silo10-batch" / "runs"


def row(run: Path, label: str) -> str:
    c = json.loads((run / "config.json").read_text())["federation"]
    m = json.loads((run / "metrics.json").read_text())
    first = json.loads((run / "privacy" / "ledger.jsonl").read_text().splitlines()[0])
    valid = [
        json.loads(line)["valid_NDCG@10"]
        for line in (run / "progress.jsonl").read_text().splitlines()
        if "valid_NDCG@10" in line
    ]
    audit = (run / "audit.txt").read_text() if (run / "audit.txt").is_file() else ""
    test = m["model"]["metrics"]["test"]
    return (
        f"| {label} | {c['backbone']} | {c['seed']} | {first['noise_multiplier']:.3f} "
        f"| {m['privacy']['epsilon_max']:.3f} | "
        + " / ".join(f"{v:.4f}" for v in valid)
        + f" | {test['NDCG@10']:.4f} | {test['HR@10']:.4f} | {m['seconds']:.0f} "
        f"| {'PASS' if 'Result: PASS' in audit else ''} |"
    )


print(
    "| run | backbone | seed | DP-SGD noise multiplier | epsilon | valid NDCG@10 by round "
    "(0, 1, ...) | test NDCG@10 | test HR@10 | run seconds | audit |"
)
print("|---|---|---:|---:|---:|---|---:|---:|---:|---|")
for run in sorted(PRESET.glob("q10-r3-lr16-seed*")):
    print(row(run, f"`../fed-A-silo10-batch/runs/{run.name}` (the preset)"))
for run in sorted(HERE.glob("runs/*/metrics.json")):
    print(row(run.parent, f"`runs/{run.parent.name}`"))
