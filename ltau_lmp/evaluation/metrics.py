"""Metrics for judging per-atom force-error uncertainty estimates (LTAU-FF, arXiv 2402.00853).

Everything here is plain numpy/scipy on arrays, so the same code scores an offline test set,
a LAMMPS trajectory dump or a synthetic check:

* ranking quality: :func:`spearman`, :func:`pearson_log`;
* calibration of the predicted error distributions: :func:`interval_coverage`,
  :func:`pit_values`, :func:`pit_calibration`, :func:`miscalibration_area`, :func:`reliability`;
* out-of-domain detection: :func:`roc_curve`, :func:`auroc`;
* one-line reports: :func:`summarize`, :func:`summary_table`.

A predicted distribution is a row of probability masses ``pdf`` over shared ``bin_edges``
(``nbins + 1`` increasing values, log-spaced in practice).  The CDF is the cumulative mass up to
an edge and linear *in error value* inside a bin; below the first edge it is 0, above the last 1.
:func:`pdf_cdf` and :func:`pdf_quantile` validate, renormalise and chunk, then use the
estimator's own interpolation (``ltau_lmp.estimator.histogram``), so the evaluation scores exactly
what ``fix ltau`` reports.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
from scipy import integrate, stats

from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator.histogram import CHUNK_ROWS, pdf_cdf_at, pdf_quantiles

__all__ = [
    "MetricInputError",
    "DEFAULT_LEVELS",
    "spearman",
    "pearson_log",
    "pdf_cdf",
    "pdf_quantile",
    "interval_coverage",
    "pit_values",
    "pit_calibration",
    "miscalibration_area",
    "Reliability",
    "reliability",
    "roc_curve",
    "auroc",
    "summarize",
    "summary_table",
]

#: Nominal central-interval levels used when none are given (0.1, 0.2, ..., 0.9).
DEFAULT_LEVELS = np.round(np.arange(0.1, 1.0, 0.1), 10)


class MetricInputError(LTAUError, ValueError):
    """Arrays handed to a metric are unusable (wrong shape, non-finite, empty, out of range).

    Also a ``ValueError`` so that generic numeric code can catch it the usual way.
    """


# --------------------------------------------------------------------------- input checks


def _vector(x, name: str) -> np.ndarray:
    """Return ``x`` as a finite, non-empty 1-D float array, or say clearly what is wrong."""
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise MetricInputError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise MetricInputError(f"{name} contains {int(np.sum(~np.isfinite(a)))} non-finite values")
    return a


def _same_length(*pairs: tuple[np.ndarray, str]) -> None:
    n = len(pairs[0][0])
    for a, name in pairs[1:]:
        if len(a) != n:
            raise MetricInputError(f"{name} has {len(a)} entries, expected {n} ({pairs[0][1]})")


def _edges(bin_edges) -> np.ndarray:
    e = _vector(bin_edges, "bin_edges")
    if e.size < 2 or np.any(np.diff(e) <= 0):
        raise MetricInputError("bin_edges must hold at least 2 strictly increasing values")
    return e


def _pdf(pdf, edges: np.ndarray) -> np.ndarray:
    p = np.asarray(pdf)
    if p.ndim != 2 or p.shape[1] != edges.size - 1:
        raise MetricInputError(
            f"pdf must have shape (n, {edges.size - 1}) to match bin_edges, got {p.shape}"
        )
    if p.shape[0] == 0:
        raise MetricInputError("pdf is empty")
    return p


def _normalised(p: np.ndarray) -> np.ndarray:
    """A block of rows as float64 masses that sum to exactly 1 per row.

    Rows are renormalised so that float32 round-off in stored PDFs cannot leave the CDF short
    of 1 at the last edge; a row that is not a distribution at all is an error, not a guess.
    """
    m = np.asarray(p, dtype=float)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise MetricInputError("pdf masses must be finite and non-negative")
    total = m.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise MetricInputError("every pdf row needs positive total mass")
    return m / total


# --------------------------------------------------------------------------- ranking


def spearman(pred, true) -> float:
    """Spearman rank correlation: does a larger predicted error mean a larger true error?"""
    x, y = _vector(pred, "pred"), _vector(true, "true")
    _same_length((x, "pred"), (y, "true"))
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        raise MetricInputError("spearman needs at least 2 values and non-constant inputs")
    return float(stats.spearmanr(x, y)[0])


def pearson_log(pred, true) -> float:
    """Pearson correlation of log10 values, since errors span decades and are judged in ratio."""
    x, y = _vector(pred, "pred"), _vector(true, "true")
    _same_length((x, "pred"), (y, "true"))
    for a, name in ((x, "pred"), (y, "true")):
        bad = int(np.sum(a <= 0))
        if bad:
            raise MetricInputError(f"pearson_log needs positive values; {name} has {bad} <= 0")
    lx, ly = np.log10(x), np.log10(y)
    if x.size < 2 or np.ptp(lx) == 0 or np.ptp(ly) == 0:
        raise MetricInputError("pearson_log needs at least 2 values and non-constant inputs")
    return float(stats.pearsonr(lx, ly)[0])


# --------------------------------------------------------------------------- CDF / quantiles


def pdf_cdf(pdf, bin_edges, x, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """CDF of each row's predicted distribution at ``x`` (shape ``(n,)`` or ``(n, k)``).

    Row ``i`` of ``pdf`` is evaluated at row ``i`` of ``x``.  Linear inside a bin in error
    value, 0 below the first edge, 1 at and above the last edge.
    """
    edges = _edges(bin_edges)
    p = _pdf(pdf, edges)
    xv = np.asarray(x, dtype=float)
    if xv.shape[:1] != (p.shape[0],) or xv.ndim > 2:
        raise MetricInputError(f"x must have shape (n,) or (n, k) with n={p.shape[0]}, got {xv.shape}")
    if np.any(np.isnan(xv)):
        raise MetricInputError("x contains NaN")
    x2 = xv.reshape(p.shape[0], -1)
    out = np.empty(x2.shape)
    for s in range(0, p.shape[0], chunk_rows):
        m = _normalised(p[s : s + chunk_rows])
        for col in range(x2.shape[1]):
            out[s : s + chunk_rows, col] = pdf_cdf_at(m, edges, x2[s : s + chunk_rows, col])
    return out.reshape(xv.shape)


def pdf_quantile(pdf, bin_edges, q, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Quantile(s) ``q`` of every row's predicted distribution: the inverse of :func:`pdf_cdf`.

    ``q`` is a scalar (result ``(n,)``) or a 1-D array of probabilities (result ``(n, k)``).
    Where the CDF is flat (empty bins) the smallest error reaching probability ``q`` is
    returned; ``q = 0`` gives the first edge.
    """
    edges = _edges(bin_edges)
    p = _pdf(pdf, edges)
    qv = np.asarray(q, dtype=float)
    if qv.ndim > 1 or not np.all((qv >= 0) & (qv <= 1)):
        raise MetricInputError("q must be a scalar or 1-D array of probabilities in [0, 1]")
    q1 = np.atleast_1d(qv)
    out = np.empty((p.shape[0], q1.size))
    for s in range(0, p.shape[0], chunk_rows):
        out[s : s + chunk_rows] = pdf_quantiles(_normalised(p[s : s + chunk_rows]), edges, q1)
    return out[:, 0] if qv.ndim == 0 else out


