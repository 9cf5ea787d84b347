"""Evaluation of LTAU-FF uncertainty estimates: metrics (numpy/scipy) and figures (matplotlib).

``from ltau_lmp.evaluation import summarize, plot_calibration`` etc.; the plotting functions
live in :mod:`ltau_lmp.evaluation.plots` and import matplotlib only when that module is used.
"""

from ltau_lmp.evaluation.metrics import (
    DEFAULT_LEVELS,
    MetricInputError,
    Reliability,
    auroc,
    interval_coverage,
    miscalibration_area,
    pdf_cdf,
    pdf_quantile,
    pearson_log,
    pit_calibration,
    pit_values,
    reliability,
    roc_curve,
    spearman,
    summarize,
    summary_table,
)

_PLOTS = (
    "plot_error_scatter",
    "plot_calibration",
    "plot_reliability",
    "plot_roc",
    "plot_failure_timeline",
)

__all__ = [
    "DEFAULT_LEVELS",
    "MetricInputError",
    "Reliability",
    "auroc",
    "interval_coverage",
    "miscalibration_area",
    "pdf_cdf",
    "pdf_quantile",
    "pearson_log",
    "pit_calibration",
    "pit_values",
    "reliability",
    "roc_curve",
    "spearman",
    "summarize",
    "summary_table",
    *_PLOTS,
]


def __getattr__(name):
    """Import the plotting functions lazily so metric users do not pay for matplotlib."""
    if name in _PLOTS:
        from ltau_lmp.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
