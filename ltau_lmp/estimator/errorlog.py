"""Streaming per-sample error histograms: the "loss trajectory" LTAU is built from.

During training every sample (training atom) gets one error per epoch. Storing the whole
trajectory would cost O(n_samples x n_epochs); LTAU only needs each sample's error
distribution, so we keep a histogram over fixed bin edges: O(n_samples x n_bins) counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ltau_lmp.errors import ConfigError, FileFormatError, check_file_format

ERRORLOG_FORMAT = "ltau-errorlog"
ERRORLOG_VERSION = 1
_COUNT_DTYPES = (np.uint16, np.uint32, np.uint64)


EPOCH_STATS = ("n", "sum", "sum_sq", "max")  # the columns of ErrorLog.epoch_stats


def epoch_curve(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, RMS and max error per epoch from ``ErrorLog.epoch_stats`` (NaN where none was logged)."""
    n = stats[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"n": n, "mean": stats[:, 1] / n, "rms": np.sqrt(stats[:, 2] / n),
                "max": np.where(n > 0, stats[:, 3], np.nan)}


def log_spaced_edges(lo: float, hi: float, nbins: int) -> np.ndarray:
    """Bin edges as in the reference LTAU code: ``np.logspace(log10(lo), log10(hi), nbins + 1)``."""
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ConfigError(f"log-spaced bins need 0 < lo < hi, got lo={lo}, hi={hi}")
    if int(nbins) < 1:
        raise ConfigError(f"nbins must be >= 1, got {nbins}")
    return np.logspace(np.log10(lo), np.log10(hi), int(nbins) + 1)


