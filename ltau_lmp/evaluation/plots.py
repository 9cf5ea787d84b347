"""Figures for the uncertainty metrics in :mod:`ltau_lmp.evaluation.metrics`.

Each ``plot_*`` function takes arrays and an output PNG path, writes the figure and returns the
path; the matching ``*_figure`` function builds the same :class:`~matplotlib.figure.Figure`
without writing it (for notebooks and for the layout tests). Figures are drawn on the Agg canvas
directly (no ``pyplot``), so plotting works on headless nodes and never touches the global
matplotlib backend or figure registry of the caller. Constrained layout keeps every label,
title and legend inside the image; titles longer than the figure is wide are wrapped.
"""

from __future__ import annotations

import os
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ltau_lmp.evaluation.metrics import (
    MetricInputError,
    first_crossing,
    auroc,
    miscalibration_area,
    reliability,
    roc_curve,
    spearman,
)

__all__ = [
    "plot_error_scatter",
    "plot_error_scatter_sets",
    "plot_calibration",
    "plot_reliability",
    "plot_roc",
    "plot_failure_timeline",
    "error_scatter_figure",
    "error_scatter_sets_figure",
    "calibration_figure",
    "reliability_figure",
    "roc_figure",
    "failure_timeline_figure",
    "plot_cartography",
    "cartography_figure",
    "plot_gap",
    "gap_figure",
]

ERROR_UNIT = "eV/Å"
UNIT_MARGIN = 0.02  # [0, 1] axes reach this far beyond the square: a perfect ROC curve runs along x = 0 and y = 1


