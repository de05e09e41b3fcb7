"""Print this folder's tables from its runs' files, the pooled runs' (``../fed-A-pooled-step``)
and ``paired.json`` (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-server-noise/table.py
"""

import importlib.util
import json
import statistics
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
POOLED = HERE.parent / "fed-A-pooled-step" / "runs"


def pooled_table() -> ModuleType:
    """``../fed-A-pooled-step/table.py``, whose paired-comparison table this folder prints too."""
    spec = importlib.util.spec_from_file_location("pooled_table", POOLED.parent / "table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    m = json.loads((run / "metrics.json").read_text())
    progress = (run / "progress.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in progress]
    return {
        "run": str(run.relative_to(HERE.parent)),
        "how": (
            f"{c['silos']} silos, noise at the server"
            if c.get("dp_noise") == "server"
            else f"{c['silos']} silo, central DP-SGD"
        )
        + (", full batch" if c["sample_rate"] == 1 else ""),
        "q": c["sample_rate"],
        "rounds": c["num_rounds"],
        "epsilon": c["epsilon"],
        "lr": c["lr"],
        "seed": c["seed"],
        "valid": [r["valid_NDCG@10"] for r in rows if "valid_NDCG@10" in r],
        "test": m["model"]["metrics"]["test"],
        "spent": m["privacy"]["epsilon_max"],
        "std": sorted({r["server_noise_std"] for r in rows if "server_noise_std" in r}),
        "seconds": m["seconds"],
    }


def summary(label: str, rs: list[dict]) -> str:
    t = [r["test"]["NDCG@10"] for r in rs]
    v = statistics.median(r["valid"][-1] for r in rs)
    return (
        f"| {label} | {len(rs)} | {v:.4f} | "
        f"{statistics.median(t):.4f} ({min(t):.4f} to {max(t):.4f}) |"
    )


def main() -> None:
    pooled = [load(p.parent) for p in sorted(POOLED.glob("*/metrics.json"))]
    mine = [load(p.parent) for p in sorted((HERE / "runs").glob("*/metrics.json"))]
    print(
        "| run | how | epsilon | seed | epsilon spent | valid NDCG@10 by step (0, 10, 20, 30) | "
        "test NDCG@10 | test HR@10 | test NDCG@20 | server noise std | seconds |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|")
    for r in pooled + mine:
        v = " / ".join(f"{x:.4f}" for x in r["valid"])
        t = r["test"]
        std = ", ".join(f"{x:.3e}" for x in r["std"]) or "-"
        print(
            f"| `{r['run']}` | {r['how']} | {r['epsilon']:g} | {r['seed']} | {r['spent']:.3f} | "
            f"{v} | {t['NDCG@10']:.4f} | {t['HR@10']:.4f} | {t['NDCG@20']:.4f} | {std} | "
            f"{r['seconds']:.0f} |"
        )
    print()
    print("| setting | runs | last valid NDCG@10 median | test NDCG@10 median (min to max) |")
    print("|---|---:|---:|---|")
    full = [r for r in mine if r["q"] == 1]
    mine = [r for r in mine if r["q"] != 1]
    eight = [r for r in mine if r["epsilon"] == 8]
    print(summary("pooled: one silo, central DP-SGD, epsilon 8, seeds 0 to 4", pooled))
    print(summary("pooled, seeds 0 to 2", [r for r in pooled if r["seed"] < 3]))
    print(summary("10 silos, noise at the server, epsilon 8, all seeds", eight))
    print(
        summary("10 silos, noise at the server, seeds 0 to 2", [r for r in eight if r["seed"] < 3])
    )
    others = sorted({(r["epsilon"], r["lr"]) for r in mine if r["epsilon"] != 8}, reverse=True)
    for eps, lr in others:
        rs = [r for r in mine if (r["epsilon"], r["lr"]) == (eps, lr)]
        print(summary(f"10 silos, noise at the server, epsilon {eps:g}, lr {lr:g}", rs))
    for eps, rounds in sorted({(r["epsilon"], r["rounds"]) for r in full}, reverse=True):
        rs = [r for r in full if (r["epsilon"], r["rounds"]) == (eps, rounds)]
        label = f"10 silos, noise at the server, full batch, {rounds} rounds, epsilon {eps:g}"
        print(summary(label, rs))
    # the epsilon 3 and 1 runs of seeds 1 and 2 (2026-12-08) are compared in a file of their own
    printer = pooled_table()
    for name in ("paired.json", "paired-2026-12-08.json"):
        printer.print_paired(HERE / name)


if __name__ == "__main__":
    main()
