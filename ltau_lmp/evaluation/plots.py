"""Figures for the uncertainty metrics in :mod:`ltau_lmp.evaluation.metrics`.

Each function takes arrays and an output PNG path, writes the figure and returns the path.
Figures are drawn on the Agg canvas directly (no ``pyplot``), so plotting works on headless
nodes and never touches the global matplotlib backend or figure registry of the caller.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
    "plot_calibration",
    "plot_reliability",
    "plot_roc",
    "plot_failure_timeline",
]

ERROR_UNIT = "eV/Å"


def _figure(figsize=(5.0, 4.5)) -> Figure:
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_error_scatter(true_error, predicted, path, title: str | None = None) -> str:
    """Log-log density of predicted vs true per-atom error, with y = x and Spearman in the title.

    A hexbin rather than a scatter, because test sets hold 10^5-10^6 atoms and overplotting
    would hide where the mass is.  Non-positive values cannot sit on log axes and are dropped.
    """
    t = np.asarray(true_error, dtype=float)
    p = np.asarray(predicted, dtype=float)
    rho = spearman(p, t)
    keep = (t > 0) & (p > 0)
    if not np.any(keep):
        raise MetricInputError("plot_error_scatter needs positive errors for log axes")
    t, p = t[keep], p[keep]
    fig = _figure()
    ax = fig.add_subplot()
    hb = ax.hexbin(t, p, xscale="log", yscale="log", bins="log", gridsize=60, mincnt=1,
                   cmap="viridis")
    fig.colorbar(hb, ax=ax, label="atoms per cell")
    lo, hi = min(t.min(), p.min()), max(t.max(), p.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel(f"true per-atom force error ({ERROR_UNIT})")
    ax.set_ylabel(f"predicted per-atom error ({ERROR_UNIT})")
    ax.set_title(f"{title + ': ' if title else ''}Spearman ρ = {rho:.3f}")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _finish_unit_square(ax, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Square [0, 1] x [0, 1] axes with labels, title and legend (calibration and ROC plots)."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize="small")


def plot_calibration(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
                     title: str = "Calibration of predicted error intervals") -> str:
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
    _finish_unit_square(ax, "nominal coverage (fraction)", "observed coverage (fraction)", title, "upper left")
    return _save(fig, path)


def plot_reliability(prob_pred, outcome, path, n_bins: int = 10, tol: float | None = None) -> str:
    """Reliability diagram of P(error < tol) with per-bin counts, ECE in the legend.

    The count panel matters: a bin far off the diagonal holding three atoms is noise.
    """
    rel = reliability(prob_pred, outcome, n_bins)
    fig = _figure((5.0, 5.5))
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(gs[0])
    ax_n = fig.add_subplot(gs[1], sharex=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect reliability")
    filled = rel.counts > 0
    ax.plot(rel.mean_predicted[filled], rel.observed_frequency[filled], "o-",
            label=f"model (ECE {rel.ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    event = f"error < {tol:g} {ERROR_UNIT}" if tol is not None else "event"
    ax.set_ylabel(f"observed frequency of {event}")
    ax.set_title(f"Reliability of predicted P({event})")
    ax.legend(loc="upper left", fontsize="small")
    centers = 0.5 * (rel.bin_edges[:-1] + rel.bin_edges[1:])
    ax_n.bar(centers, rel.counts, width=np.diff(rel.bin_edges) * 0.9, color="gray")
    ax_n.set_yscale("log" if rel.counts.max() > 100 else "linear")
    ax_n.set_xlabel(f"predicted probability of {event}")
    ax_n.set_ylabel("atoms")
    return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
             title: str = "Out-of-domain detection") -> str:
    """ROC curves for several detectors / data sets, AUROC in the legend.

    ``curves`` maps a label to ``(scores_in, scores_out)``; higher score = more out-of-domain.
    """
    if not curves:
        raise MetricInputError("plot_roc needs at least one curve")
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance (0.5)")
    for name, (s_in, s_out) in curves.items():
        fpr, tpr, _ = roc_curve(s_in, s_out)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(s_in, s_out):.3f})")
    _finish_unit_square(ax, "false positive rate (in-domain flagged)",
                        "true positive rate (out-of-domain flagged)", title, "lower right")
    return _save(fig, path)


def plot_failure_timeline(steps, predicted_max, true_max, threshold: float, path,
                          halt_step: float | None = None, failure_threshold: float | None = None,
                          title: str = "Maximum per-atom force error along the MD run") -> str:
    """Predicted and true maximum per-atom error vs MD step, with the thresholds and crossings.

    Shows whether the uncertainty alarm (``threshold``, on the prediction) fires before (good)
    or after the real error crosses ``failure_threshold`` (default: the same value);
    ``halt_step`` marks where the run was actually stopped.
    """
    s = np.asarray(steps, dtype=float)
    pm = np.asarray(predicted_max, dtype=float)
    tm = np.asarray(true_max, dtype=float)
    if not (s.ndim == pm.ndim == tm.ndim == 1 and s.size == pm.size == tm.size > 0):
        raise MetricInputError("steps, predicted_max and true_max must be 1-D of equal length")
    if not threshold > 0:
        raise MetricInputError("threshold must be positive for a log error axis")
    fig = _figure((7.0, 4.0))
    ax = fig.add_subplot()
    line_p, = ax.plot(s, pm, lw=1.2, label="predicted max error")
    line_t, = ax.plot(s, tm, lw=1.2, label="true max error")
    failure = threshold if failure_threshold is None else failure_threshold
    ax.axhline(threshold, color=line_p.get_color(), ls="--", lw=1, label=f"alarm threshold {threshold:g} {ERROR_UNIT}")
    if failure != threshold:
        ax.axhline(failure, color=line_t.get_color(), ls="--", lw=1, label=f"failure threshold {failure:g} {ERROR_UNIT}")
    for line, values, what, level in ((line_p, pm, "predicted", threshold), (line_t, tm, "true", failure)):
        cross = first_crossing(s, values, level)
        if cross is not None:
            ax.axvline(cross, color=line.get_color(), ls=":", lw=1.5,
                       label=f"{what} crosses at step {cross:g}")
    if halt_step is not None:
        ax.axvline(halt_step, color="red", lw=2, alpha=0.6, label=f"halted at step {halt_step:g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(threshold, failure) / 100)  # a perfect crystal's ~1e-13 would squash the plot
    ax.set_xlabel("MD step")
    ax.set_ylabel(f"max per-atom force error ({ERROR_UNIT})")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)