def validate_bin_edges(edges) -> np.ndarray:
    """Edges must be finite, positive (errors are norms) and strictly increasing."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2:
        raise ConfigError(f"bin edges must be a 1-D array of at least 2 values, got shape {edges.shape}")
    if not np.all(np.isfinite(edges)) or edges[0] <= 0 or np.any(np.diff(edges) <= 0):
        raise ConfigError("bin edges must be finite, positive and strictly increasing")
    return edges


class ErrorLog:
    """Per-sample histograms of training errors, updated batch by batch.

    ``update(ids, errors)`` may be called with batches in any order (shuffled training);
    ``end_epoch()`` closes an epoch. Epochs before ``skip_epochs`` are not counted (the paper
    discards the early, fast-changing part of the trajectory); with ``stop_epoch`` set,
    epochs from ``stop_epoch`` on are not counted either (a window of the trajectory).
    Errors outside the edges are clamped into the end bins and counted in
    ``n_clamped_low`` / ``n_clamped_high``.

    Besides the histograms it keeps one row of aggregates per epoch, skipped epochs included
    (``epoch_stats``: errors, their sum, sum of squares and maximum; ``EPOCH_STATS``): the
    training curve epoch by epoch (``ltau-lmp diagnose``), 32 bytes an epoch.
    """

    def __init__(self, n_samples: int, bin_edges, skip_epochs: int = 0,
                 stop_epoch: int | None = None, count_dtype=np.uint32):
        if int(n_samples) < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        if int(skip_epochs) < 0:
            raise ConfigError(f"skip_epochs must be >= 0, got {skip_epochs}")
        if stop_epoch is not None and int(stop_epoch) <= int(skip_epochs):
            raise ConfigError(f"stop_epoch ({stop_epoch}) must be > skip_epochs ({skip_epochs})")
        if np.dtype(count_dtype) not in [np.dtype(d) for d in _COUNT_DTYPES]:
            raise ConfigError(f"count_dtype must be uint16, uint32 or uint64, got {count_dtype}")
        self.bin_edges = validate_bin_edges(bin_edges)
        self.n_samples = int(n_samples)
        self.skip_epochs = int(skip_epochs)
        self.stop_epoch = None if stop_epoch is None else int(stop_epoch)
        self.counts = np.zeros((self.n_samples, self.nbins), dtype=count_dtype)
        self.epoch = 0
        self.n_counted = 0
        self.n_clamped_low = 0
        self.n_clamped_high = 0
        self._stamp = np.full(self.n_samples, -1, dtype=np.int64)
        self.epoch_stats = np.zeros((0, len(EPOCH_STATS)))
        self._current = np.zeros(len(EPOCH_STATS))
        log_edges = np.log(self.bin_edges)
        steps = np.diff(log_edges)
        # Log-spaced edges (the usual case): a bin is one log and a floor away, no binary search.
        self._inv_log_step = 1.0 / steps[0] if np.allclose(steps, steps[0], rtol=1e-9, atol=0) else None

    @classmethod
    def log_spaced(cls, n_samples: int, lo: float = 1e-3, hi: float = 10.0, nbins: int = 100,
                   **kwargs) -> "ErrorLog":
        """The usual constructor: ``nbins`` log-spaced bins between ``lo`` and ``hi`` (eV/Å)."""
        return cls(n_samples, log_spaced_edges(lo, hi, nbins), **kwargs)

    @property
    def nbins(self) -> int:
        return self.bin_edges.size - 1

    @property
    def counting(self) -> bool:
        """Whether errors passed to ``update`` in the current epoch are counted."""
        return self.epoch >= self.skip_epochs and (self.stop_epoch is None or self.epoch < self.stop_epoch)

    def bin_index(self, errors: np.ndarray) -> np.ndarray:
        """Bin of each error; out-of-range errors go to the end bins (not counted as clamped here).

        Exactly ``searchsorted(edges, e, "right") - 1``: for log-spaced edges the floor of the
        scaled log is corrected by one against the stored edges where rounding put it astray.
        """
        if self._inv_log_step is None:
            idx = np.searchsorted(self.bin_edges, errors, side="right") - 1
            return np.clip(idx, 0, self.nbins - 1, out=idx)
        with np.errstate(divide="ignore"):
            scaled = np.log(errors / self.bin_edges[0]) * self._inv_log_step
        idx = np.clip(scaled, -1.0, self.nbins).astype(np.int64)
        np.clip(idx, 0, self.nbins - 1, out=idx)
        idx -= (errors < self.bin_edges[idx]) & (idx > 0)
        idx += (errors >= self.bin_edges[idx + 1]) & (idx < self.nbins - 1)
        return idx

    def update(self, sample_ids, errors) -> None:
        """Add one error per listed sample to its histogram (no-op outside the counted epochs)."""
        ids = np.asarray(sample_ids).reshape(-1)
        errors = np.asarray(errors, dtype=np.float64).reshape(-1)
        if ids.shape != errors.shape:
            raise ValueError(f"sample_ids and errors differ in length: {ids.size} vs {errors.size}")
        if ids.size and np.all(np.isfinite(errors)):
            self._current += (errors.size, errors.sum(), np.square(errors).sum(), 0.0)
            self._current[3] = max(self._current[3], float(errors.max()))
        if not self.counting or ids.size == 0:
            return
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sample_ids must be integers, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.n_samples:
            raise ValueError(f"sample ids must lie in [0, {self.n_samples}), got [{ids.min()}, {ids.max()}]")
        if not np.all(np.isfinite(errors)):
            raise ValueError(f"{np.count_nonzero(~np.isfinite(errors))} errors are NaN or infinite")
        self.n_clamped_low += int(np.count_nonzero(errors < self.bin_edges[0]))
        self.n_clamped_high += int(np.count_nonzero(errors > self.bin_edges[-1]))
        flat = ids.astype(np.int64) * self.nbins + self.bin_index(errors)
        if self._ids_unique(ids):
            self.counts.reshape(-1)[flat] += 1
        else:
            flat, n = np.unique(flat, return_counts=True)
            self.counts.reshape(-1)[flat] += n.astype(self.counts.dtype)
        self.n_counted += ids.size

    def _ids_unique(self, ids: np.ndarray) -> bool:
        """O(m) duplicate check: fancy-index ``+= 1`` silently drops repeated indices."""
        order = np.arange(ids.size, dtype=np.int64)
        self._stamp[ids] = order
        return bool(np.array_equal(self._stamp[ids], order))

    def end_epoch(self) -> None:
        """Close an epoch; widens the count dtype before it could overflow."""
        self.epoch += 1
        self.epoch_stats = np.vstack([self.epoch_stats, self._current])
        self._current = np.zeros(len(EPOCH_STATS))
        limit = np.iinfo(self.counts.dtype).max
        if self.counts.dtype != np.uint64 and self.counts.max(initial=0) > limit // 2:
            wider = _COUNT_DTYPES[[np.dtype(d) for d in _COUNT_DTYPES].index(self.counts.dtype) + 1]
            self.counts = self.counts.astype(wider)

    def totals(self) -> np.ndarray:
        """Number of counted errors per sample."""
        return self.counts.sum(axis=1, dtype=np.uint64)

    def pdfs(self, dtype=np.float32) -> np.ndarray:
        """Probability mass per bin for every sample (rows sum to 1)."""
        totals = self.totals()
        empty = np.flatnonzero(totals == 0)
        if empty.size:
            raise ValueError(
                f"{empty.size} of {self.n_samples} samples have no counted errors (first: {empty[0]}); "
                f"were they logged, and did training run past skip_epochs={self.skip_epochs}?")
        return (self.counts / totals[:, None].astype(np.float64)).astype(dtype)

    def merge(self, other: "ErrorLog") -> "ErrorLog":
        """Add another log's counts (data-parallel shards or an ensemble of runs) in place."""
        if other.n_samples != self.n_samples:
            raise ValueError(f"cannot merge logs of {self.n_samples} and {other.n_samples} samples")
        if other.bin_edges.shape != self.bin_edges.shape or not np.array_equal(other.bin_edges, self.bin_edges):
            raise ValueError("cannot merge logs with different bin edges")
        dtype = np.promote_types(self.counts.dtype, other.counts.dtype)
        merged = self.counts.astype(dtype, copy=False) + other.counts.astype(dtype, copy=False)
        if merged.dtype != np.uint64 and merged.max(initial=0) > np.iinfo(merged.dtype).max // 2:
            merged = self.counts.astype(np.uint64) + other.counts
        self.counts = merged
        epochs = max(len(self.epoch_stats), len(other.epoch_stats))
        stats = np.zeros((epochs, len(EPOCH_STATS)))
        for part in (self.epoch_stats, other.epoch_stats):  # shards of one epoch: sums add, maxima combine
            stats[:len(part), :3] += part[:, :3]
            stats[:len(part), 3] = np.maximum(stats[:len(part), 3], part[:, 3])
        self.epoch_stats = stats
        self.epoch = max(self.epoch, other.epoch)
        self.n_counted += other.n_counted
        self.n_clamped_low += other.n_clamped_low
        self.n_clamped_high += other.n_clamped_high
        return self

    def summary(self) -> dict:
        """What the log holds, for ``ltau-lmp info`` and training reports."""
        return {
            "format": ERRORLOG_FORMAT, "version": ERRORLOG_VERSION,
            "n_samples": self.n_samples, "nbins": self.nbins,
            "bin_range": [float(self.bin_edges[0]), float(self.bin_edges[-1])],
            "epochs_seen": self.epoch, "skip_epochs": self.skip_epochs, "stop_epoch": self.stop_epoch,
            "errors_counted": self.n_counted,
            "clamped_low": self.n_clamped_low, "clamped_high": self.n_clamped_high,
            "count_dtype": str(self.counts.dtype),
        }

    def save(self, path) -> Path:
        """Write an ``.npz`` (counts, edges, json header); atomic, no pickle."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, counts=self.counts, bin_edges=self.bin_edges, epoch_stats=self.epoch_stats,
                 header=np.array(json.dumps(self.summary())))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "ErrorLog":
        """Read a log written by ``save``; any inconsistency raises ``FileFormatError``."""
        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"{path}: error-log file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("counts", "bin_edges", "header")}
                # logs written before the per-epoch aggregates existed have none
                stats = data["epoch_stats"] if "epoch_stats" in data.files else np.zeros((0, len(EPOCH_STATS)))
        except KeyError as exc:
            raise FileFormatError(f"{path}: not an ltau error log (missing array {exc})") from None
        except Exception as exc:  # zipfile / numpy raise many types for damaged files
            raise FileFormatError(f"{path}: unreadable error-log file ({type(exc).__name__}: {exc})") from None
        try:
            header = json.loads(str(arrays["header"]))
        except ValueError:
            raise FileFormatError(f"{path}: error-log header is not valid JSON") from None
        check_file_format(header, ERRORLOG_FORMAT, ERRORLOG_VERSION, path, "error log")
        counts, edges = arrays["counts"], arrays["bin_edges"]
        if counts.ndim != 2 or counts.dtype not in [np.dtype(d) for d in _COUNT_DTYPES]:
            raise FileFormatError(f"{path}: counts must be a 2-D unsigned array, got {counts.dtype} {counts.shape}")
        if edges.shape != (counts.shape[1] + 1,) or counts.shape != (header["n_samples"], header["nbins"]):
            raise FileFormatError(f"{path}: counts {counts.shape} and bin edges {edges.shape} do not match "
                                  f"the header ({header['n_samples']} samples, {header['nbins']} bins)")
        try:
            log = cls(counts.shape[0], edges, skip_epochs=header["skip_epochs"],
                      stop_epoch=header["stop_epoch"], count_dtype=counts.dtype)
        except ConfigError as exc:
            raise FileFormatError(f"{path}: {exc}") from None
        if stats.ndim != 2 or stats.shape[1] != len(EPOCH_STATS) or len(stats) > int(header["epochs_seen"]):
            raise FileFormatError(f"{path}: epoch_stats of shape {stats.shape} do not fit "
                                  f"{header['epochs_seen']} epochs x {len(EPOCH_STATS)} aggregates")
        log.counts = counts
        log.epoch_stats = stats.astype(np.float64)
        log.epoch = int(header["epochs_seen"])
        log.n_counted = int(header["errors_counted"])
        log.n_clamped_low = int(header["clamped_low"])
        log.n_clamped_high = int(header["clamped_high"])
        if int(counts.sum(dtype=np.uint64)) != log.n_counted:
            raise FileFormatError(f"{path}: counts sum to {int(counts.sum(dtype=np.uint64))} but the header "
                                  f"records {log.n_counted} errors (corrupted file)")
        return log