# --------------------------------------------------------------------------- calibration


def _levels(levels) -> np.ndarray:
    lv = _vector(levels, "levels")
    if np.any((lv < 0) | (lv > 1)):
        raise MetricInputError("levels must lie in [0, 1]")
    return lv


def interval_coverage(pdf, bin_edges, true_error, levels=DEFAULT_LEVELS,
                      chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Observed fraction of true errors inside each central predicted interval.

    For nominal level ``c`` the interval is ``[q((1-c)/2), q((1+c)/2)]`` of every atom's own
    predicted distribution; a calibrated model puts a fraction ``c`` of atoms inside.
    """
    lv = _levels(levels)
    e = _vector(true_error, "true_error")
    _same_length((e, "true_error"), (np.asarray(pdf), "pdf"))
    lo = pdf_quantile(pdf, bin_edges, (1 - lv) / 2, chunk_rows)
    hi = pdf_quantile(pdf, bin_edges, (1 + lv) / 2, chunk_rows)
    inside = (lo <= e[:, None]) & (e[:, None] <= hi)
    return inside.mean(axis=0)


def pit_values(pdf, bin_edges, true_error, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Probability integral transform CDF_i(true_error_i): uniform on [0, 1] when calibrated."""
    e = _vector(true_error, "true_error")
    return pdf_cdf(pdf, bin_edges, e, chunk_rows)


def pit_calibration(pit, levels=DEFAULT_LEVELS) -> np.ndarray:
    """Observed fraction of PIT values <= each nominal level (the diagonal when calibrated).

    Unlike central-interval coverage this also sees one-sided bias (errors systematically
    above or below the predicted median).
    """
    u = _vector(pit, "pit")
    lv = _levels(levels)
    return (u[:, None] <= lv[None, :]).mean(axis=0)


def miscalibration_area(levels, observed) -> float:
    """Area between the observed-vs-nominal curve and the diagonal (0 = perfectly calibrated).

    Trapezoid rule on ``|observed - nominal|`` over nominal in [0, 1], with the end points
    (0, 0) and (1, 1) added when missing, so curves on different level grids are comparable.
    """
    lv = _levels(levels)
    ob = _vector(observed, "observed")
    _same_length((lv, "levels"), (ob, "observed"))
    order = np.argsort(lv, kind="stable")
    lv, ob = lv[order], ob[order]
    if lv[0] > 0:
        lv, ob = np.r_[0.0, lv], np.r_[0.0, ob]
    if lv[-1] < 1:
        lv, ob = np.r_[lv, 1.0], np.r_[ob, 1.0]
    return float(integrate.trapezoid(np.abs(ob - lv), lv))


class Reliability(NamedTuple):
    """Binned reliability diagram of a predicted probability against binary outcomes."""

    bin_edges: np.ndarray  #: (n_bins + 1,) edges on [0, 1]
    mean_predicted: np.ndarray  #: (n_bins,) mean predicted probability per bin (NaN if empty)
    observed_frequency: np.ndarray  #: (n_bins,) fraction of positive outcomes (NaN if empty)
    counts: np.ndarray  #: (n_bins,) number of samples per bin
    ece: float  #: expected calibration error: count-weighted mean |predicted - observed|


def reliability(prob_pred, outcome, n_bins: int = 10) -> Reliability:
    """Reliability of a predicted probability such as P(error < tol) against what happened.

    Bins are equal-width and half-open ``[a, b)`` on [0, 1], the last one closed.
    """
    p = _vector(prob_pred, "prob_pred")
    o = _vector(outcome, "outcome")
    _same_length((p, "prob_pred"), (o, "outcome"))
    if np.any((p < 0) | (p > 1)):
        raise MetricInputError("prob_pred must lie in [0, 1]")
    if not np.all((o == 0) | (o == 1)):
        raise MetricInputError("outcome must be boolean (0/1)")
    if int(n_bins) < 1:
        raise MetricInputError("n_bins must be >= 1")
    n_bins = int(n_bins)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / counts
        freq = np.bincount(idx, weights=o, minlength=n_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(mean_p[filled] - freq[filled])) / p.size)
    return Reliability(np.linspace(0.0, 1.0, n_bins + 1), mean_p, freq, counts, ece)


