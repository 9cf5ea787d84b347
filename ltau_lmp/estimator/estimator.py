"""The LTAU estimator: error distributions of the k nearest training atoms in latent space.

Build: descriptors D (n_train x d, from the final model) and per-atom error PDFs P
(n_train x nbins, from the training-error log; stored compressed, ``pdf_table``) on fixed bin
edges. Query: the predicted error PDF of a new atom is the mean of its k nearest neighbours' PDFs
(L2 in latent space).
From that PDF: expected error, quantiles, P(err < tol); the mean kNN distance flags atoms far
from the training data, and its rank among held-out in-domain atoms' distances (``calibration``)
turns it into a p-value with a stated false-alarm rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator import calibration
from ltau_lmp.estimator.errorlog import ErrorLog, validate_bin_edges
from ltau_lmp.estimator.histogram import CHUNK_ROWS, log_midpoints, pdf_cdf_at, pdf_quantiles
from ltau_lmp.estimator.index import SearchIndex, set_threads
from ltau_lmp.estimator.index_tuning import build_index
from ltau_lmp.estimator.io import load_estimator, save_estimator
from ltau_lmp.estimator.options import DEFAULT_K, WEIGHTINGS, EstimatorOptions
from ltau_lmp.estimator.pdf_table import DensePDFTable, PDFTable, as_pdf_table

PROGRESS_MIN_POINTS = 500_000
PDF_CHUNK = 4096  # points per block when mixing PDFs: k = 10 neighbours' gathered blocks ~6 MB as float32


@dataclass
class LTAUResult:
    """Per-point uncertainty. ``pdf`` and quantiles are computed on demand, in chunks."""

    expected: np.ndarray       # (n,) expected error, eV/Å
    distance: np.ndarray       # (n,) mean Euclidean distance to the k neighbours (latent units)
    neighbors: np.ndarray      # (n, k) training-entry ids
    weights: np.ndarray        # (n, k) neighbour weights, rows sum to 1
    estimator: "LTAUEstimator"
    chunk_size: int = PDF_CHUNK

    def __len__(self) -> int:
        return self.expected.shape[0]

    def _pdf_chunks(self):
        for start in range(0, len(self), self.chunk_size):
            stop = min(start + self.chunk_size, len(self))
            yield start, stop, self.estimator.mix_pdfs(self.neighbors[start:stop], self.weights[start:stop])

    @property
    def pdf(self) -> np.ndarray:
        """(n, nbins) predicted probability mass per bin."""
        out = np.empty((len(self), self.estimator.nbins), dtype=np.float32)
        for start, stop, block in self._pdf_chunks():
            out[start:stop] = block
        return out

    def quantile(self, q: float) -> np.ndarray:
        """Error value below which the predicted distribution puts mass ``q``."""
        out = np.empty(len(self))
        for start, stop, block in self._pdf_chunks():
            out[start:stop] = pdf_quantiles(block, self.estimator.bin_edges, (q,))[:, 0]
        return out

    def interval(self, lo: float = 0.05, hi: float = 0.95) -> np.ndarray:
        """(n, 2) error interval between the ``lo`` and ``hi`` quantiles."""
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        out = np.empty((len(self), 2))
        for start, stop, block in self._pdf_chunks():
            out[start:stop] = pdf_quantiles(block, self.estimator.bin_edges, (lo, hi))
        return out

    @property
    def ood(self) -> np.ndarray:
        """(n,) out-of-domain p-value of ``distance``: the conformal rank among held-out atoms,
        continued by their fitted tail (small = unusual; ``calibration``).

        Only for queries with the estimator's own k: the reference distances were measured with it.
        """
        k = self.neighbors.shape[1]
        if k != self.estimator.k:
            raise ConfigError(f"ood p-values are calibrated for the estimator's k={self.estimator.k}; "
                              f"this query used k={k}")
        return self.estimator.ood_pvalues(self.distance)

    def prob_below(self, tol) -> np.ndarray:
        """P(error < tol) from the predicted distribution (tol scalar or one per point)."""
        tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), (len(self),))
        out = np.empty(len(self))
        for start, stop, block in self._pdf_chunks():
            out[start:stop] = pdf_cdf_at(block, self.estimator.bin_edges, tol[start:stop])
        return out


class LTAUEstimator:
    """kNN over training-atom descriptors + their training-error distributions."""

    def __init__(self, index: SearchIndex, pdfs: PDFTable | DensePDFTable | np.ndarray, bin_edges: np.ndarray,
                 k: int = DEFAULT_K, weighting: str = "uniform", metadata: dict | None = None,
                 reference_distances: np.ndarray | None = None, alarm_thresholds: dict | None = None):
        """``pdfs``: the entries' error distributions, a table (``pdf_table``: what ``build`` and
        ``load`` pass, kept as ``self.pdfs``) or float PDFs (n_entries, nbins), quantised into one."""
        self.index = index
        self.bin_edges = validate_bin_edges(bin_edges)
        self.metadata = dict(metadata or {})
        self.k = self._check_k(k)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        _check_card_metadata(self.metadata, index.dim)
        self.pdfs = as_pdf_table(pdfs)
        if (self.pdfs.n_entries, self.pdfs.nbins) != (index.ntotal, self.nbins):
            raise ConfigError(f"PDF table {(self.pdfs.n_entries, self.pdfs.nbins)} does not match "
                              f"{index.ntotal} indexed entries x {self.nbins} bins")
        # Expected error is linear in the PDF: precompute it per training entry once.
        self.entry_expected = self.pdfs.expected(log_midpoints(self.bin_edges))
        if (reference_distances is None) != (alarm_thresholds is None):
            raise ConfigError("reference_distances and alarm_thresholds come together (calibrate)")
        self.reference_distances = self.alarm_thresholds = self._distance_tail = None
        if reference_distances is not None:
            self._set_reference(calibration.check_reference(reference_distances),
                                calibration.check_thresholds(alarm_thresholds, reference_distances.size))

    @classmethod
    def build(cls, descriptors, error_log_or_pdfs, bin_edges=None, options: EstimatorOptions | None = None, *,
              metadata: dict | None = None, reference_descriptors=None, structures=None, use_gpu: bool | str = "auto",
              gpu_device: int = 0, threads: int | None = None, progress: bool | None = None,
              **choices) -> "LTAUEstimator":
        """From descriptors (n, d) and either an ``ErrorLog`` or PDFs (n, nbins) + ``bin_edges``.

        ``options`` (``EstimatorOptions``): what to build: index kind and options, k, weighting and
        the false-alarm rate of the thresholds; keyword ``choices`` replace its fields
        (``build(x, log, k=5, index="flat")``). ``reference_descriptors``: latents of held-out
        in-domain atoms (not among ``descriptors``), for the ``ood`` p-value and the alarm thresholds
        (``calibrate``), on which an approximate index is also tuned; without them, ``structures``
        ((n,) the training structure of each descriptor row) lets it hold out whole structures
        instead (``index_tuning``). ``metadata`` should name the model (``ltau_lmp.pipeline.card_metadata``: a
        plain dict of its card); without a ``model_hash`` the estimator records ``model_binding:
        "unchecked"`` and says so wherever it is used (``model_binding``). ``use_gpu``,
        ``gpu_device``, ``threads`` and ``progress`` say where and how the index is built and searched.
        """
        options = dataclasses.replace(options or EstimatorOptions(), **choices)
        descriptors = as_descriptors(descriptors)
        if reference_descriptors is not None:  # checked before the index is built, not after
            calibration.check_rate(options.false_alarm_rate)
            reference_descriptors = as_descriptors(reference_descriptors, descriptors.shape[1], "reference descriptors")
        if isinstance(error_log_or_pdfs, ErrorLog):
            if bin_edges is not None:
                raise ConfigError("bin_edges come from the ErrorLog; do not pass them as well")
            bin_edges = error_log_or_pdfs.bin_edges
            try:  # the counts themselves: exact, where the float PDFs would be quantised
                pdfs = PDFTable.from_counts(error_log_or_pdfs.counts)
            except ConfigError as exc:
                raise ConfigError(f"error log: {exc}; were they logged, and did training run past "
                                  f"skip_epochs={error_log_or_pdfs.skip_epochs}?") from None
        else:
            if bin_edges is None:
                raise ConfigError("building from a PDF array needs bin_edges")
            pdfs = PDFTable.from_pdfs(error_log_or_pdfs)
        if pdfs.n_entries != descriptors.shape[0]:
            raise ConfigError(f"{descriptors.shape[0]} descriptors but {pdfs.n_entries} error distributions")
        set_threads(threads)
        if progress is None:
            progress = descriptors.shape[0] >= PROGRESS_MIN_POINTS
        metadata = dict(metadata or {})
        metadata.setdefault("model_binding", "checked" if metadata.get("model_hash") else "unchecked")
        _check_card_metadata(metadata, descriptors.shape[1])  # before the index is built
        search_index = build_index(descriptors, options.index, options.index_options, use_gpu, gpu_device, progress,
                                   tuning_queries=reference_descriptors, structures=structures)
        estimator = cls(search_index, pdfs, bin_edges, k=options.k, weighting=options.weighting, metadata=metadata)
        if reference_descriptors is not None:
            estimator.calibrate(reference_descriptors, options.false_alarm_rate)
        return estimator

    def calibrate(self, reference_descriptors,
                  false_alarm_rate: float = calibration.DEFAULT_FALSE_ALARM_RATE) -> dict:
        """Measure held-out in-domain atoms as queries; keep their sorted kNN distances and the alarm
        thresholds at ``false_alarm_rate`` (returned). Replaces an earlier calibration.

        The atoms must not be in the index (their distance would be ~0) and should come from the
        training distribution: validation structures, not training structures.
        """
        rate = calibration.check_rate(false_alarm_rate)
        try:
            res = self.query(reference_descriptors)
        except ConfigError as exc:
            raise ConfigError(f"reference descriptors: {exc}") from None
        if len(res) == 0:
            raise ConfigError("reference descriptors are empty: the ood calibration needs held-out atoms")
        reference = np.sort(res.distance)
        self._set_reference(reference, calibration.alarm_thresholds(reference, res.expected, rate))
        return self.alarm_thresholds

    def _set_reference(self, reference: np.ndarray, thresholds: dict) -> None:
        self.reference_distances, self.alarm_thresholds = reference, thresholds
        self._distance_tail = calibration.stored_tail(thresholds, "distance_tail")

    @property
    def has_ood_reference(self) -> bool:
        """Whether ``ood`` p-values are available (the estimator was calibrated on held-out atoms)."""
        return self.reference_distances is not None

    def ood_pvalues(self, distance) -> np.ndarray:
        """p-values of mean kNN distances measured with this estimator's k: the conformal rank among
        the reference distances, continued by their fitted tail (``calibration``)."""
        if self.reference_distances is None:
            raise ConfigError(calibration.NO_REFERENCE)
        return calibration.ood_pvalues(self.reference_distances, distance, self._distance_tail)

    def check_model(self, card, model_name: str = "this model") -> None:
        """Refuse a model whose latent space is not the one indexed (``card``: the model's ``ModelCard``;
        its ``latent_dim``, ``model_hash`` and ``family`` are read).

        Latent features of another model live in another space: the kNN answer would be noise.
        The dimension is always known; the content hash only when the estimator was built with the
        model's card (``card_metadata``), which every path that has the model records; without it
        (``model_binding == "unchecked"``) any model of the same latent width passes.
        """
        if card.latent_dim != self.dim:
            raise ConfigError(f"the estimator indexes {self.dim}-dimensional latent features but {model_name} "
                              f"has latent_dim {card.latent_dim}: it was built for another model")
        expected = self.metadata.get("model_hash")
        if self.model_binding == "checked" and expected != card.model_hash:
            raise ConfigError(f"the estimator was built for model {expected[:12]}, not for {model_name} "
                              f"({card.family} model {card.model_hash[:12]}): rebuild the estimator for this model")

    @property
    def model_binding(self) -> str:
        """"checked" when the estimator records its model's hash (``check_model`` refuses any other
        model), "unchecked" when it does not (any model of the same latent width passes): users of an
        unchecked estimator should be told so (``ltau-lmp info``, fix ltau)."""
        return "checked" if self.metadata.get("model_hash") else "unchecked"

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def n_entries(self) -> int:
        return self.index.ntotal

    @property
    def nbins(self) -> int:
        return self.bin_edges.size - 1

    def _check_k(self, k: int) -> int:
        if int(k) < 1 or int(k) > self.index.ntotal:
            raise ConfigError(f"k must lie in [1, {self.index.ntotal}] (the number of entries), got {k}")
        return int(k)

    def mix_pdfs(self, neighbors: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weighted mean of the neighbours' PDFs: (n, k) ids and weights → (n, nbins) float32
        (``PDFTable.mix``: without the dense table)."""
        return self.pdfs.mix(neighbors, weights)

    def query(self, descriptors, k: int | None = None, chunk_size: int = CHUNK_ROWS,
              progress: bool | None = None) -> LTAUResult:
        """Uncertainty of new points from their latent descriptors (n, d)."""
        from tqdm.auto import tqdm

        X = as_descriptors(descriptors, self.dim)
        k = self.k if k is None else self._check_k(k)
        n = X.shape[0]
        distance = np.empty(n)
        neighbors = np.empty((n, k), dtype=np.int64)
        weights = np.empty((n, k), dtype=np.float64)
        if progress is None:
            progress = n >= PROGRESS_MIN_POINTS
        with tqdm(total=n, desc="LTAU query", unit="pt", disable=not progress) as bar:
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                dist, ids = self.index.search(X[start:stop], k)
                neighbors[start:stop] = ids
                distance[start:stop] = dist.mean(axis=1)
                weights[start:stop] = self._weights(dist)
                bar.update(stop - start)
        expected = np.einsum("nk,nk->n", weights, self.entry_expected[neighbors])
        return LTAUResult(expected, distance, neighbors, weights, self)

    def _weights(self, dist: np.ndarray) -> np.ndarray:
        if self.weighting == "uniform":
            return np.full(dist.shape, 1.0 / dist.shape[1])
        inv = 1.0 / np.maximum(dist, 1e-12)
        return inv / inv.sum(axis=1, keepdims=True)

    def save(self, path, overwrite: bool = False):
        """Directory with meta.json, the PDF table's pdf_*.npy, bin_edges.npy, index.faiss (see ``io``);
        an existing ``path`` is replaced only if it is an earlier estimator and ``overwrite`` is given."""
        return save_estimator(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, mmap: bool = True, verify: bool = True, use_gpu: bool | str = "auto",
             gpu_device: int = 0) -> "LTAUEstimator":
        """Load and validate; ``mmap`` shares the arrays' pages between processes on one node."""
        return load_estimator(path, cls, mmap=mmap, verify=verify, use_gpu=use_gpu, gpu_device=gpu_device)

    def summary(self) -> dict:
        """What ``ltau-lmp info`` prints: the model binding and card first (None when built without
        one), then the index."""
        metadata = dict(self.metadata)
        metadata.pop("model_binding", None)
        return {
            "model_binding": self.model_binding,
            "model_card": metadata.pop("model_card", None),
            "n_entries": self.n_entries, "dim": self.dim, "nbins": self.nbins,
            "bin_range": [float(self.bin_edges[0]), float(self.bin_edges[-1])],
            "pdf_table": self.pdfs.describe(),
            "index": {"kind": self.index.kind, **self.index.options},
            "k": self.k, "weighting": self.weighting,
            "n_reference": 0 if self.reference_distances is None else int(self.reference_distances.size),
            "alarm_thresholds": self.alarm_thresholds,
            "search_device": "cpu" if self.index.gpu_device is None else f"gpu:{self.index.gpu_device}",
            "metadata": metadata,
        }


