"""Print this folder's table from its runs' files (never typed by hand): the
``silos-trusted-server`` preset at 45 rounds (``runs/srv-r45-seedS``) beside the preset's five
30-round runs at epsilon 8 (``../fed-A-server-noise/runs/srv-fac16-lr48-seedS``), read with that
folder's loader.

Usage, from the repository: python simulations/results/fed-A-server-rounds/table.py
"""

import importlib.util
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
EARLIER = HERE.parent / "fed-A-server-noise"


def earlier_table() -> ModuleType:
    """``../fed-A-server-noise/table.py``: its ``load`` reads a run of this preset, its
    ``summary`` prints a setting's medians."""
    spec = importlib.util.spec_from_file_location("server_noise_table", EARLIER / "table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    module = earlier_table()
    load, summary = module.load, module.summary
    earlier = [load(EARLIER / "runs" / f"srv-fac16-lr48-seed{s}") for s in range(5)]
    mine = [load(p.parent) for p in sorted((HERE / "runs").glob("*/metrics.json"))]
    print(
        "| run | rounds | seed | epsilon spent | server noise std | valid NDCG@10 at each "
        "evaluation (round 0, then every 10 and the last) | test NDCG@10 | test HR@10 | seconds |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    for r in earlier + mine:
        v = " / ".join(f"{x:.4f}" for x in r["valid"])
        std = ", ".join(f"{x:.4e}" for x in r["std"])
        t = r["test"]
        print(
            f"| `{r['run']}` | {r['rounds']} | {r['seed']} | {r['spent']:.3f} | {std} | {v} | "
            f"{t['NDCG@10']:.4f} | {t['HR@10']:.4f} | {r['seconds']:.0f} |"
        )
    print()
    print("| setting | runs | last valid NDCG@10 median | test NDCG@10 median (min to max) |")
    print("|---|---:|---:|---|")
    for label, rs in (
        ("30 rounds (the preset), seeds 0 to 4", earlier),
        ("30 rounds (the preset), seeds 0 to 2", earlier[:3]),
        ("45 rounds, seeds 0 to 2", mine),
    ):
        if rs:
            print(summary(label, rs))


if __name__ == "__main__":
    main()
