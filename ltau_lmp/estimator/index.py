"""Nearest-neighbour search in latent space through faiss.

Four backends, all L2 on float32 vectors, built through ``faiss.index_factory``:
``flat`` (exact), ``ivf`` (inverted lists of exact vectors: scans ``nprobe`` of ``nlist``
clusters, several times faster than flat at recall ~0.99 on clustered latent spaces),
``hnsw`` (graph, fast and accurate up to tens of millions of entries) and ``ivfpq``
(compressed, for very large sets). With faiss-gpu and a visible GPU, ``flat``, ``ivf`` and
``ivfpq`` are searched on the GPU; faiss has no GPU HNSW, so ``hnsw`` stays on the CPU.

faiss is imported on first use (``require_faiss``), not with this module: the kinds and defaults
declared here feed the command line, which must start (and print its help) without faiss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ltau_lmp.errors import ConfigError

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
KIND_CHOICES = ("auto", *INDEX_KINDS)  # what users may ask for; "auto" resolves by size
DEFAULT_KIND = "auto"
AUTO_EXACT_LIMIT = 200_000
CHUNK_ROWS = 65_536  # rows per block of work over (n, dim) or (n, nbins) arrays, package-wide: bounded temporaries
OPTION_DEFAULTS = {  # per kind; None = derived from the data in resolve_options
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 8},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": 16},
    "ivfpq": {"nlist": None, "pq_m": None, "nbits": 8, "nprobe": 16},
}


def require_faiss():
    """The faiss module; without one, an ImportError that names the install command.

    faiss-cpu and faiss-gpu are different distributions of the same module, so ltau_lmp leaves
    the choice to an extra instead of a hard dependency.
    """
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "the LTAU estimator needs faiss, which is not installed: pip install 'ltau_lmp[cpu]' "
            "(faiss-cpu), or on a CUDA 12 machine 'ltau_lmp[gpu]' (faiss-gpu-cu12)") from exc
    return faiss


def resolve_kind(kind: str, n_entries: int) -> str:
    """``auto`` means exact search below ``AUTO_EXACT_LIMIT`` entries and HNSW above."""
    if kind == "auto":
        return "flat" if n_entries < AUTO_EXACT_LIMIT else "hnsw"
    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    return kind


def resolve_options(kind: str, dim: int, n_entries: int, options: dict | None) -> dict:
    """Fill defaults; for IVF-PQ derive nlist (≈ √n, cheap to train) and the PQ sub-vector count."""
    options = dict(options or {})
    unknown = set(options) - set(OPTION_DEFAULTS[kind])
    if unknown:
        raise ConfigError(f"unknown option(s) for index {kind!r}: {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(OPTION_DEFAULTS[kind]) or 'none'}")
    resolved = {**OPTION_DEFAULTS[kind], **options}
    if kind in ("ivf", "ivfpq") and resolved["nlist"] is None:
        resolved["nlist"] = int(max(1, min(n_entries // 64, math.isqrt(n_entries))))
    if kind == "ivfpq":
        if resolved["pq_m"] is None:
            resolved["pq_m"] = next(m for m in (dim // 2, dim // 4, dim, 1) if m >= 1 and dim % m == 0)
        if dim % resolved["pq_m"]:
            raise ConfigError(f"ivfpq pq_m={resolved['pq_m']} must divide the descriptor dimension {dim}")
    return resolved


def factory_string(kind: str, opts: dict) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{int(opts['M'])},Flat"
    if kind == "ivf":
        return f"IVF{int(opts['nlist'])},Flat"
    return f"IVF{int(opts['nlist'])},PQ{int(opts['pq_m'])}x{int(opts['nbits'])}"


def gpu_available() -> bool:
    """True with a faiss-gpu build and at least one visible GPU."""
    faiss = require_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(n_threads: int | None) -> None:
    """faiss OpenMP threads for build and search (None leaves faiss's default)."""
    if n_threads is not None:
        if int(n_threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {n_threads}")
        require_faiss().omp_set_num_threads(int(n_threads))


def apply_search_options(index, kind: str, opts: dict) -> None:
    """Search-time parameters are not all stored by ``write_index``; set them after every load."""
    faiss = require_faiss()
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(opts["ef_search"])
    elif kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(opts["nprobe"])


@dataclass
class SearchIndex:
    """A faiss index plus what is needed to search it the same way after a reload."""

    kind: str
    options: dict
    cpu_index: object
    gpu_device: int | None = None
    _search_index: object = field(default=None, repr=False)

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = DEFAULT_KIND, options: dict | None = None,
              use_gpu: bool | str = "auto", gpu_device: int = 0, progress: bool = False) -> "SearchIndex":
        """Build from (n, d) float32 vectors; entries keep their row number as id."""
        n, dim = vectors.shape
        kind = resolve_kind(kind, n)
        opts = resolve_options(kind, dim, n, options)
        faiss = require_faiss()
        index = faiss.index_factory(dim, factory_string(kind, opts), faiss.METRIC_L2)
        if kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = int(opts["ef_construction"])
        if kind in ("ivf", "ivfpq"):
            if n < opts["nlist"]:
                raise ConfigError(f"{kind} with nlist={opts['nlist']} needs at least that many entries, got {n}")
            index.train(vectors[_training_subset(n, opts["nlist"])])
        _add_in_chunks(index, vectors, progress)
        search_index = cls(kind, opts, index)
        search_index.place(use_gpu, gpu_device)
        return search_index

    def place(self, use_gpu: bool | str = "auto", gpu_device: int = 0) -> None:
        """Choose where searches run: GPU copy for flat / ivfpq when asked for (or auto) and available."""
        apply_search_options(self.cpu_index, self.kind, self.options)
        want_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        if want_gpu and not gpu_available():
            raise ConfigError("a GPU index was requested but faiss reports no GPU (is faiss-gpu installed?)")
        if want_gpu and self.kind != "hnsw":
            faiss = require_faiss()
            resources = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(resources, int(gpu_device), self.cpu_index)
            self._gpu_resources = resources  # must outlive the GPU index
            self.gpu_device = int(gpu_device)
        else:
            self._search_index = self.cpu_index
            self.gpu_device = None

    @property
    def dim(self) -> int:
        return self.cpu_index.d

    @property
    def ntotal(self) -> int:
        return self.cpu_index.ntotal

    def set_search_options(self, **overrides) -> None:
        """Change e.g. ``ef_search`` or ``nprobe`` without rebuilding."""
        self.options = resolve_options(self.kind, self.dim, self.ntotal, {**self.options, **overrides})
        apply_search_options(self.cpu_index, self.kind, self.options)
        if self._search_index is not self.cpu_index:
            self.place(True, self.gpu_device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, row ids), each (n, k); faiss returns squared L2, we take the root."""
        sq, ids = self._search_index.search(queries, int(k))
        if np.any(ids < 0):
            raise RuntimeError(f"the {self.kind} index returned fewer than k={k} neighbours "
                               f"(index of {self.ntotal} entries; raise nprobe / ef_search)")
        np.maximum(sq, 0.0, out=sq)
        return np.sqrt(sq, out=sq), ids


def _training_subset(n: int, nlist: int) -> np.ndarray:
    """IVF k-means needs ~40-256 points per list; 64 keeps training fast, a fixed seed reproducible."""
    size = min(n, 64 * nlist)
    return np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))


def _add_in_chunks(index, vectors: np.ndarray, progress: bool, chunk: int = CHUNK_ROWS) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(vectors), desc="building index", unit="vec", disable=not progress) as bar:
        for start in range(0, len(vectors), chunk):
            block = vectors[start:start + chunk]
            index.add(block)
            bar.update(len(block))
