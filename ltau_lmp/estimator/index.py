"""Nearest-neighbour search in latent space through faiss.

Four backends, all L2 on float32 vectors, built through ``faiss.index_factory``:
``flat`` (exact), ``ivf`` (inverted lists of exact vectors: scans ``nprobe`` of ``nlist``
clusters, several times faster than flat at recall ~0.99 on clustered latent spaces),
``hnsw`` (graph) and ``ivfpq`` (compressed, for very large sets). With faiss-gpu and a
visible GPU, ``flat``, ``ivf`` and ``ivfpq`` are searched on the GPU; faiss has no GPU HNSW,
so ``hnsw`` stays on the CPU.

``auto`` (the default) is exact below ``AUTO_EXACT_LIMIT`` entries, so small estimators keep
exact answers, and IVF-Flat above: ``nlist`` from the size, ``nprobe`` the smallest that reaches
``AUTO_RECALL`` recall@10 against exact search for held-out atoms: the estimator's reference
(validation) atoms when it is given at least ``MIN_TUNING_QUERIES`` of them, else a fixed sample
of the data taken as new atoms (``_RecallProbe``). With reference atoms, auto also builds an
HNSW graph tuned to the same recall on them and keeps the faster of the two (``_race_hnsw``).
The recall, the queries it was measured on and the raced speeds are recorded in the options
(``recall_at_10``, ``recall_queries``, ``queries_per_cpu_s``; shown by ``ltau-lmp info``).

Measured (``benchmarks/knn_index.py``, doc/validation/knn_index.json; Si, 3BPA, GAP-20 latents
replicated with noise, held-out queries, one thread): auto's IVF answers 104-132k queries/s at
100k entries and 21-55k at 1M, recall@10 0.95-0.97, 40-50x faster than exact at 100k. IVF with
SQ8 / SQ4 / fast-scan PQ codes refined exactly was no faster at recall 0.95 in 32 dimensions:
near-duplicate MD atoms differ by less than the quantisation error, so the exact refinement
must re-rank hundreds.

faiss is imported on first use (``require_faiss``), not with this module: the kinds and defaults
declared here feed the command line, which must start (and print its help) without faiss.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from dataclasses import dataclass, field

import numpy as np

from ltau_lmp.errors import ConfigError

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
KIND_CHOICES = ("auto", *INDEX_KINDS)  # what users may ask for; "auto" resolves by size
DEFAULT_KIND = "auto"
AUTO_EXACT_LIMIT = 20_000  # below: flat, exact and still >= ~20k queries/s per core
AUTO_RECALL = 0.95  # recall@10 auto's nprobe (ef_search) must reach on the build-time queries (``_RecallProbe``)
AUTO_HNSW_QUANTIZER_NLIST = 16_384  # from here an HNSW over the centroids: below, the batched flat scan (BLAS)
# is faster (4096 lists, 1M Si latents: 42.7k vs 36.7k queries/s at the same nprobe; 8192: equal)
RECALL_K = 10
RECALL_QUERIES = 1000  # queries for the build-time recall: ~±0.005, a few s of exact search at 1M
MIN_TUNING_QUERIES = 200  # fewer reference atoms than this: tune on the training sample instead
RECALL_Z = 2.0  # the tuned recall's lower bound, in standard errors over the queries, must reach the target:
# 3BPA 100k tuned on 675 reference atoms to 0.956 (nprobe 4) gave 0.940 on the other held-out half
NEAR_DUPLICATE_FACTOR = 2.0  # entries closer than this x a sample row's nearest one are its near-duplicates
MAX_NEAR_DUPLICATES = 256  # at most that many left out per sample row (bounds the searches' k)
RECORDED = ("auto", "recall_at_10", "recall_queries", "queries_per_cpu_s")  # written by the build: how chosen,
# what recall reached on which queries, and for auto's IVF-vs-HNSW race the speeds it measured
TUNED = {"ivf": "nprobe", "hnsw": "ef_search"}  # the search-time parameter a target_recall tunes
AUTO_HNSW = {"M": 16, "ef_construction": 40}  # auto's HNSW candidate: M 16 beat M 32 at equal recall (Si latents)
HNSW_MARGIN = 1.2  # auto takes HNSW over IVF only when this much faster (IVF: faster build, GPU-capable)
MAX_EF_SEARCH = 1024
LOCALITY_MIN_QUERIES = 64  # batches from here are searched in locality order (``SearchIndex.search``)
LOCALITY_PIVOTS = 256  # entries whose nearest orders an HNSW batch (random pivots: 37-39k q/s at 1M, k-means 39k)
CHUNK_ROWS = 65_536  # rows per block of work over (n, dim) or (n, nbins) arrays, package-wide: bounded temporaries
OPTION_DEFAULTS = {  # per kind; None = derived from the data in resolve_options
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 8, "quantizer": "flat", "target_recall": None},
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


def resolve_kind(kind: str, n_entries: int) -> str:
    """``auto`` means exact search below ``AUTO_EXACT_LIMIT`` entries and tuned IVF-Flat above."""
    if kind == "auto":
        return "flat" if n_entries < AUTO_EXACT_LIMIT else "ivf"
    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    return kind


def auto_options(kind: str, n_entries: int, options: dict | None) -> dict:
    """``options`` over what ``auto`` picks: nlist ≈ 4√n as a power of two (the fastest at recall
    0.95 at 100k and 1M), nprobe tuned to ``AUTO_RECALL`` unless given."""
    options = dict(options or {})
    if kind == "flat":
        return {"auto": True, **options}
    nlist = 2 ** round(math.log2(4 * math.sqrt(n_entries)))
    tuned = {} if options.get("nprobe") is not None else {"nprobe": None, "target_recall": AUTO_RECALL}
    return {"auto": True, "nlist": nlist, "quantizer": "hnsw" if nlist >= AUTO_HNSW_QUANTIZER_NLIST else "flat",
            **tuned, **options}


def resolve_options(kind: str, dim: int, n_entries: int, options: dict | None) -> dict:
    """Fill defaults; for IVF-PQ derive nlist (≈ √n, cheap to train) and the PQ sub-vector count.

    IVF with ``target_recall`` (and no ``nprobe``) leaves nprobe to ``SearchIndex.build``'s tuning.
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
        _check_ivf(resolved)
    if tuned:
        _check_target(kind, tuned, resolved)
    if kind == "ivfpq":
        if resolved["pq_m"] is None:
            resolved["pq_m"] = next(m for m in (dim // 2, dim // 4, dim, 1) if m >= 1 and dim % m == 0)
        if dim % resolved["pq_m"]:
            raise ConfigError(f"ivfpq pq_m={resolved['pq_m']} must divide the descriptor dimension {dim}")
    return resolved


def _check_ivf(opts: dict) -> None:
    if opts["quantizer"] not in ("flat", "hnsw"):
        raise ConfigError(f"ivf quantizer must be 'flat' or 'hnsw', got {opts['quantizer']!r}")
    if opts["nlist"] is not None and (not isinstance(opts["nlist"], numbers.Integral) or opts["nlist"] < 1):
        raise ConfigError(f"ivf nlist must be a positive integer, got {opts['nlist']!r}")


def _check_target(kind: str, tuned: str, opts: dict) -> None:
    """The search-time parameter ``tuned`` is a positive integer, or None with a target recall."""
    target = opts["target_recall"]
    if target is not None and not (isinstance(target, (int, float)) and 0.0 < target <= 1.0):
        raise ConfigError(f"{kind} target_recall must lie in (0, 1], got {target!r}")
    if opts[tuned] is None and target is None:
        raise ConfigError(f"{kind} {tuned}=None needs a target_recall to tune it to")
    if opts[tuned] is not None and (not isinstance(opts[tuned], numbers.Integral) or opts[tuned] < 1):
        raise ConfigError(f"{kind} {tuned} must be a positive integer, got {opts[tuned]!r}")


def factory_string(kind: str, opts: dict) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{int(opts['M'])},Flat"
    if kind == "ivf":
        quantizer = "_HNSW32" if opts["quantizer"] == "hnsw" else ""
        return f"IVF{int(opts['nlist'])}{quantizer},Flat"
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
        hnsw_graph(index).efSearch = int(opts["ef_search"])
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
    _pivots: np.ndarray | None = field(default=None, repr=False)  # HNSW's locality order, from its entries

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = DEFAULT_KIND, options: dict | None = None,
              use_gpu: bool | str = "auto", gpu_device: int = 0, progress: bool = False,
              tuning_queries: np.ndarray | None = None) -> "SearchIndex":
        """Build from (n, d) float32 vectors; entries keep their row number as id.

        ``auto`` resolves kind and options from the size, tunes nprobe and records the recall.
        ``tuning_queries``: held-out atoms (not among ``vectors``) to tune and measure it on.
        """
        n, dim = vectors.shape
        given = set(options or {}) & set(RECORDED)
        if given:
            raise ConfigError(f"index option(s) {', '.join(sorted(given))} are recorded by the build, not inputs")
        auto = kind == "auto"
        kind = resolve_kind(kind, n)
        opts = resolve_options(kind, dim, n, auto_options(kind, n, options) if auto else options)
        probe = _RecallProbe(vectors, tuning_queries)
        index, opts = _build_one(vectors, kind, opts, progress, probe, auto)
        search_index = cls(kind, opts, index)
        want_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        if auto and kind == "ivf" and not options and probe.source == "reference" and not want_gpu:
            search_index = _race_hnsw(search_index, vectors, progress, probe)
        search_index.place(use_gpu, gpu_device)
        return search_index

    def place(self, use_gpu: bool | str = "auto", gpu_device: int = 0) -> None:
        """Choose where searches run: GPU copy for flat / ivf / ivfpq when asked for (or auto) and
        available; HNSW graphs (also an IVF's HNSW quantizer) stay on the CPU."""
        apply_search_options(self.cpu_index, self.kind, self.options)
        want_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        if want_gpu and not gpu_available():
            raise ConfigError("a GPU index was requested but faiss reports no GPU (is faiss-gpu installed?)")
        if want_gpu and self.kind != "hnsw" and self.options.get("quantizer") != "hnsw":  # no GPU HNSW
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
        fixed = set(overrides) & {"target_recall", "nlist", "quantizer", "M", "ef_construction", *RECORDED}
        if fixed:
            raise ConfigError(f"{', '.join(sorted(fixed))} cannot change without rebuilding the index")
        kept = {key: value for key, value in self.options.items() if key not in RECORDED[1:]}
        if "target_recall" in kept and overrides.get(TUNED.get(self.kind)) is not None:
            kept["target_recall"] = None
        self.options = resolve_options(self.kind, self.dim, self.ntotal, {**kept, **overrides})
        apply_search_options(self.cpu_index, self.kind, self.options)
        if self._search_index is not self.cpu_index:
            self.place(True, self.gpu_device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, row ids), each (n, k); faiss returns squared L2, we take the root.

        CPU IVF and HNSW batches are searched in locality order (``_locality_order``): the same
        answers, fewer cache misses."""
        local = self._search_index is self.cpu_index and self.kind in ("ivf", "hnsw")
        if local and len(queries) >= LOCALITY_MIN_QUERIES:
            sq, ids = self._search_in_locality_order(queries, int(k))
        else:
            sq, ids = self._search_index.search(queries, int(k))
        if np.any(ids < 0):
            raise RuntimeError(f"the {self.kind} index returned fewer than k={k} neighbours "
                               f"(index of {self.ntotal} entries; raise nprobe / ef_search)")
        np.maximum(sq, 0.0, out=sq)
        return np.sqrt(sq, out=sq), ids

    def _search_in_locality_order(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries sorted so that neighbours in latent space are searched one after the other: an
        MD rank's atoms come in space order, and each then pulls its own lists / graph nodes into
        cache. IVF: by the first probed list (the assignment is reused: ``search_preassigned``);
        HNSW: by the nearest of ``LOCALITY_PIVOTS`` entries, the order its nodes are stored in.
        Measured on Si latents, 4096 queries, one thread: IVF 1M +15 % (42-44k -> 50k q/s; 100k
        +4 %); HNSW 1M 28k -> 38k q/s sorting the queries, 49k also storing the nodes in order."""
        faiss = require_faiss()
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self.cpu_index)
            coarse_sq, coarse = ivf.quantizer.search(queries, ivf.nprobe)
            order = np.argsort(coarse[:, 0], kind="stable")
            found = ivf.search_preassigned(queries[order], k, coarse[order], coarse_sq[order])
        else:
            if self._pivots is None:
                self._pivots = hnsw_flat(self.cpu_index).storage.reconstruct_batch(_pivot_rows(self.ntotal))
            order = _locality_order(queries, self._pivots)
            found = self.cpu_index.search(queries[order], k)
        sq, ids = np.empty_like(found[0]), np.empty_like(found[1])
        sq[order], ids[order] = found
        return sq, ids


