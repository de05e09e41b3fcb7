"""PNG plots for run directories (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training(
    trace: dict[str, Any], path: Path, *, baselines: dict[str, float] | None = None
) -> None:
    """Loss and validation NDCG@10 per epoch; baselines' validation NDCG@10 as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in trace["epochs"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [e["loss"] for e in trace["epochs"]], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss (full-catalog softmax)", title="Training loss")
    ndcg = [e.get("valid_NDCG@10") for e in trace["epochs"]]
    if any(v is not None for v in ndcg):
        ax2.plot(epochs, ndcg, marker="o", label="fedrec (central)")
        for i, (name, value) in enumerate((baselines or {}).items()):
            ax2.axhline(value, linestyle="--", color=f"C{i + 1}", label=name)
        ax2.set(xlabel="epoch", ylabel="NDCG@10", title="Validation NDCG@10")
        ax2.legend(fontsize=8, loc="lower right")
    else:
        ax2.text(0.5, 0.5, "no validation queries in this protocol", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