def _figure(figsize=(5.0, 4.5)) -> Figure:
    fig = Figure(figsize=figsize, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _title(fig: Figure, text: str) -> None:
    """Figure title, wrapped at word boundaries to fit the figure width.

    A figure title (centred on the figure, room made by the layout) rather than an axes title,
    which is centred on the axes and runs off the image once a colour bar or legend shifts them.
    """
    title = fig.suptitle(text)
    renderer = fig.canvas.get_renderer()
    width = title.get_window_extent(renderer).width
    room = 0.94 * fig.bbox.width
    if width > room:
        chars = max(10, int(len(text) * room / width))
        head, paren, tail = text.rpartition(" (")  # "... by kNN distance\n(test = negatives)" reads best
        fits = paren and len(head) <= chars and len(tail) + 1 < chars
        title.set_text(f"{head}\n({tail}" if fits else textwrap.fill(text, chars))


def _count_axis(axis) -> None:
    """Plain numbers (20, 500, 10,000) on a log count axis instead of 2×10^1-style labels; minor
    ticks are labelled all within one decade, at 2 and 5 within two, else not at all."""

    def plain(value, _pos=None) -> str:
        return f"{value:,.0f}" if value >= 1 else f"{value:g}"

    def minor(value, _pos=None) -> str:
        lo, hi = sorted(axis.get_view_interval())
        mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
        span = hi / lo if lo > 0 else np.inf
        return plain(value) if span < 10 or (span < 100 and mantissa in (2, 5)) else ""

    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_formatter(FuncFormatter(minor))


def _positive(t, p, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Drop pairs that cannot sit on log axes; refuse if none is left."""
    t = np.asarray(t, dtype=float)
    p = np.asarray(p, dtype=float)
    keep = (t > 0) & (p > 0)
    if not np.any(keep):
        raise MetricInputError(f"{who} needs positive errors for log axes")
    return t[keep], p[keep]


def _diagonal(ax, lo: float, hi: float) -> None:
    """The y = x line and the axis labels both error scatters share."""
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel(f"true per-atom force error ({ERROR_UNIT})")
    ax.set_ylabel(f"predicted per-atom error ({ERROR_UNIT})")


def error_scatter_figure(true_error, predicted, title: str | None = None) -> Figure:
    """Log-log density of predicted vs true per-atom error, with y = x and Spearman in the title.

    A hexbin rather than a scatter, because test sets hold 10^5-10^6 atoms and overplotting
    would hide where the mass is.  Non-positive values cannot sit on log axes and are dropped.
    """
    rho = spearman(np.asarray(predicted, float), np.asarray(true_error, float))
    t, p = _positive(true_error, predicted, "plot_error_scatter")
    fig = _figure()
    ax = fig.add_subplot()
    hb = ax.hexbin(t, p, xscale="log", yscale="log", bins="log", gridsize=60, mincnt=1,
                   cmap="viridis")
    cb = fig.colorbar(hb, ax=ax, label="atoms per hexbin cell")
    _count_axis(cb.ax.yaxis)
    _diagonal(ax, min(t.min(), p.min()), max(t.max(), p.max()))
    ax.legend(loc="upper left")
    _title(fig, f"{title} (Spearman ρ = {rho:.3f})" if title else f"Spearman ρ = {rho:.3f}")
    return fig


def plot_error_scatter(true_error, predicted, path, title: str | None = None) -> str:
    """Write :func:`error_scatter_figure` to ``path``."""
    return _save(error_scatter_figure(true_error, predicted, title), path)


def error_scatter_sets_figure(sets: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                              title: str | None = None, max_points: int = 4000, seed: int = 0) -> Figure:
    """Predicted vs true per-atom error of several data sets on one log-log axes, a colour per set.

    ``sets`` maps a name to ``(true_error, predicted)``. The sets are told apart by colour, which
    a density plot cannot do, so each set is a scatter of at most ``max_points`` atoms drawn at
    random (a uniform subsample keeps the set's shape), all in one shuffled layer so that no set
    hides another; the legend gives every set's Spearman ρ and atom count, the title the pooled ρ.
    """
    if not sets:
        raise MetricInputError("plot_error_scatter_sets needs at least one data set")
    rng = np.random.default_rng(seed)
    points, colours, handles = [], [], []
    for i, (name, (true_error, predicted)) in enumerate(sets.items()):
        try:  # a set of identical environments (a perfect crystal) has one predicted value
            rho = f"ρ = {spearman(np.asarray(predicted, float), np.asarray(true_error, float)):.3f}"
        except MetricInputError:
            rho = "ρ undefined"
        t, p = _positive(true_error, predicted, f"plot_error_scatter_sets ({name})")
        n = t.size
        if n > max_points:
            pick = rng.choice(n, max_points, replace=False)
            t, p = t[pick], p[pick]
        shown = f", {t.size} shown" if t.size < n else ""
        points.append(np.column_stack([t, p]))
        colours += [f"C{i}"] * t.size
        handles.append(Line2D([], [], ls="", marker="o", ms=5, color=f"C{i}",
                              label=f"{name}\n{rho}, {n} atoms{shown}"))
    xy = np.concatenate(points)
    order = rng.permutation(len(xy))
    fig = _figure((6.5, 4.5))
    ax = fig.add_subplot()
    size, alpha = (4, 0.4) if len(xy) > 2000 else (14, 0.8)  # faint dots only where they pile up
    ax.scatter(xy[order, 0], xy[order, 1], s=size, alpha=alpha, c=np.asarray(colours)[order], lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _diagonal(ax, xy.min(), xy.max())
    ax.legend(handles=[*handles, *ax.get_lines()], loc="upper left", bbox_to_anchor=(1.02, 1),
              fontsize="small", labelspacing=0.9)
    pooled = spearman(np.concatenate([np.asarray(p, float) for _, p in sets.values()]),
                      np.concatenate([np.asarray(t, float) for t, _ in sets.values()]))
    _title(fig, f"{title} (pooled Spearman ρ = {pooled:.3f})" if title else f"pooled Spearman ρ = {pooled:.3f}")
    return fig


def plot_error_scatter_sets(sets: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
                            title: str | None = None) -> str:
    """Write :func:`error_scatter_sets_figure` to ``path``."""
    return _save(error_scatter_sets_figure(sets, title), path)


def _finish_unit_square(ax, xlabel: str, ylabel: str, legend_loc: str) -> None:
    """Square axes a little larger than [0, 1]^2, so curves along an edge stay visible."""
    ax.set_xlim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
    ax.set_ylim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend_loc, fontsize="small")


def calibration_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       title: str = "Calibration of predicted error intervals") -> Figure:
    """Observed vs nominal coverage for several data sets on one axes, area in the legend.

    ``curves`` maps a data-set name to ``(levels, observed)`` as returned by
    :func:`~ltau_lmp.evaluation.metrics.interval_coverage` (or ``pit_calibration``).
    """
    if not curves:
        raise MetricInputError("plot_calibration needs at least one curve")
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, (levels, observed) in curves.items():
        area = miscalibration_area(levels, observed)
        lv, ob = np.asarray(levels, float), np.asarray(observed, float)
        order = np.argsort(lv)
        ax.plot(np.r_[0, lv[order], 1], np.r_[0, ob[order], 1], "o-", ms=3,
                label=f"{name} (area {area:.3f})")
    _finish_unit_square(ax, "nominal coverage (fraction)", "observed coverage (fraction)", "upper left")
    _title(fig, title)
    return fig


def plot_calibration(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
                     title: str = "Calibration of predicted error intervals") -> str:
    """Write :func:`calibration_figure` to ``path``."""
    return _save(calibration_figure(curves, title), path)


def reliability_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], n_bins: int = 10,
                       tol: float | None = None) -> Figure:
    """Reliability diagram of P(error < tol) for several data sets, ECE in the legend, counts below.

    ``curves`` maps a data-set name to ``(prob_pred, outcome)``. The count panel matters: a bin
    far off the diagonal holding three atoms is noise.
    """
    if not curves:
        raise MetricInputError("plot_reliability needs at least one data set")
    fig = _figure((5.0, 5.5))
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(gs[0])
    ax_n = fig.add_subplot(gs[1], sharex=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect reliability")
    most = 0
    for i, (name, (prob_pred, outcome)) in enumerate(curves.items()):
        rel = reliability(prob_pred, outcome, n_bins)
        filled = rel.counts > 0
        ax.plot(rel.mean_predicted[filled], rel.observed_frequency[filled], "o-", ms=4, color=f"C{i}",
                label=f"{name} (ECE {rel.ece:.3f}, {int(rel.counts.sum())} atoms)")
        ax_n.stairs(rel.counts, rel.bin_edges, color=f"C{i}", lw=1.5)
        most = max(most, rel.counts.max())
    event = f"error < {tol:g} {ERROR_UNIT}" if tol is not None else "event"
    ax.set_xlim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
    ax.set_ylim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
    ax.set_ylabel("observed frequency")
    ax.tick_params(labelbottom=False)
    ax.legend(loc="upper left", fontsize="small")
    if most > 100:
        ax_n.set_yscale("log")
        _count_axis(ax_n.yaxis)
    ax_n.set_xlabel(f"predicted P({event})")
    ax_n.set_ylabel("atoms per bin")
    _title(fig, f"Reliability of predicted P({event})")
    return fig


def plot_reliability(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, n_bins: int = 10,
                     tol: float | None = None) -> str:
    """Write :func:`reliability_figure` to ``path``."""
    return _save(reliability_figure(curves, n_bins, tol), path)


def roc_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               title: str = "Out-of-domain detection") -> Figure:
    """ROC curves for several detectors / data sets, AUROC in the legend.

    ``curves`` maps a label to ``(scores_in, scores_out)``; higher score = more out-of-domain.
    """
    if not curves:
        raise MetricInputError("plot_roc needs at least one curve")
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance (0.5)")
    # wider lines first, so that equal curves (two perfect detectors) both stay visible
    widths = np.linspace(3.0, 1.2, len(curves)) if len(curves) > 1 else [1.5]
    for lw, (name, (s_in, s_out)) in zip(widths, curves.items()):
        fpr, tpr, _ = roc_curve(s_in, s_out)
        ax.plot(fpr, tpr, lw=lw, clip_on=False, label=f"{name} (AUROC {auroc(s_in, s_out):.3f})")
    _finish_unit_square(ax, "false positive rate (in-domain flagged)",
                        "true positive rate (out-of-domain flagged)", "lower right")
    _title(fig, title)
    return fig


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
             title: str = "Out-of-domain detection") -> str:
    """Write :func:`roc_figure` to ``path``."""
    return _save(roc_figure(curves, title), path)


def failure_timeline_figure(steps, predicted_max, true_max, threshold: float, halt_step: float | None = None,
                            failure_threshold: float | None = None,
                            title: str = "Maximum per-atom force error along the MD run") -> Figure:
    """Predicted and true maximum per-atom error vs MD step, with the thresholds and crossings.

    Shows whether the uncertainty alarm (``threshold``, on the prediction) fires before (good)
    or after the real error crosses ``failure_threshold`` (default: the same value);
    ``halt_step`` marks where ``fix ltau`` stopped the run, or would have: frames after it mean
    the run went on in observe mode, and that stretch is shaded. The halt line is a wide
    translucent band under the dotted crossing lines, so a crossing at the halt step stays visible.
    """
    s = np.asarray(steps, dtype=float)
    pm = np.asarray(predicted_max, dtype=float)
    tm = np.asarray(true_max, dtype=float)
    if not (s.ndim == pm.ndim == tm.ndim == 1 and s.size == pm.size == tm.size > 0):
        raise MetricInputError("steps, predicted_max and true_max must be 1-D of equal length")
    if not threshold > 0:
        raise MetricInputError("threshold must be positive for a log error axis")
    fig = _figure((8.0, 4.0))
    ax = fig.add_subplot()
    line_p, = ax.plot(s, pm, lw=1.2, label="predicted max error")
    line_t, = ax.plot(s, tm, lw=1.2, label="true max error")
    failure = threshold if failure_threshold is None else failure_threshold
    ax.axhline(threshold, color=line_p.get_color(), ls="--", lw=1, label=f"alarm threshold {threshold:g} {ERROR_UNIT}")
    if failure != threshold:
        ax.axhline(failure, color=line_t.get_color(), ls="--", lw=1, label=f"failure threshold {failure:g} {ERROR_UNIT}")
    if halt_step is not None:
        observe = s.max() > halt_step
        what = "halt condition met" if observe else "halted"
        ax.axvline(halt_step, color="red", ls="-", lw=4, alpha=0.3, zorder=1.5, label=f"{what} at step {halt_step:g}")
        if observe:
            ax.axvspan(halt_step, s.max(), color="0.5", alpha=0.12, lw=0, zorder=0,
                       label="observe mode: the run went on")
    for line, values, what, level in ((line_p, pm, "predicted", threshold), (line_t, tm, "true", failure)):
        cross = first_crossing(s, values, level)
        if cross is not None:
            ax.axvline(cross, color=line.get_color(), ls=":", lw=1.5, zorder=3,
                       label=f"{what} crosses at step {cross:g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(threshold, failure) / 100)  # a perfect crystal's ~1e-13 would squash the plot
    ax.set_xlabel("MD step")
    ax.set_ylabel(f"max per-atom force error ({ERROR_UNIT})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _title(fig, title)
    return fig


def plot_failure_timeline(steps, predicted_max, true_max, threshold: float, path,
                          halt_step: float | None = None, failure_threshold: float | None = None,
                          title: str = "Maximum per-atom force error along the MD run") -> str:
    """Write :func:`failure_timeline_figure` to ``path``."""
    return _save(failure_timeline_figure(steps, predicted_max, true_max, threshold, halt_step,
                                         failure_threshold, title), path)


def cartography_figure(mean, spread, fraction_above, tolerance: float, max_points: int = 50_000,
                       title: str = "Dataset cartography: each training atom over the logged epochs") -> Figure:
    """Mean error against its spread over the epochs (Swayamdipta et al. 2020), coloured by the
    fraction of epochs above ``tolerance`` (dashed line). At most ``max_points`` atoms are drawn
    (a seeded sample), the most persistent ones on top."""
    m, s, f = (np.asarray(a, dtype=float) for a in (mean, spread, fraction_above))
    if not (m.ndim == s.ndim == f.ndim == 1 and m.size == s.size == f.size > 0):
        raise MetricInputError("mean, spread and fraction_above must be 1-D of equal length")
    pick = np.arange(m.size)
    if m.size > max_points:
        pick = np.sort(np.random.default_rng(0).choice(m.size, max_points, replace=False))
    pick = pick[np.argsort(f[pick], kind="stable")]
    fig = _figure((6.0, 4.5))
    ax = fig.add_subplot()
    points = ax.scatter(np.maximum(s[pick], 1e-6), m[pick], c=f[pick], s=4, cmap="viridis", vmin=0, vmax=1,
                        rasterized=True)
    ax.axhline(tolerance, color="0.3", ls="--", lw=1, label=f"tolerance {tolerance:.3g} {ERROR_UNIT}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"spread of the error over epochs ({ERROR_UNIT})")
    ax.set_ylabel(f"mean error over epochs ({ERROR_UNIT})")
    fig.colorbar(points, ax=ax, label="fraction of epochs above the tolerance")
    ax.legend(loc="lower right", fontsize="small")
    _title(fig, title + (f" ({pick.size:,} of {m.size:,} shown)" if pick.size < m.size else ""))
    return fig


def plot_cartography(mean, spread, fraction_above, tolerance: float, path, **kwargs) -> str:
    """Write :func:`cartography_figure` to ``path``."""
    return _save(cartography_figure(mean, spread, fraction_above, tolerance, **kwargs), path)


def gap_figure(curve: Mapping[str, Sequence[float]],
               title: str = "Training and validation force error per epoch") -> Figure:
    """RMS force error of the training steps and of the validation set per epoch, and their gap
    (``diagnose.gap_curve``'s keys)."""
    epochs = np.asarray(curve["epoch"], dtype=float)
    if epochs.size == 0:
        raise MetricInputError("no epochs to plot")
    fig = _figure((6.5, 4.0))
    ax = fig.add_subplot()
    values = {key: np.asarray(curve[key], dtype=float) for key in ("train_rms", "validation_rms", "gap_rms")
              if key in curve}  # None (no value that epoch) -> NaN: a gap in the line
    ax.plot(epochs, values["train_rms"], lw=1.5, label="training (during the epoch's steps)")
    if "validation_rms" in values:
        ax.plot(epochs, values["validation_rms"], lw=1.5, marker=".", label="validation (at the epoch's end)")
        gap = ax.twinx()
        gap.plot(epochs, values["gap_rms"], color="0.4", ls=":", lw=1.2)
        gap.set_ylabel(f"gap: validation - training ({ERROR_UNIT})")
        ax.plot([], [], color="0.4", ls=":", label="gap (right axis)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"RMS force error ({ERROR_UNIT})")
    ax.legend(loc="upper right", fontsize="small")
    _title(fig, title)
    return fig


def plot_gap(curve: Mapping[str, Sequence[float]], path, **kwargs) -> str:
    """Write :func:`gap_figure` to ``path``."""
    return _save(gap_figure(curve, **kwargs), path)
