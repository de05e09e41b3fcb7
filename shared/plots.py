"""PNG plots for run directories (matplotlib, Agg backend: no display needed).

``training.png`` (``fedrec train-central``) and ``rounds.png`` (a federated run). Every line has a
legend entry, each baseline its own colour and dash pattern, and round/epoch axes whole-number
ticks. ``tests/test_plots.py`` checks all three on the figures these functions build.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# one (colour, dash pattern) per baseline: C0 is fedrec's own line, and no two baselines share
# a colour or a pattern, so they stay apart in grey-scale print too
BASELINE_STYLES: tuple[tuple[str, Any], ...] = (
    ("C1", "--"),
    ("C2", ":"),
    ("C3", "-."),
    ("C4", (0, (5, 1, 1, 1, 1, 1))),
    ("C5", (0, (1, 3))),
    ("C6", (0, (8, 2))),
    ("C7", (0, (3, 1, 1, 1))),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _whole_ticks(ax: Axes) -> None:
    """Whole-number ticks on the x axis (rounds and epochs are counts)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _baselines(ax: Axes, values: Mapping[str, float]) -> None:
    """One horizontal line per baseline, each its own colour and pattern, labelled."""
    for i, (name, value) in enumerate(values.items()):
        color, dashes = BASELINE_STYLES[i % len(BASELINE_STYLES)]
        ax.axhline(value, color=color, linestyle=dashes, lw=1.2, label=f"{name} (baseline)")


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def training_figure(trace: dict[str, Any], *, baselines: dict[str, float] | None = None) -> Figure:
    """Loss and validation NDCG@10 per epoch; baselines' validation NDCG@10 as flat lines."""
    plt = _pyplot()
    epochs = [e["epoch"] for e in trace["epochs"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [e["loss"] for e in trace["epochs"]], marker="o", label="fedrec (central)")
    ax1.set(xlabel="epoch", ylabel="training loss (full-catalog softmax)", title="Training loss")
    ax1.legend(fontsize=8)
    _whole_ticks(ax1)
    ndcg = [e.get("valid_NDCG@10") for e in trace["epochs"]]
    if any(v is not None for v in ndcg):
        ax2.plot(epochs, ndcg, marker="o", label="fedrec (central)")
        _baselines(ax2, baselines or {})
        ax2.set(xlabel="epoch", ylabel="NDCG@10", title="Validation NDCG@10")
        ax2.legend(fontsize=8, loc="lower right")
        _whole_ticks(ax2)
    else:
        ax2.text(0.5, 0.5, "no validation queries in this protocol", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    return fig


def plot_training(
    trace: dict[str, Any], path: Path, *, baselines: dict[str, float] | None = None
) -> None:
    """``training.png``: :func:`training_figure` saved to ``path``."""
    _save(training_figure(trace, baselines=baselines), path)


def rounds_figure(
    rounds: list[dict[str, Any]],
    central: dict[int, dict[str, Any]],
    baselines: dict[str, Any],
) -> Figure:
    """A federated run per round: the clients' mean training loss, the global model's validation
    NDCG@10 (the server's evaluation) against the baselines', and the epsilon of the round's
    clients (max and median). ``rounds``: the strategy's per-round lines; ``central``: round ->
    ``{"valid_NDCG@10": ...}``; ``baselines``: name -> metrics.json's baseline entry."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    r = [x["round"] for x in rounds]
    loss = [x["loss"] if x["loss"] is not None else float("nan") for x in rounds]
    if any(x["loss"] is not None for x in rounds):
        axes[0].plot(r, loss, "o-", label="mean over the round's clients")
    else:  # under DP clients report no loss: it is a function of their data, not noised
        axes[0].text(0.5, 0.5, "not reported under DP\n(a client's loss is not private)",
                     ha="center", va="center", transform=axes[0].transAxes)  # fmt: skip
        axes[0].set_xticks([])
        axes[0].set_yticks([])
    axes[0].set(title="client training loss", xlabel="round")
    if central:
        ks = sorted(central)
        axes[1].plot(ks, [central[k]["valid_NDCG@10"] for k in ks], "o-", label="fedrec")
        _baselines(
            axes[1],
            {name: b["valid"]["NDCG@10"] for name, b in baselines.items() if "valid" in b},
        )
    else:
        axes[1].text(0.5, 0.5, "no validation rounds", ha="center", va="center")
    axes[1].set(title="validation NDCG@10", xlabel="round")
    axes[2].plot(r, [x["epsilon_max"] for x in rounds], "o-", label="max")
    axes[2].plot(r, [x["epsilon_median"] for x in rounds], "s--", label="median")
    axes[2].set(title="epsilon of this round's clients", xlabel="round")
    for ax in axes:
        if ax.get_lines():
            _whole_ticks(ax)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_rounds(
    path: Path,
    rounds: list[dict[str, Any]],
    central: dict[int, dict[str, Any]],
    baselines: dict[str, Any],
) -> None:
    """``rounds.png``: :func:`rounds_figure` saved to ``path``."""
    _save(rounds_figure(rounds, central, baselines), path)
