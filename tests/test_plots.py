"""rounds.png and training.png: every line labelled, baselines told apart, whole-number rounds."""

from __future__ import annotations

import pytest

from fedrec.shared.plots import plot_rounds, rounds_figure, training_figure

ROUNDS = [
    {"round": k, "loss": 2.0 - 0.1 * k, "epsilon_max": 0.5 * k, "epsilon_median": 0.4 * k}
    for k in (1, 2, 3)
]
CENTRAL = {2: {"valid_NDCG@10": 0.04}, 3: {"valid_NDCG@10": 0.05}}
BASELINES = {
    "popularity": {"valid": {"NDCG@10": 0.03}, "test": {}},
    "itemknn": {"valid": {"NDCG@10": 0.035}, "test": {}},
    "zeroshot": {"test": {}},  # no validation numbers: no line
}


def _check_labelled(fig) -> None:
    for ax in fig.axes:
        lines = ax.get_lines()
        if not lines:
            continue
        legend = ax.get_legend()
        assert legend is not None, f"'{ax.get_title()}' has lines but no legend"
        shown = [t.get_text() for t in legend.get_texts()]
        for line in lines:
            label = line.get_label()
            assert not label.startswith("_"), f"unlabelled line in '{ax.get_title()}'"
            assert label in shown, f"{label!r} missing from the legend of '{ax.get_title()}'"


def _dash_pattern(line) -> tuple:
    # matplotlib keeps the scaled (offset, on-off sequence) privately; no public getter
    return tuple(line._dash_pattern[1] or ())


def test_rounds_figure_labels_every_line_and_separates_baselines():
    fig = rounds_figure(ROUNDS, CENTRAL, BASELINES)
    _check_labelled(fig)
    ndcg = fig.axes[1]
    base = [ln for ln in ndcg.get_lines() if ln.get_label().endswith("(baseline)")]
    assert sorted(ln.get_label() for ln in base) == ["itemknn (baseline)", "popularity (baseline)"]
    # two baselines differ in colour AND in dash pattern (grey-scale print keeps them apart)
    colours = {ln.get_color() for ln in base}
    patterns = {_dash_pattern(ln) for ln in base}
    assert len(colours) == 2 and len(patterns) == 2
    fedrec = [ln for ln in ndcg.get_lines() if ln.get_label() == "fedrec"]
    assert fedrec and fedrec[0].get_color() not in colours


def test_round_axes_have_whole_number_ticks():
    fig = rounds_figure(ROUNDS, CENTRAL, BASELINES)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_training_figure_labels_baselines_and_whole_epochs():
    trace = {"epochs": [{"epoch": e, "loss": 3.0 - e, "valid_NDCG@10": 0.01 * e} for e in (1, 2)]}
    fig = training_figure(trace, baselines={"popularity": 0.015, "itemknn": 0.018, "als": 0.02})
    _check_labelled(fig)
    fig.canvas.draw()
    ax = fig.axes[1]
    base = [ln for ln in ax.get_lines() if ln.get_label().endswith("(baseline)")]
    assert len({(ln.get_color(), _dash_pattern(ln)) for ln in base}) == 3
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("central", [CENTRAL, {}])
def test_plot_rounds_writes_a_png(tmp_path, central):
    path = tmp_path / "sub" / "rounds.png"
    plot_rounds(path, ROUNDS, central, BASELINES)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
