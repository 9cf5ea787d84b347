"""Layout checks of every figure and of table.md: what a reader of runs/*/evaluation and failure sees.

Each figure is built at the size it is saved at, with the titles ``ltau-lmp evaluate`` gives it,
and drawn; every title, axis label, tick label, colour-bar label and legend must lie inside the
image (a cut title is what users met), and the legends must name what the figure shows.
"""

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from ltau_lmp.evaluation import plots
from ltau_lmp.evaluation.evaluate import results_table
from ltau_lmp.evaluation.metrics import DEFAULT_LEVELS, first_crossing, summarize

RNG = np.random.default_rng(0)
TRUE = 10 ** RNG.uniform(-3, 0.5, 800)
PRED = TRUE * RNG.lognormal(0, 0.5, 800)
HOT_TRUE, HOT_PRED = 5 * TRUE[:300], 2 * PRED[:300]
STEPS = np.arange(0, 3000, 20)
PRED_MAX = 0.02 * np.exp(STEPS / 700)
TRUE_MAX = 0.015 * np.exp(STEPS / 650) * (1 + 0.2 * np.sin(STEPS / 50))
HALT = first_crossing(STEPS, PRED_MAX, 0.5)  # where fix ltau's halt condition is met
P_BELOW = np.clip(RNG.uniform(size=800), 0, 1)


def _roc(title):
    return plots.roc_figure({"liquid": (PRED, PRED + 10), "hot": (PRED, PRED + 10), "vacancy": (PRED, PRED[::-1])},
                            title=title)


FIGURES = {
    "error_scatter": lambda: plots.error_scatter_figure(TRUE, PRED, title="test: predicted vs true force error"),
    "error_scatter_all": lambda: plots.error_scatter_sets_figure(
        {"test": (TRUE, PRED), "liquid": (HOT_TRUE, HOT_PRED), "hot": (HOT_TRUE * 2, HOT_PRED)},
        title="all sets: predicted vs true force error"),
    "calibration": lambda: plots.calibration_figure(
        {"test": (DEFAULT_LEVELS, DEFAULT_LEVELS), "liquid": (DEFAULT_LEVELS, DEFAULT_LEVELS ** 3)}),
    "reliability": lambda: plots.reliability_figure(
        {"test": (P_BELOW, TRUE < 0.05), "liquid": (P_BELOW[:300], HOT_TRUE < 0.05)}, tol=0.05),
    "roc_expected": lambda: _roc("Out-of-domain detection by expected error (test = negatives)"),
    "roc_distance": lambda: _roc("Out-of-domain detection by kNN distance (test = negatives)"),
    "failure_timeline": lambda: plots.failure_timeline_figure(STEPS, PRED_MAX, TRUE_MAX, 0.5, halt_step=HALT,
                                                              failure_threshold=1.0),
}


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _text_boxes(fig):
    """(what, window extent) of every piece of text on the figure that is drawn."""
    renderer = _drawn(fig)
    boxes = []
    if fig._suptitle is not None and fig._suptitle.get_text():
        boxes.append(("figure title", fig._suptitle.get_window_extent(renderer)))
    for i, ax in enumerate(fig.axes):
        for title in (ax.title, ax._left_title, ax._right_title):
            if title.get_text():
                boxes.append((f"axes {i} title {title.get_text()!r}", title.get_window_extent(renderer)))
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if axis.label.get_text():
                boxes.append((f"axes {i} {name} label {axis.label.get_text()!r}",
                              axis.label.get_window_extent(renderer)))
            for label in axis.get_ticklabels(which="both"):
                if label.get_visible() and label.get_text():
                    x, y = label.get_position()
                    lo, hi = sorted(axis.get_view_interval())
                    if lo <= (x if name == "x" else y) <= hi:  # labels of ticks in view are the drawn ones
                        boxes.append((f"axes {i} {name} tick label {label.get_text()!r}",
                                      label.get_window_extent(renderer)))
        if ax.get_legend() is not None:
            boxes.append((f"axes {i} legend", ax.get_legend().get_window_extent(renderer)))
    return boxes


def _legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_text_lies_inside_the_image(name):
    fig = FIGURES[name]()
    frame = fig.bbox
    outside = [what for what, box in _text_boxes(fig)
               if box.x0 < frame.x0 - 0.5 or box.y0 < frame.y0 - 0.5
               or box.x1 > frame.x1 + 0.5 or box.y1 > frame.y1 + 0.5]
    assert not outside, f"{name}.png cuts off: {outside}"


