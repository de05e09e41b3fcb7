"""Print this folder's table from its runs' files (never typed by hand).

Usage, from the repository: python simulations/results/baseline-seeds/table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    runs = sorted(
        (HERE / "runs").glob("A-seed*/metrics.json"),
        key=lambda p: int(p.parent.name.removeprefix("A-seed")),
    )
    names = ("als", "bpr")
    print("| seed | ALS setting chosen | ALS valid | ALS test | BPR setting chosen | BPR valid "
          "| BPR test | seconds |")  # fmt: skip
    print("|---:|---|---:|---:|---|---:|---:|---:|")
    tests: dict[str, list[float]] = {n: [] for n in names}
    valids: dict[str, list[float]] = {n: [] for n in names}
    for m in runs:
        seed = json.loads((m.parent / "config.json").read_text())["seed"]
        b = json.loads(m.read_text())["baselines"]
        cells = []
        for n in names:
            p = b[n]["params"]
            v, t = b[n]["valid"]["NDCG@10"], b[n]["metrics"]["test"]["NDCG@10"]
            valids[n].append(v)
            tests[n].append(t)
            cells.append(f"{', '.join(f'{k} {x:g}' for k, x in p.items())} | {v:.4f} | {t:.4f}")
        secs = json.loads(m.read_text())["seconds"]
        print(f"| {seed} | {' | '.join(cells)} | {secs:.0f} |")
    print()
    print("| baseline | seeds | valid NDCG@10 median (min to max) | "
          "test NDCG@10 median (min to max) |")  # fmt: skip
    print("|---|---:|---|---|")
    for n in names:
        v, t = valids[n], tests[n]
        print(
            f"| {n} | {len(t)} | {statistics.median(v):.4f} ({min(v):.4f} to {max(v):.4f}) | "
            f"{statistics.median(t):.4f} ({min(t):.4f} to {max(t):.4f}) |"
        )


if __name__ == "__main__":
    main()