# --------------------------------------------------------------------------- OOD detection


def roc_curve(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of flagging ``score >= threshold`` as out-of-domain ("out" is the positive class).

    Returns ``fpr, tpr, thresholds`` with one point per distinct score, from ``(0, 0)`` at
    threshold ``+inf`` to ``(1, 1)``; tied scores move both rates at once, so the trapezoid
    area under the curve equals :func:`auroc`.
    """
    s_in, s_out = _vector(scores_in, "scores_in"), _vector(scores_out, "scores_out")
    thr = np.unique(np.r_[s_in, s_out])[::-1]
    # Count of scores >= each (descending) threshold.
    n_in_above = s_in.size - np.searchsorted(np.sort(s_in), thr, side="left")
    n_out_above = s_out.size - np.searchsorted(np.sort(s_out), thr, side="left")
    fpr = np.r_[0.0, n_in_above / s_in.size]
    tpr = np.r_[0.0, n_out_above / s_out.size]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(scores_in, scores_out) -> float:
    """Probability that an out-of-domain atom scores higher than an in-domain one (ties 1/2).

    Computed from ranks as Mann-Whitney ``U / (n_in * n_out)``: exact, and O(n log n).
    """
    s_in, s_out = _vector(scores_in, "scores_in"), _vector(scores_out, "scores_out")
    ranks = stats.rankdata(np.r_[s_in, s_out])  # average ranks handle ties
    u = ranks[s_in.size :].sum() - s_out.size * (s_out.size + 1) / 2.0
    return float(u / (s_in.size * s_out.size))


def first_crossing(steps, values, threshold: float):
    """First step whose value exceeds ``threshold`` (None if none does): when an alarm fires."""
    above = np.flatnonzero(np.asarray(values) > threshold)
    return np.asarray(steps)[above[0]].item() if above.size else None


# --------------------------------------------------------------------------- reports


def summarize(true_error, predicted, pdf, bin_edges, distance, tol: float = 0.1,
              levels=DEFAULT_LEVELS, chunk_rows: int = CHUNK_ROWS) -> dict[str, float]:
    """All scalar metrics for one data set, as plain floats ready for ``json.dump``.

    ``tol`` (eV/Å) is the error tolerance whose predicted probability P(error < tol) is
    checked by :func:`reliability`; keep it fixed across data sets so rows stay comparable.
    """
    e = _vector(true_error, "true_error")
    pr = _vector(predicted, "predicted")
    d = _vector(distance, "distance")
    _same_length((e, "true_error"), (pr, "predicted"), (d, "distance"), (np.asarray(pdf), "pdf"))
    if not tol > 0:
        raise MetricInputError("tol must be positive")
    lv = _levels(levels)
    coverage = interval_coverage(pdf, bin_edges, e, lv, chunk_rows)
    pit = pit_values(pdf, bin_edges, e, chunk_rows)
    p_below = pdf_cdf(pdf, bin_edges, np.full(e.size, float(tol)), chunk_rows)
    rel = reliability(p_below, e < tol)
    return {
        "n_atoms": float(e.size),
        "mean_true_error": float(e.mean()),
        "mean_predicted_error": float(pr.mean()),
        "spearman": spearman(pr, e),
        "pearson_log": pearson_log(pr, e),
        "spearman_distance": spearman(d, e),
        "miscalibration_area": miscalibration_area(lv, coverage),
        "pit_miscalibration_area": miscalibration_area(lv, pit_calibration(pit, lv)),
        "tol": float(tol),
        "fraction_below_tol": float(np.mean(e < tol)),
        "ece_below_tol": rel.ece,
        "median_distance": float(np.median(d)),
    }


def summary_table(summaries: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """Markdown table, one row per data set, one column per metric (first-seen key order).

    Integral values print as integers, others with ``digits`` significant digits; a metric
    missing for a data set prints as an empty cell.
    """
    if not summaries:
        raise MetricInputError("summary_table needs at least one data set")
    columns: list[str] = []
    for row in summaries.values():
        columns += [k for k in row if k not in columns]

    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, (int, float, np.number)):
            fv = float(v)
            if np.isfinite(fv) and fv == round(fv) and abs(fv) < 1e15:
                return str(int(fv))
            return f"{fv:.{digits}g}"
        return str(v)

    lines = [
        "| dataset | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in summaries.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