def test_hexbin_colour_bar_says_what_it_counts():
    fig = FIGURES["error_scatter"]()
    labels = [ax.yaxis.label.get_text() for ax in fig.axes]
    assert "atoms per hexbin cell" in labels


def test_pooled_scatter_has_a_colour_and_a_legend_entry_per_set():
    fig = FIGURES["error_scatter_all"]()
    ax = fig.axes[0]
    legend = ax.get_legend()
    entries = {t.get_text().split("\n")[0]: h for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert list(entries) == ["test", "liquid", "hot", "y = x"]
    set_colours = {tuple(to_rgb(entries[name].get_color())) for name in ("test", "liquid", "hot")}
    drawn = {tuple(np.round(c[:3], 6)) for c in ax.collections[0].get_facecolors()}
    assert len(set_colours) == 3 and drawn == {tuple(np.round(c, 6)) for c in set_colours}


def test_pooled_scatter_subsamples_large_sets_and_says_so():
    many = 10 ** RNG.uniform(-3, 0, 10_000)
    fig = plots.error_scatter_sets_figure({"big": (many, many)}, max_points=1000)
    assert len(fig.axes[0].collections[0].get_offsets()) == 1000
    assert "10000 atoms, 1000 shown" in _legend_texts(fig)[0]


def test_perfect_roc_curves_are_visible():
    """A perfect detector's curve runs along x = 0 and y = 1: it must not sit under the spines."""
    fig = FIGURES["roc_distance"]()
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    perfect = [line for line in ax.get_lines() if "AUROC 1.000" in line.get_label()]
    assert len(perfect) == 2
    for line in perfect:
        assert not line.get_clip_on() or (x0 < 0 and y1 > 1)
    assert x0 < 0 < 1 < x1 and y0 < 0 < 1 < y1, "the unit square needs a margin"
    # two perfect detectors draw the same curve: the one underneath must be wider to show
    assert perfect[0].get_linewidth() > perfect[1].get_linewidth()


def test_reliability_legend_names_every_set():
    entries = _legend_texts(FIGURES["reliability"]())
    assert any(t.startswith("test (ECE") for t in entries)
    assert any(t.startswith("liquid (ECE") for t in entries)


def _timeline_lines(fig):
    ax = fig.axes[0]
    legend = ax.get_legend()
    by_label = dict(zip((t.get_text() for t in legend.get_texts()), legend.legend_handles))
    halt = next(h for label, h in by_label.items() if label.startswith("halt"))
    cross = next(h for label, h in by_label.items() if label.startswith("predicted crosses"))
    drawn = {line.get_label(): line for line in ax.get_lines()}
    return drawn[halt.get_label()], drawn[cross.get_label()]


def test_timeline_halt_line_does_not_hide_the_crossing_at_the_same_step():
    fig = plots.failure_timeline_figure(STEPS, PRED_MAX, TRUE_MAX, 0.5, halt_step=HALT)
    _drawn(fig)
    halt, cross = _timeline_lines(fig)
    assert halt.get_xdata()[0] == cross.get_xdata()[0] == HALT
    assert halt.get_linestyle() != cross.get_linestyle()
    assert halt.get_color() != cross.get_color()
    assert cross.get_zorder() > halt.get_zorder(), "the crossing line must be drawn over the halt line"


def test_timeline_says_the_run_went_on_in_observe_mode():
    went_on = plots.failure_timeline_figure(STEPS, PRED_MAX, TRUE_MAX, 0.5, halt_step=HALT)
    assert any("observe mode" in t for t in _legend_texts(went_on))
    stopped = STEPS <= HALT
    halted = plots.failure_timeline_figure(STEPS[stopped], PRED_MAX[stopped], TRUE_MAX[stopped], 0.5, halt_step=HALT)
    texts = _legend_texts(halted)
    assert not any("observe mode" in t for t in texts)
    assert f"halted at step {HALT}" in texts


def test_table_header_carries_units():
    edges = np.logspace(-3, 1, 31)
    pdf = np.full((800, 30), 1 / 30)
    row = summarize(TRUE, PRED, pdf, edges, PRED, tol=0.1)
    row.update(force_rmse_component=0.1, alarm_rate_expected=0.1, alarm_rate_ood=0.1)
    ood = {**row, "auroc_expected": 0.9, "auroc_distance": 0.9, "auroc_ood": 0.9}
    header = results_table({"test": row, "hot": ood}).splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert len(columns) == len(ood)
    no_unit = [c for c in columns if not c.endswith(")")]
    assert not no_unit, f"table.md columns without a unit: {no_unit}"
    assert "mean_true_error (eV/Å)" in columns and "median_distance (latent units)" in columns