def _build_one(vectors: np.ndarray, kind: str, opts: dict, progress: bool, probe: "_RecallProbe",
               auto: bool) -> tuple[object, dict]:
    """The faiss index of one kind, filled; a tuned parameter set to reach the target recall."""
    faiss = require_faiss()
    n, dim = vectors.shape
    index = faiss.index_factory(dim, factory_string(kind, opts), faiss.METRIC_L2)
    if kind == "hnsw":  # answers row ids through an id map: its nodes are stored in locality order
        hnsw_graph(index).efConstruction = int(opts["ef_construction"])
        index = faiss.IndexIDMap(index)
    if kind in ("ivf", "ivfpq"):
        if n < opts["nlist"]:
            raise ConfigError(f"{kind} with nlist={opts['nlist']} needs at least that many entries, got {n}")
        index.train(vectors[_training_subset(n, opts["nlist"])])
    _add_in_chunks(index, vectors, progress, with_ids=kind == "hnsw")
    if kind == "hnsw":
        _store_in_locality_order(index, vectors)
    tuned = TUNED.get(kind)
    if tuned and (opts[tuned] is None or (auto and kind == "ivf")):
        opts = {**opts, **probe.tune(index, kind, opts)}
    return index, opts


def _race_hnsw(ivf: SearchIndex, vectors: np.ndarray, progress: bool, probe: "_RecallProbe") -> SearchIndex:
    """auto's choice between its tuned IVF and an HNSW graph tuned to the same recall on the
    reference atoms: the faster per CPU-second, HNSW only by ``HNSW_MARGIN``. Where latents fill
    a space of many dimensions evenly (one phase, rattled), IVF must probe many lists and HNSW is
    ~2x faster; on clustered training sets IVF is."""
    target = ivf.options["target_recall"]
    hnsw_opts = resolve_options("hnsw", vectors.shape[1], len(vectors),
                                {**AUTO_HNSW, "ef_search": None, "target_recall": target})
    hnsw_index, hnsw_opts = _build_one(vectors, "hnsw", hnsw_opts, progress, probe, True)
    hnsw = SearchIndex("hnsw", {**hnsw_opts, "auto": True}, hnsw_index)
    rates = {}
    for candidate in (ivf, hnsw):
        candidate.place(use_gpu=False)
        rates[candidate.kind] = probe.rate(candidate) if candidate.options["recall_at_10"] >= target else 0.0
    winner = hnsw if rates["hnsw"] > HNSW_MARGIN * rates["ivf"] else ivf
    winner.options = {**winner.options, "queries_per_cpu_s": {kind: round(rate) for kind, rate in rates.items()}}
    return winner


