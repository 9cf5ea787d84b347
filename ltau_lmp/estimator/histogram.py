"""Per-atom error distributions as histograms: probability masses over shared, increasing bin edges.

The one place for their arithmetic: the estimator's results (``LTAUResult``), the evaluation's
metrics (``ltau_lmp.evaluation.metrics`` adds input checks and renormalisation in front) and the
fix's intervals read the same numbers. A row's CDF is the cumulative mass up to an edge and linear
*in error value* inside a bin; below the first edge it is 0, at and above the last 1. The functions
here take rows as they are (no renormalisation, no validation beyond ``check_pdfs``): estimator
rows are checked once, when built or loaded.
"""

from __future__ import annotations

import numpy as np

from ltau_lmp.errors import ConfigError

CHUNK_ROWS = 65_536  # rows per block of work over (n, dim) or (n, nbins) arrays, package-wide: bounded temporaries


def log_midpoints(bin_edges: np.ndarray) -> np.ndarray:
    """Geometric mean of each bin's edges: the value a bin stands for on a log axis."""
    return np.sqrt(bin_edges[:-1] * bin_edges[1:])


def pdf_cdf_at(pdf: np.ndarray, bin_edges: np.ndarray, values) -> np.ndarray:
    """CDF of each row's distribution at ``values`` (scalar or one per row); linear inside a bin."""
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), (pdf.shape[0],))
    nbins = pdf.shape[1]
    b = np.clip(np.searchsorted(bin_edges, values, side="right") - 1, 0, nbins - 1)
    cdf_lo = np.cumsum(pdf, axis=1, dtype=np.float64) - pdf
    rows = np.arange(pdf.shape[0])
    frac = (values - bin_edges[b]) / (bin_edges[b + 1] - bin_edges[b])
    out = np.minimum(cdf_lo[rows, b] + pdf[rows, b] * np.clip(frac, 0.0, 1.0), 1.0)
    return np.where(values < bin_edges[0], 0.0, np.where(values >= bin_edges[-1], 1.0, out))


def pdf_quantiles(pdf: np.ndarray, bin_edges: np.ndarray, levels) -> np.ndarray:
    """Inverse CDF per row at each of ``levels``: (n, len(levels)); one cumulative sum for all
    levels. Inside a bin the CDF is linear in the error value; where it is flat (empty bins) the
    smallest error reaching the level is returned, so level 0 gives the first edge."""
    levels = [float(q) for q in levels]
    if not all(0.0 <= q <= 1.0 for q in levels):
        raise ValueError(f"quantile levels must lie in [0, 1], got {levels}")
    cdf = np.cumsum(pdf, axis=1, dtype=np.float64)
    nbins = pdf.shape[1]
    rows = np.arange(pdf.shape[0])
    out = np.empty((pdf.shape[0], len(levels)))
    for column, q in enumerate(levels):
        b = np.minimum(np.count_nonzero(cdf < q - 1e-12, axis=1), nbins - 1)
        mass = pdf[rows, b].astype(np.float64)
        below = cdf[rows, b] - mass
        frac = np.divide(q - below, mass, out=np.zeros_like(mass), where=mass > 0)
        out[:, column] = bin_edges[b] + np.clip(frac, 0.0, 1.0) * (bin_edges[b + 1] - bin_edges[b])
    return out


def check_pdfs(pdfs: np.ndarray, rows: np.ndarray | None = None, where: str = "PDF array") -> None:
    """Rows must be non-negative and sum to 1 (checked on ``rows`` only when given, to stay cheap).

    Checked in blocks: temporaries of a whole 1M x 100 array would add ~200 MB to the peak.
    """
    if pdfs.ndim != 2:
        raise ConfigError(f"{where} must be 2-D (n, nbins), got shape {pdfs.shape}")
    rows = np.arange(pdfs.shape[0]) if rows is None else rows
    for start in range(0, len(rows), CHUNK_ROWS):
        sample = pdfs[rows[start:start + CHUNK_ROWS]]
        if not np.all(np.isfinite(sample)) or np.any(sample < 0):
            raise ConfigError(f"{where} has negative, NaN or infinite probabilities")
        sums = sample.sum(axis=1, dtype=np.float64)
        bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
        if bad.size:
            raise ConfigError(f"{where}: rows do not sum to 1 (e.g. {sums[bad[0]]:.6g})")
