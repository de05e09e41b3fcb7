"""Print this folder's tables from its runs' files, the trusted-server runs' of
``../fed-A-server-noise`` (the same step with the noise added by a trusted server) and
``paired.json`` (never typed by hand).

Usage, from the repository: python simulations/results/fed-A-secure-interaction/table.py
"""

import importlib.util
import json
import statistics
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
TRUSTED = HERE.parent / "fed-A-server-noise" / "runs"


def pooled_table() -> ModuleType:
    """``../fed-A-pooled-step/table.py``, whose paired-comparison table this folder prints too."""
    path = HERE.parent / "fed-A-pooled-step" / "table.py"
    spec = importlib.util.spec_from_file_location("pooled_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(run: Path) -> dict:
    c = json.loads((run / "config.json").read_text())["federation"]
    m = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    p = m["privacy"]
    secure = p.get("secure_interaction")
    if secure is not None:  # noise in the secure sum: its std on the summed change
        std, where = secure["noise_std_on_sum"], "in the secure sum"
        rounds = [
            json.loads(line)["seconds"]
            for line in (run / "privacy" / "secagg.jsonl").read_text().splitlines()
        ]
    else:  # noise added by the trusted server
        std = statistics.median(r["server_noise_std"] for r in rows if "server_noise_std" in r)
        where, rounds = "at the trusted server", []
    return {
        "run": str(run.relative_to(HERE.parent)),
        "how": f"{c['silos']} silos, noise {where}, q {c['sample_rate']:g}, lr {c['lr']:g}",
        "q": c["sample_rate"],
        "rounds": c["num_rounds"],
        "epsilon": c["epsilon"],
        "lr": c["lr"],
        "seed": c["seed"],
        "secure": secure is not None,
        "valid": [r["valid_NDCG@10"] for r in rows if "valid_NDCG@10" in r],
        "test": m["model"]["metrics"]["test"],
        "spent": p["epsilon_max"],
        "std": std,
        "round_seconds": statistics.median(rounds) if rounds else None,
        "seconds": m["seconds"],
    }


def summary(label: str, rs: list[dict]) -> str:
    t = [r["test"]["NDCG@10"] for r in rs]
    return f"| {label} | {len(rs)} | {statistics.median(t):.4f} ({min(t):.4f} to {max(t):.4f}) |"


def main() -> None:
    mine = [load(p.parent) for p in sorted((HERE / "runs").glob("*/metrics.json"))]
    trusted = [load(p.parent) for p in sorted(TRUSTED.glob("*/metrics.json"))]
    # the trusted-server runs of the same shape (q 0.1, 30 rounds), at every epsilon they ran
    trusted = [r for r in trusted if r["q"] != 1 and r["rounds"] == 30]
    print(
        "| run | how | epsilon | seed | epsilon spent | valid NDCG@10 by round (0, 10, 20, 30) | "
        "test NDCG@10 | test HR@10 | test NDCG@20 | noise std on the sum | round s (median) | "
        "seconds |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in mine + trusted:
        v = " / ".join(f"{x:.4f}" for x in r["valid"])
        t = r["test"]
        s = f"{r['round_seconds']:.0f}" if r["round_seconds"] is not None else "-"
        print(
            f"| `{r['run']}` | {r['how']} | {r['epsilon']:g} | {r['seed']} | {r['spent']:.3f} | "
            f"{v} | {t['NDCG@10']:.4f} | {t['HR@10']:.4f} | {t['NDCG@20']:.4f} | "
            f"{r['std']:.4f} | {s} | {r['seconds']:.0f} |"
        )
    print()
    print("| setting | runs | test NDCG@10 median (min to max) |")
    print("|---|---:|---|")
    for eps in sorted({r["epsilon"] for r in mine + trusted}, reverse=True):
        for label, rs in (
            ("10 silos, full batch, noise in the secure sum (no trusted server)", mine),
            ("10 silos, q 0.1, noise at the trusted server", trusted),
        ):
            for lr in sorted({r["lr"] for r in rs if r["epsilon"] == eps}, reverse=True):
                same = [r for r in rs if r["epsilon"] == eps and r["lr"] == lr]
                print(summary(f"{label}, epsilon {eps:g}, lr {lr:g}", same))
    pooled_table().print_paired(HERE / "paired.json")


if __name__ == "__main__":
    main()