class _RecallProbe:
    """Queries with exact answers, for recall@10 at build time.

    Queries: up to ``RECALL_QUERIES`` of ``tuning_queries`` (held-out atoms: what MD will ask)
    when there are at least ``MIN_TUNING_QUERIES``. Otherwise rows of the data (fixed seed), each
    with its near-duplicates left out of both answers (``_held_out``): atoms of new structures lie
    farther from the index than a training atom from its MD near-duplicates, and plain
    leave-one-out overstated their recall (0.996 vs 0.88 on held-out atoms, Si latents replicated
    to 1M). That proxy is pessimistic where duplicates are many: on 100k replicated Si latents it
    asks nprobe 8 for 0.95, where held-out atoms reach 0.97 at nprobe 5 (1.4x faster). It needs
    searches wider than k, which only IVF answers unchanged (HNSW's k widens its beam): without
    reference atoms auto does not race HNSW.
    """

    def __init__(self, vectors: np.ndarray, tuning_queries: np.ndarray | None):
        n = vectors.shape[0]
        self.vectors, self.k, self.rows = vectors, min(RECALL_K, n - 1), None
        sample = np.random.default_rng(0)
        if self.k < 1:
            self.source = None
        elif tuning_queries is not None and len(tuning_queries) >= MIN_TUNING_QUERIES:
            picked = np.sort(sample.choice(len(tuning_queries), size=min(len(tuning_queries), RECALL_QUERIES),
                                           replace=False))
            self.queries, self.width, self.source = np.ascontiguousarray(tuning_queries[picked]), self.k, "reference"
        else:
            self.rows = np.sort(sample.choice(n, size=min(n, RECALL_QUERIES), replace=False))
            self.queries, self.source = np.ascontiguousarray(vectors[self.rows]), "training"
            self.width = min(n, self.k + 1 + MAX_NEAR_DUPLICATES)

    @functools.cached_property
    def _answers(self) -> tuple[np.ndarray, list]:
        """Exact ids (queries, k) and each query's left-out ids: an exact search over all entries,
        so only when a recall is asked for (flat, ivfpq and untuned HNSW builds never do)."""
        exact = require_faiss().knn(self.queries, self.vectors, self.width)
        if self.rows is None:
            return exact[1], [()] * len(self.queries)
        return _held_out(*exact, self.rows, self.k)

    def recall(self, index) -> tuple[float, float]:
        """recall@k over the queries, and its lower bound ``RECALL_Z`` standard errors down."""
        exact, left_out = self._answers
        found = _first_k_kept(index.search(self.queries, self.width)[1], left_out, self.k)
        per_query = (found[:, :, None] == exact[:, None, :]).any(axis=2).mean(axis=1)
        mean = float(per_query.mean())
        return mean, mean - RECALL_Z * float(per_query.std()) / math.sqrt(len(per_query))

    def rate(self, index: SearchIndex, rounds: int = 3) -> float:
        """Queries per CPU-second of ``index.search`` (one core's rate, whatever the thread count),
        best of ``rounds``."""
        best = 0.0
        for _ in range(rounds):
            start = time.process_time()
            index.search(self.queries, self.k)
            best = max(best, len(self.queries) / max(time.process_time() - start, 1e-9))
        return best

    def tune(self, index, kind: str, opts: dict) -> dict:
        """The smallest value of ``kind``'s tuned parameter whose recall reaches ``target_recall``
        with confidence (its lower bound does; or the given value's recall); recall grows with
        it: doubling, then bisection."""
        faiss = require_faiss()
        tuned = TUNED[kind]
        if self.source is None:
            return {tuned: opts[tuned] or 1}
        if kind == "hnsw" and self.source == "training":
            raise ConfigError(f"hnsw target_recall needs at least {MIN_TUNING_QUERIES} held-out reference atoms to tune "
                              "ef_search on (--reference-descriptors); or give ef_search")
        if kind == "ivf":
            ivf, top = faiss.extract_index_ivf(index), int(opts["nlist"])
            set_value = lambda value: setattr(ivf, "nprobe", value)  # noqa: E731
        else:
            hnsw, top = hnsw_graph(index), MAX_EF_SEARCH
            set_value = lambda value: setattr(hnsw, "efSearch", value)  # noqa: E731
        cache = {}

        def recall(value: int) -> tuple[float, float]:
            if value not in cache:
                set_value(value)
                cache[value] = self.recall(index)
            return cache[value]

        recorded = {"recall_queries": self.source}
        if opts[tuned] is not None:
            return {"recall_at_10": round(recall(int(opts[tuned]))[0], 4), **recorded}
        target = opts["target_recall"]
        reaches = lambda value: recall(value)[1] >= target  # noqa: E731
        # invariant: lo fails (nothing searched; HNSW's beam is never below k), hi not yet known to fail
        lo, hi = (0, 1) if kind == "ivf" else (self.k - 1, self.k)
        while hi < top and not reaches(hi):
            lo, hi = hi, min(2 * hi, top)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
        set_value(hi)
        return {tuned: hi, "recall_at_10": round(recall(hi)[0], 4), **recorded}