def _check_card_metadata(metadata: dict, dim: int) -> None:
    """A recorded card must describe the indexed vectors: same width, same hash as ``model_hash``.

    Catches descriptors of one model built with another model's card (at build) and edited
    metadata (at load).
    """
    _check_binding(metadata)
    card = metadata.get("model_card")
    if card is None:
        return
    if not isinstance(card, dict) or "latent_dim" not in card or "model_hash" not in card:
        raise ConfigError(f"metadata model_card must be a model card dict (ltau_lmp.pipeline.card_metadata), "
                          f"got {card!r:.80}")
    if card["latent_dim"] != dim:
        raise ConfigError(f"the descriptors are {dim}-dimensional but the model card says latent_dim "
                          f"{card['latent_dim']}: descriptors and card come from different models")
    if card["model_hash"] != metadata.get("model_hash"):
        raise ConfigError("metadata model_hash differs from the model card's: build the metadata with "
                          "ltau_lmp.pipeline.card_metadata")


def _check_binding(metadata: dict) -> None:
    """A recorded ``model_binding`` must say what the metadata holds: "checked" iff a model hash."""
    binding = metadata.get("model_binding")
    if binding is not None and binding != ("checked" if metadata.get("model_hash") else "unchecked"):
        raise ConfigError(f"metadata model_binding {binding!r} contradicts the metadata: "
                          f"{'a' if metadata.get('model_hash') else 'no'} model_hash is recorded")


def as_descriptors(values, dim: int | None = None, what: str = "") -> np.ndarray:
    """Latent vectors as a contiguous float32 (n, d) array (faiss's input), finite; with ``dim``
    the width must match (n may be 0), without it n must not be 0. ``what`` prefixes errors."""
    X = np.ascontiguousarray(values, dtype=np.float32)
    prefix = f"{what}: " if what else ""
    if dim is None and (X.ndim != 2 or X.shape[0] == 0):
        raise ConfigError(f"{prefix}descriptors must be a non-empty (n, d) array, got shape {X.shape}")
    if dim is not None and (X.ndim != 2 or X.shape[1] != dim):
        raise ConfigError(f"{prefix}descriptors must have shape (n, {dim}), got {X.shape}")
    for start in range(0, X.shape[0], CHUNK_ROWS):  # in blocks: no (n, d) temporary at 10^7 rows
        if not np.isfinite(X[start:start + CHUNK_ROWS]).all():
            raise ConfigError(f"{prefix}descriptors contain NaN or infinite values")
    return X
