"""Nearest-neighbour search in latent space through faiss: what runs at every query.

Four backends, all L2 on float32 vectors: ``flat`` (exact), ``ivf`` (inverted lists of exact
vectors: scans ``nprobe`` of ``nlist`` clusters; with ``pca`` the lists hold the vectors' first
``pca`` principal components and the ``nprobe`` lists' best ``k x k_factor`` candidates are
re-ranked with the exact vectors), ``hnsw`` (graph) and ``ivfpq`` (compressed). With faiss-gpu
and a visible GPU, ``flat``, ``ivf`` (without an HNSW quantizer or ``pca``) and ``ivfpq`` are
searched on the GPU; faiss has no GPU HNSW and no GPU re-ranking, so those stay on the CPU.

Vectors are centred before they are stored (a ``CenteringTransform`` in front; ``pca`` centres
too). Latent features carry a large common offset: MACE's have norm ~15 with nearest neighbours
0.006 apart, and the ``|q|^2 + |x|^2 - 2 q.x`` form that faiss's exact search computes in
float32 then loses the neighbours in rounding (recall@10 0.24 for exact-vs-"exact" at 1M, 0.99
after centring). Indexes written before centring still load and search as they were built.

``SearchIndex`` holds a filled faiss index with its kind and options; the search-time parameters
(``nprobe``, ``ef_search``, ``k_factor``) are not all stored by ``write_index``, so they are set
after every load, through faiss's ``ParameterSpace`` (which reaches through the id map, the
transform and the IVF wrapper). CPU IVF and HNSW batches are searched in latent-locality order
(``SearchIndex.search``): the same answers, fewer cache misses. How an index is chosen, filled and
tuned at build time (``auto``, held-out recall, the race between candidates, storing HNSW nodes
in locality order) is ``index_tuning``.

faiss is imported on first use (``require_faiss``), not with this module: the kinds and defaults
declared here feed the command line, which must start (and print its help) without faiss.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.histogram import CHUNK_ROWS

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
KIND_CHOICES = ("auto", *INDEX_KINDS)  # what users may ask for; "auto" resolves by size (index_tuning)
DEFAULT_KIND = "auto"
RECORDED = ("auto", "recall_at_10", "recall_queries", "queries_per_cpu_s", "choice")  # written by the build: how
# chosen, what recall reached on which held-out atoms, the speeds auto's race measured, and why it chose
TUNED = {"ivf": "nprobe", "hnsw": "ef_search"}  # the search-time parameter a target_recall tunes
SEARCH_PARAMETERS = {"ivf": ("nprobe", "nprobe"), "ivfpq": ("nprobe", "nprobe"),
                     "hnsw": ("ef_search", "efSearch")}  # kind: (our option, faiss ParameterSpace name)
REBUILD_ONLY = {"target_recall", "nlist", "quantizer", "pca", "M", "ef_construction"}
LOCALITY_MIN_QUERIES = 64  # batches from here are searched in locality order (``SearchIndex.search``)
LOCALITY_PIVOTS = 256  # entries whose nearest orders an HNSW batch (random pivots: 37-39k q/s at 1M, k-means 39k)
OPTION_DEFAULTS = {  # per kind; None = derived from the data in resolve_options
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 8, "quantizer": "flat", "target_recall": None, "pca": None, "k_factor": 2},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": 16, "target_recall": None},
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


def resolve_options(kind: str, dim: int, n_entries: int, options: dict | None) -> dict:
    """Fill defaults; for IVF-PQ derive nlist (≈ √n, cheap to train) and the PQ sub-vector count.

    IVF with ``target_recall`` (and no ``nprobe``) leaves nprobe to the build's tuning.
    """
    options = dict(options or {})
    unknown = set(options) - set(OPTION_DEFAULTS[kind]) - set(RECORDED)
    if unknown:
        raise ConfigError(f"unknown option(s) for index {kind!r}: {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(OPTION_DEFAULTS[kind]) or 'none'}")
    tuned = TUNED.get(kind)
    if tuned and options.get("target_recall") is not None:
        if options.get(tuned) is not None:
            raise ConfigError(f"{kind}: give {tuned} or target_recall ({tuned} tuned to reach it), not both")
        options[tuned] = None
    resolved = {**OPTION_DEFAULTS[kind], **options}
    if kind in ("ivf", "ivfpq") and resolved["nlist"] is None:
        resolved["nlist"] = int(max(1, min(n_entries // 64, math.isqrt(n_entries))))
    if kind == "ivf":
        _check_ivf(resolved, dim)
    if tuned:
        _check_target(kind, tuned, resolved)
    if kind == "ivfpq":
        if resolved["pq_m"] is None:
            resolved["pq_m"] = next(m for m in (dim // 2, dim // 4, dim, 1) if m >= 1 and dim % m == 0)
        if dim % resolved["pq_m"]:
            raise ConfigError(f"ivfpq pq_m={resolved['pq_m']} must divide the descriptor dimension {dim}")
    return resolved


def _check_ivf(opts: dict, dim: int) -> None:
    if opts["quantizer"] not in ("flat", "hnsw"):
        raise ConfigError(f"ivf quantizer must be 'flat' or 'hnsw', got {opts['quantizer']!r}")
    for name in ("nlist", "k_factor"):
        if opts[name] is not None and (not isinstance(opts[name], numbers.Integral) or opts[name] < 1):
            raise ConfigError(f"ivf {name} must be a positive integer, got {opts[name]!r}")
    pca = opts["pca"]
    if pca is not None and (not isinstance(pca, numbers.Integral) or not 1 <= pca < dim):
        raise ConfigError(f"ivf pca (principal components kept) must be an integer in [1, {dim - 1}] for "
                          f"{dim}-dimensional descriptors, got {pca!r}")


def _check_target(kind: str, tuned: str, opts: dict) -> None:
    """The search-time parameter ``tuned`` is a positive integer, or None with a target recall."""
    target = opts["target_recall"]
    if target is not None and not (isinstance(target, (int, float)) and 0.0 < target <= 1.0):
        raise ConfigError(f"{kind} target_recall must lie in (0, 1], got {target!r}")
    if opts[tuned] is None and target is None:
        raise ConfigError(f"{kind} {tuned}=None needs a target_recall to tune it to")
    if opts[tuned] is not None and (not isinstance(opts[tuned], numbers.Integral) or opts[tuned] < 1):
        raise ConfigError(f"{kind} {tuned} must be a positive integer, got {opts[tuned]!r}")


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


def set_search_parameter(index, name: str, value: int) -> None:
    """One faiss search-time parameter (``nprobe``, ``efSearch``) of a CPU index, through
    ``ParameterSpace``: it reaches the IVF or HNSW inside an id map or IVF wrapper."""
    require_faiss().ParameterSpace().set_index_parameter(index, name, int(value))


def apply_search_options(index, kind: str, opts: dict) -> None:
    """Search-time parameters are not all stored by ``write_index``; set them after every load."""
    if kind in SEARCH_PARAMETERS:
        option, name = SEARCH_PARAMETERS[kind]
        set_search_parameter(index, name, opts[option])
    refine = find_refine(index)
    if refine is not None:
        refine.k_factor = float(opts["k_factor"])


def unwrap(index) -> tuple[list, object]:
    """(the vector transforms in front, the index behind them) of an index, through an id map:
    the transforms a query must go through before the inner IVF or HNSW sees it."""
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexPreTransform):
        return [], index
    chain = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
    return chain, faiss.downcast_index(index.index)


def unwrap_ivf(index):
    """The IVF inside an ivf / ivfpq index, through id map, re-ranking and transforms."""
    return require_faiss().extract_index_ivf(index)


def find_refine(index):
    """The ``IndexRefineFlat`` of an ivf with ``pca`` (behind its id map), else None."""
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexRefine) else None


def transform(chain: list, vectors: np.ndarray) -> np.ndarray:
    """``vectors`` through the transforms of ``unwrap`` (the centring) in order."""
    for vt in chain:
        vectors = vt.apply(vectors)
    return vectors


@dataclass
class SearchIndex:
    """A faiss index plus what is needed to search it the same way after a reload
    (``index_tuning.build_index`` makes one; the estimator file stores it)."""

    kind: str
    options: dict
    cpu_index: object
    gpu_device: int | None = None
    _search_index: object = field(default=None, repr=False)
    _pivots: np.ndarray | None = field(default=None, repr=False)  # HNSW's locality order, from its entries

    def place(self, use_gpu: bool | str = "auto", gpu_device: int = 0) -> None:
        """Choose where searches run: GPU copy for flat / ivf / ivfpq when asked for (or auto) and
        available; HNSW graphs (also an IVF's HNSW quantizer) stay on the CPU."""
        apply_search_options(self.cpu_index, self.kind, self.options)
        want_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        if want_gpu and not gpu_available():
            raise ConfigError("a GPU index was requested but faiss reports no GPU (is faiss-gpu installed?)")
        cpu_only = self.kind == "hnsw" or self.options.get("quantizer") == "hnsw" or self.options.get("pca")
        if want_gpu and not cpu_only:  # faiss has no GPU HNSW and no GPU re-ranking
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
        """Change e.g. ``ef_search`` or ``nprobe`` without rebuilding (drops the build's recall: stale)."""
        fixed = set(overrides) & {*REBUILD_ONLY, *RECORDED}
        if fixed:
            raise ConfigError(f"{', '.join(sorted(fixed))} cannot change without rebuilding the index")
        kept = {key: value for key, value in self.options.items() if key not in RECORDED[1:]}
        if "target_recall" in kept:  # the tuned value no longer answers to it
            kept["target_recall"] = None
        self.options = resolve_options(self.kind, self.dim, self.ntotal, {**kept, **overrides})
        apply_search_options(self.cpu_index, self.kind, self.options)
        if self._search_index is not self.cpu_index:
            self.place(True, self.gpu_device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, row ids), each (n, k); faiss returns squared L2, we take the root.

        CPU IVF and HNSW batches are searched in locality order (``_search_in_locality_order``): the
        same answers, fewer cache misses."""
        local = (self._search_index is self.cpu_index and self.kind in ("ivf", "hnsw")
                 and find_refine(self.cpu_index) is None)
        if local and len(queries) >= LOCALITY_MIN_QUERIES:
            sq, ids = self._search_in_locality_order(queries, int(k))
        else:
            sq, ids = self._search_index.search(queries, int(k))
        short = np.flatnonzero((ids < 0).any(axis=1))
        if short.size:  # an IVF whose probed lists hold fewer than k entries for these queries
            sq[short], ids[short] = self._search_all_lists(queries[short], int(k))
        np.maximum(sq, 0.0, out=sq)
        return np.sqrt(sq, out=sq), ids

    def _search_all_lists(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The few queries whose probed IVF lists held fewer than k entries, searched again over
        every list (on the CPU): MD must get k neighbours for every atom, not an error."""
        if self.kind not in ("ivf", "ivfpq"):
            raise RuntimeError(f"the {self.kind} index returned fewer than k={k} neighbours "
                               f"(index of {self.ntotal} entries)")
        name = SEARCH_PARAMETERS[self.kind][1]
        set_search_parameter(self.cpu_index, name, unwrap_ivf(self.cpu_index).nlist)
        try:
            return self.cpu_index.search(queries, k)
        finally:
            apply_search_options(self.cpu_index, self.kind, self.options)

    def _search_in_locality_order(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries sorted so that neighbours in latent space are searched one after the other: an
        MD rank's atoms come in space order, and each then pulls its own lists / graph nodes into
        cache. IVF: by the first probed list (the assignment is reused: ``search_preassigned``);
        HNSW: by the nearest of ``LOCALITY_PIVOTS`` entries, the order its nodes are stored in.
        Measured on Si latents, 4096 queries, one thread: IVF 1M +15 % (42-44k -> 50k q/s; 100k
        +4 %); HNSW 1M 28k -> 38k q/s sorting the queries, 49k also storing the nodes in order."""
        chain, inner = unwrap(self.cpu_index)
        seen = transform(chain, queries)  # as the inner IVF / HNSW sees them (centred)
        if self.kind == "ivf":
            coarse_sq, coarse = inner.quantizer.search(seen, inner.nprobe)
            order = np.argsort(coarse[:, 0], kind="stable")
            found = inner.search_preassigned(seen[order], k, coarse[order], coarse_sq[order])
        else:
            if self._pivots is None:
                self._pivots = hnsw_flat(self.cpu_index).storage.reconstruct_batch(pivot_rows(self.ntotal))
            order = locality_order(seen, self._pivots)
            found = self.cpu_index.search(queries[order], k)
        sq, ids = np.empty_like(found[0]), np.empty_like(found[1])
        sq[order], ids[order] = found
        return sq, ids


def hnsw_flat(index):
    """The ``IndexHNSWFlat`` of an HNSW index, bare (earlier estimators) or behind its id map and
    centring: its storage and graph."""
    return unwrap(index)[1]


def pivot_rows(n: int) -> np.ndarray:
    """The entries whose nearest orders vectors by locality: ``LOCALITY_PIVOTS`` evenly spaced rows."""
    return np.linspace(0, n - 1, min(LOCALITY_PIVOTS, n)).astype(np.int64)


def locality_order(vectors: np.ndarray, pivots: np.ndarray) -> np.ndarray:
    """Row order grouping the vectors by their nearest pivot (stable within a group)."""
    nearest = np.concatenate([require_faiss().knn(np.ascontiguousarray(vectors[start:start + CHUNK_ROWS]), pivots, 1)[1]
                              for start in range(0, len(vectors), CHUNK_ROWS)])
    return np.argsort(nearest[:, 0], kind="stable")