def _held_out(dist: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, list]:
    """Exact answers of sample rows as if they were new atoms: each row itself and the entries
    closer than ``NEAR_DUPLICATE_FACTOR`` x its nearest other entry are left out (at most the
    search width allows). Returns the (rows, k) exact ids and each row's left-out ids."""
    exact, left_out = np.empty((len(rows), k), dtype=np.int64), []
    for i, row in enumerate(rows):
        others = dist[i][ids[i] != row]
        radius_sq = (NEAR_DUPLICATE_FACTOR ** 2) * max(float(others[0]), 0.0) if others.size else 0.0
        n_out = min(max(int(np.count_nonzero(dist[i] < radius_sq)), 1), ids.shape[1] - k - 1)
        out = set(ids[i, :n_out].tolist()) | {int(row)}
        left_out.append(out)
        exact[i] = [j for j in ids[i].tolist() if j not in out][:k]
    return exact, left_out


def _first_k_kept(ids: np.ndarray, left_out: list, k: int) -> np.ndarray:
    """Each row's first k ids that are neither left out nor missing (-1); -1 pads a short row."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, row in enumerate(ids.tolist()):
        kept = [j for j in row if j >= 0 and j not in left_out[i]][:k]
        out[i, :len(kept)] = kept
    return out


def _training_subset(n: int, nlist: int) -> np.ndarray:
    """IVF k-means needs ~40-256 points per list; 64 keeps training fast, a fixed seed reproducible."""
    size = min(n, 64 * nlist)
    return np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))


def _add_in_chunks(index, vectors: np.ndarray, progress: bool, with_ids: bool = False,
                   chunk: int = CHUNK_ROWS) -> None:
    """Add the rows in their order (``with_ids``: their row numbers as explicit ids, for an id map)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(vectors), desc="building index", unit="vec", disable=not progress) as bar:
        for start in range(0, len(vectors), chunk):
            block = vectors[start:start + chunk]
            if with_ids:
                index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
            else:
                index.add(block)
            bar.update(len(block))


def _store_in_locality_order(id_map, vectors: np.ndarray) -> None:
    """Reorder a filled HNSW's nodes (vectors and links) by latent locality; the graph itself is
    unchanged, so are the answers. The graph is built in row order: inserting in locality order
    leaves too few long links (1M Si latents: recall never reached 0.95)."""
    order = _locality_order(vectors, vectors[_pivot_rows(len(vectors))]).astype(np.int64)
    hnsw_flat(id_map).permute_entries(order)
    require_faiss().copy_array_to_vector(order, id_map.id_map)  # node i is row order[i]


def hnsw_graph(index):
    """The ``faiss.HNSW`` of an HNSW-Flat index, bare or in the ``IndexIDMap`` that builds since
    the locality order wrap it in (earlier estimators hold the bare index)."""
    return hnsw_flat(index).hnsw


def hnsw_flat(index):
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _pivot_rows(n: int) -> np.ndarray:
    return np.linspace(0, n - 1, min(LOCALITY_PIVOTS, n)).astype(np.int64)


def _locality_order(vectors: np.ndarray, pivots: np.ndarray) -> np.ndarray:
    """Row order grouping the vectors by their nearest pivot (stable within a group)."""
    nearest = np.concatenate([require_faiss().knn(np.ascontiguousarray(vectors[start:start + CHUNK_ROWS]), pivots, 1)[1]
                              for start in range(0, len(vectors), CHUNK_ROWS)])
    return np.argsort(nearest[:, 0], kind="stable")
