"""Building a search index: which kind, filled how, tuned to what recall (build time only).

``build_index(kind="auto")`` races candidates on held-out atoms and keeps the fastest that
reaches its recall target, saying why (``choice`` in the options, shown by ``ltau-lmp info``):

* Held-out atoms (``RecallProbe``): the estimator's reference (validation) atoms when there are at
  least ``MIN_TUNING_QUERIES``, else whole training structures left out (``structures``: the
  structure of each row): the candidates are filled without them, tuned on them, and then given
  them. Without either, auto keeps exact search below ``SMALL_LIMIT`` entries and refuses above
  it (an approximate index tuned on nothing could be anything).
* Below ``SMALL_LIMIT`` entries: an IVF (and an HNSW graph) tuned to ``SMALL_RECALL`` replaces
  exact search only when ``SMALL_SPEEDUP`` times faster on the held-out atoms; above: IVF tuned to
  ``AUTO_RECALL`` (HNSW when ``HNSW_MARGIN`` faster), exact search is not a candidate.
* From ``PCA_MIN_DIM`` dimensions (MACE: 256) auto's IVF keeps the first ``pca`` principal
  components in its lists (16-64, the fewest holding ``PCA_VARIANCE`` of the variance) and
  re-ranks ``k_factor`` x k candidates with the exact vectors; its lists' k-means runs in that
  space, so a 1M x 256 build is minutes, not tens of minutes.
* Tuning stops at a cost ceiling (IVF: ``MAX_SCAN_FRACTION`` of the lists; HNSW: ``MAX_EF_SEARCH``):
  a target not reached there is stated in ``choice`` and warned about, never silently searched
  exhaustively.

Recall@10 counts a returned neighbour when it is at most as far as the exact 10th neighbour
(distances recomputed in float64: among near-duplicates whose distances tie in float32, any
is as good as another). Measured (``benchmarks/knn_index.py``, doc/validation/knn_index.json).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.histogram import CHUNK_ROWS
from ltau_lmp.estimator.index import (DEFAULT_KIND, KIND_CHOICES, RECORDED, SEARCH_PARAMETERS, TUNED,
                                      SearchIndex, find_refine, gpu_available, pivot_rows, require_faiss,
                                      resolve_options, set_search_parameter, transform, unwrap)

SMALL_LIMIT = 100_000  # below: exact search stays unless an index beats it by SMALL_SPEEDUP at SMALL_RECALL
SMALL_RECALL = 0.99
SMALL_SPEEDUP = 2.0
AUTO_RECALL = 0.95  # recall@10 auto's nprobe (ef_search) must reach above SMALL_LIMIT
AUTO_HNSW_QUANTIZER_NLIST = 16_384  # from here an HNSW over the centroids: below, the batched flat scan (BLAS)
# is faster (4096 lists, 1M Si latents: 42.7k vs 36.7k queries/s at the same nprobe; 8192: equal)
PCA_MIN_DIM = 128  # from here auto's IVF stores principal components and re-ranks exactly
PCA_DIMS = (16, 32, 64)  # the fewest of these holding PCA_VARIANCE of the variance (none: no PCA)
PCA_VARIANCE = 0.999
PCA_SAMPLE = 20_000
RECALL_K = 10
RECALL_QUERIES = 1000  # queries for the build-time recall: ~±0.005
MIN_TUNING_QUERIES = 200  # fewer held-out atoms than this: no tuning
RECALL_Z = 2.0  # the tuned recall's lower bound, in standard errors over the queries, must reach the target:
# 3BPA 100k tuned on 675 reference atoms to 0.956 (nprobe 4) gave 0.940 on the other held-out half
TIE_TOLERANCE = 1e-5  # relative, on squared distances: a neighbour this close to the exact 10th counts
HELD_OUT_ATOMS = 2000  # held-out structures: whole structures until this many atoms ...
HELD_OUT_FRACTION = 0.1  # ... but not more than this share of the rows (at least one structure)
MAX_SCAN_FRACTION = 0.1  # auto's cost ceiling: nprobe scans at most this share of the lists
MAX_EF_SEARCH = 1024
K_FACTORS = (2, 4, 8, 16, 32)  # re-ranked candidates per neighbour an IVF over principal components may use
AUTO_HNSW = {"M": 16, "ef_construction": 40}  # auto's HNSW candidate: M 16 beat M 32 at equal recall (Si latents)
HNSW_MARGIN = 1.2  # auto takes HNSW over IVF only when this much faster (IVF: faster build, GPU-capable)
MAX_AUTO_NLIST = 16_384  # more lists: k-means time grows with lists x points (10M rows: 4x longer for 65k lists)
KMEANS_POINTS_PER_LIST = 32  # IVF k-means sample and iterations: a 16,384-list quantizer in ~1 min
KMEANS_ITERATIONS = 10
EXACT_CHUNK = 262_144  # rows per block of the exact search that answers the held-out atoms
NO_HELD_OUT = ("index auto: {n:,} entries need an approximate index, and it is tuned on held-out atoms: give the "
               "latents of held-out (validation) structures (reference_descriptors, --reference-descriptors), or "
               "the structure of each training atom (structures, --train-set) so that whole structures are held "
               "out; or choose index flat (exact) or ivf with a given nprobe")


def build_index(vectors: np.ndarray, kind: str = DEFAULT_KIND, options: dict | None = None,
                use_gpu: bool | str = "auto", gpu_device: int = 0, progress: bool = False,
                tuning_queries: np.ndarray | None = None, structures: np.ndarray | None = None) -> SearchIndex:
    """A ``SearchIndex`` over (n, d) float32 vectors; entries keep their row number as id.

    ``auto`` races candidates and records its choice (module docstring). ``tuning_queries``:
    held-out atoms (not among ``vectors``) to tune and measure recall on; ``structures``: (n,)
    structure id of each row, for holding out whole structures when there are no such atoms.
    """
    n, dim = vectors.shape
    given = set(options or {}) & set(RECORDED)
    if given:
        raise ConfigError(f"index option(s) {', '.join(sorted(given))} are recorded by the build, not inputs")
    if kind not in KIND_CHOICES:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    probe = RecallProbe(vectors, tuning_queries, structures, progress)
    if kind == "auto":
        want_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        index = _auto(vectors, dict(options or {}), probe, want_gpu, progress)
    else:
        opts = resolve_options(kind, dim, n, options)
        tuned = TUNED.get(kind)
        if tuned and opts[tuned] is None and probe.source is None:
            raise ConfigError(f"{kind} target_recall is tuned on at least {MIN_TUNING_QUERIES} held-out atoms: give "
                              f"reference descriptors (--reference-descriptors) or the training structures "
                              f"(--train-set); or give {tuned}")
        index, _ = _build_one(vectors, kind, opts, probe, progress, ceiling=False)
    index.place(use_gpu, gpu_device)
    return index


def auto_ivf_options(vectors: np.ndarray, options: dict, target: float) -> dict:
    """``options`` over auto's IVF: nlist ≈ 4√n as a power of two (16√n with PCA, whose lists are
    cheap to scan: 1M x 256 MACE latents, 16,384 lists 24k queries/s at recall 0.98, 4,096 13k at
    0.95; at most ``MAX_AUTO_NLIST``), an HNSW quantizer from ``AUTO_HNSW_QUANTIZER_NLIST`` lists, PCA from ``PCA_MIN_DIM``
    dimensions, nprobe tuned to ``target`` unless given."""
    n, dim = vectors.shape
    pca = options.get("pca", _pca_dims(vectors) if dim >= PCA_MIN_DIM else None)
    nlist = min(2 ** round(math.log2((16 if pca else 4) * math.sqrt(n))), MAX_AUTO_NLIST,
                max(1, n // KMEANS_POINTS_PER_LIST))
    tuned = {} if options.get("nprobe") is not None else {"nprobe": None, "target_recall": target}
    return {"nlist": nlist, "quantizer": "hnsw" if nlist >= AUTO_HNSW_QUANTIZER_NLIST else "flat", "pca": pca,
            **tuned, **options}


def _pca_dims(vectors: np.ndarray) -> int | None:
    """The fewest of ``PCA_DIMS`` principal components holding ``PCA_VARIANCE`` of a sample's variance."""
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), min(len(vectors), PCA_SAMPLE), replace=False))
    sample = vectors[rows].astype(np.float64)
    eigenvalues = np.linalg.eigvalsh(np.cov(sample, rowvar=False))[::-1]
    captured = np.cumsum(eigenvalues) / max(eigenvalues.sum(), 1e-300)
    return next((m for m in PCA_DIMS if m < vectors.shape[1] and captured[m - 1] >= PCA_VARIANCE), None)


def _auto(vectors: np.ndarray, options: dict, probe: "RecallProbe", want_gpu: bool, progress: bool) -> SearchIndex:
    n, dim = vectors.shape
    small = n < SMALL_LIMIT
    target = SMALL_RECALL if small else AUTO_RECALL
    ivf_options = resolve_options("ivf", dim, n, auto_ivf_options(vectors, options, target))
    if probe.source is None:
        if small and not options:
            flat, _ = _build_one(vectors, "flat", {}, probe, progress)
            return _record(flat, {}, f"flat (exact): {n:,} entries and no held-out atoms to tune an approximate "
                                     f"index on")
        if options.get("nprobe") is None:
            raise ConfigError(NO_HELD_OUT.format(n=n))
        ivf, _ = _build_one(vectors, "ivf", ivf_options, probe, progress)
        return _record(ivf, {}, f"ivf with the given nprobe {ivf.options['nprobe']}: recall not measured "
                                f"(no held-out atoms)")
    candidates = [_build_one(vectors, "ivf", ivf_options, probe, progress, ceiling=True)]
    if not options and not want_gpu and ivf_options["pca"] is None:  # faiss has no GPU HNSW
        hnsw_options = resolve_options("hnsw", dim, n, {**AUTO_HNSW, "ef_search": None, "target_recall": target})
        candidates.append(_build_one(vectors, "hnsw", hnsw_options, probe, progress, ceiling=True))
    rates = {index.kind: probe.rate(index) for index, _ in candidates}
    reached = [index for index, ok in candidates if ok]
    if len(reached) == 2:
        ivf, hnsw = reached
        best = hnsw if rates["hnsw"] > HNSW_MARGIN * rates["ivf"] else ivf
    elif reached:
        best = reached[0]
    else:
        best = max((index for index, _ in candidates), key=lambda index: index.options["recall_at_10"])
    tuned = TUNED[best.kind]
    what = (f"{best.kind} {tuned} {best.options[tuned]}: recall@10 {best.options['recall_at_10']:.3f} on "
            f"{probe.description} (target {target}), {rates[best.kind]:,.0f} queries/CPU-s")
    missed = [index.kind for index, ok in candidates if not ok and index is not best]
    if missed:
        what += f" ({' and '.join(missed)} did not reach the target within the cost ceiling)"
    if small and not options:
        flat, _ = _build_one(vectors, "flat", {}, probe, progress)
        rates["flat"] = probe.rate(flat)
        speedup = rates[best.kind] / rates["flat"]
        if best not in reached or speedup < SMALL_SPEEDUP:
            return _record(flat, rates, f"flat (exact): the best approximate index, {what}, is {speedup:.1f}x "
                                        f"exact search; auto needs recall {target} at {SMALL_SPEEDUP:g}x")
        what += f", {speedup:.1f}x exact search"
    if best not in reached:
        ceiling = (f"{math.ceil(MAX_SCAN_FRACTION * 100)} % of the lists" if best.kind == "ivf"
                   else f"ef_search {MAX_EF_SEARCH}")
        what += (f"; the target was not reached within the cost ceiling ({ceiling}): results are approximate at "
                 f"this recall (index flat is exact, at the cost of a full scan per query)")
        warnings.warn(f"index auto: {what}", stacklevel=3)
    return _record(best, rates, what)


def _record(index: SearchIndex, rates: dict, choice: str) -> SearchIndex:
    index.options = {**index.options, "auto": True, "choice": choice,
                     **({"queries_per_cpu_s": {kind: round(rate) for kind, rate in rates.items()}} if rates else {})}
    return index


def _empty_index(kind: str, opts: dict, dim: int):
    """The faiss index of ``kind``, centred (module docstring of ``index``) and wrapped so that
    entries can be added with their row ids."""
    faiss = require_faiss()
    centre = faiss.CenteringTransform(dim)
    if kind == "flat":
        return faiss.IndexPreTransform(centre, faiss.IndexFlatL2(dim))
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, int(opts["M"]))
        graph.hnsw.efConstruction = int(opts["ef_construction"])
        return faiss.IndexIDMap(faiss.IndexPreTransform(centre, graph))
    if kind == "ivfpq":
        return faiss.IndexPreTransform(centre, faiss.index_factory(
            dim, f"IVF{int(opts['nlist'])},PQ{int(opts['pq_m'])}x{int(opts['nbits'])}"))
    quantizer = "_HNSW32" if opts["quantizer"] == "hnsw" else ""
    lists_dim = opts["pca"] or dim
    ivf = faiss.index_factory(lists_dim, f"IVF{int(opts['nlist'])}{quantizer},Flat")
    if not opts["pca"]:
        return faiss.IndexPreTransform(centre, ivf)
    reduced = faiss.IndexPreTransform(faiss.PCAMatrix(dim, int(opts["pca"])), ivf)
    refine = faiss.IndexRefineFlat(reduced)
    refine.k_factor = float(opts["k_factor"])
    return faiss.IndexIDMap(refine)


def _build_one(vectors: np.ndarray, kind: str, opts: dict, probe: "RecallProbe", progress: bool,
               ceiling: bool = False) -> tuple[SearchIndex, bool]:
    """One index, filled; its tuned parameter set to reach the target recall (up to the cost
    ceiling with ``ceiling``), measured when given. Returns it and whether the target was reached.

    Held-out structures (``probe.held``) are added only after tuning: the recall is that of atoms
    of structures the index did not contain, as MD's atoms will be."""
    faiss = require_faiss()
    n, dim = vectors.shape
    index = _empty_index(kind, opts, dim)
    kept = None if kind == "flat" else probe.held_mask
    if kind in ("ivf", "ivfpq") and n < opts["nlist"]:
        raise ConfigError(f"{kind} with nlist={opts['nlist']} needs at least that many entries, got {n}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.min_points_per_centroid, ivf.cp.max_points_per_centroid = 1, KMEANS_POINTS_PER_LIST
    sample = _training_sample(n, opts.get("nlist") or 0, kept)
    with _phase(f"training {kind} ({len(sample):,} vectors)", 1, progress) as bar:
        index.train(vectors[sample])
        bar.update(1)
    _reserve_flat_storage(index, kind, n)
    _add_rows(index, vectors, kept, progress, with_ids=kind != "flat", desc=f"filling {kind}")
    reached = True
    tuned = TUNED.get(kind)
    if tuned and probe.source is not None:
        updates, reached = probe.tune(index, kind, opts, ceiling)
        opts = {**opts, **updates}
    if kept is not None:
        _add_rows(index, vectors, ~kept, progress, with_ids=True, desc="adding the held-out structures")
    if kind == "hnsw":
        _store_in_locality_order(index, vectors)
    return SearchIndex(kind, opts, index), reached


class RecallProbe:
    """Held-out queries with exact answers, for recall@10 at build time.

    Queries: up to ``RECALL_QUERIES`` of ``tuning_queries`` (held-out atoms: what MD will ask)
    when there are at least ``MIN_TUNING_QUERIES``; else atoms of whole training structures held
    out (``held_mask``: the rows kept while tuning), chosen at random (fixed seed) up to
    ``HELD_OUT_ATOMS`` atoms and ``HELD_OUT_FRACTION`` of the rows; else none (``source`` None).
    """

    def __init__(self, vectors: np.ndarray, tuning_queries: np.ndarray | None, structures: np.ndarray | None,
                 progress: bool = False):
        n = vectors.shape[0]
        self.vectors, self.k, self.progress = vectors, min(RECALL_K, n - 1), progress
        self.source, self.held_mask, self.description = None, None, "no held-out atoms"
        sample = np.random.default_rng(0)
        if self.k < 1:
            return
        if tuning_queries is not None and len(tuning_queries) >= MIN_TUNING_QUERIES:
            picked = np.sort(sample.choice(len(tuning_queries), size=min(len(tuning_queries), RECALL_QUERIES),
                                           replace=False))
            self.queries, self.source = np.ascontiguousarray(tuning_queries[picked]), "reference"
            self.description = f"{len(picked):,} reference atoms"
        elif structures is not None:
            held, n_structures = held_out_structures(structures, n)
            if held.sum() >= MIN_TUNING_QUERIES:
                rows = np.flatnonzero(held)
                picked = np.sort(sample.choice(rows, size=min(len(rows), RECALL_QUERIES), replace=False))
                self.queries, self.source, self.held_mask = np.ascontiguousarray(vectors[picked]), "held-out structures", ~held
                self.description = (f"{len(picked):,} atoms of {n_structures} held-out training structure"
                                    f"{'' if n_structures == 1 else 's'}")

    def _exact(self) -> np.ndarray:
        """Squared distance of each query's exact k-th neighbour (float64), among the rows kept."""
        if not hasattr(self, "_kth"):
            faiss = require_faiss()
            n = self.vectors.shape[0]
            centre = self.vectors[pivot_rows(n)].mean(axis=0, dtype=np.float64).astype(np.float32)
            queries = self.queries - centre
            best_sq = np.full((len(queries), self.k), np.inf, dtype=np.float32)
            best_ids = np.full((len(queries), self.k), -1, dtype=np.int64)
            with _phase("exact neighbours of the held-out atoms", n, self.progress) as bar:
                for start in range(0, n, EXACT_CHUNK):
                    rows = np.arange(start, min(n, start + EXACT_CHUNK))
                    if self.held_mask is not None:
                        rows = rows[self.held_mask[start:start + EXACT_CHUNK]]
                    if len(rows):
                        block = (self.vectors[rows] if len(rows) < EXACT_CHUNK else self.vectors[start:start + len(rows)])
                        sq, ids = faiss.knn(queries, block - centre, min(self.k, len(rows)))
                        merged_sq, merged_ids = np.hstack([best_sq, sq]), np.hstack([best_ids, rows[ids]])
                        keep = np.argsort(merged_sq, axis=1, kind="stable")[:, :self.k]
                        best_sq = np.take_along_axis(merged_sq, keep, axis=1)
                        best_ids = np.take_along_axis(merged_ids, keep, axis=1)
                    bar.update(min(n, start + EXACT_CHUNK) - start)
            self._kth = self._squared_distances(best_ids).max(axis=1)
        return self._kth

    def _squared_distances(self, ids: np.ndarray) -> np.ndarray:
        """Float64 squared distances from each query to the rows ``ids`` (-1: infinite)."""
        rows = self.vectors[np.maximum(ids, 0)].astype(np.float64)
        sq = ((rows - self.queries[:, None, :].astype(np.float64)) ** 2).sum(axis=2)
        return np.where(ids >= 0, sq, np.inf)

    def recall(self, index) -> tuple[float, float]:
        """recall@k over the queries (a neighbour counts when not farther than the exact k-th, ties
        included), and its lower bound ``RECALL_Z`` standard errors down."""
        kth = self._exact()
        found = index.search(self.queries, self.k)[1]
        per_query = (self._squared_distances(found) <= kth[:, None] * (1 + TIE_TOLERANCE)).mean(axis=1)
        mean = float(per_query.mean())
        return mean, mean - RECALL_Z * float(per_query.std()) / math.sqrt(len(per_query))

    def rate(self, index: SearchIndex, rounds: int = 3) -> float:
        """Queries per CPU-second of ``index.search`` (one core's rate, whatever the thread count),
        best of ``rounds``."""
        index.place(use_gpu=False)
        best = 0.0
        for _ in range(rounds):
            start = time.process_time()
            index.search(self.queries, self.k)
            best = max(best, len(self.queries) / max(time.process_time() - start, 1e-9))
        return best

    def tune(self, index, kind: str, opts: dict, ceiling: bool) -> tuple[dict, bool]:
        """The smallest value of ``kind``'s tuned parameter whose recall reaches ``target_recall``
        with confidence (its lower bound does), up to ``ceiling_value`` with ``ceiling`` (else
        up to exhaustive); or the given value's recall. Recall grows with it: doubling, then
        bisection. An IVF over principal components first raises its re-ranking ``k_factor``
        (``K_FACTORS``) until the ceiling's nprobe reaches the target: near-duplicates differ in
        the components it dropped (10M x 256 MACE latents: 0.90 at k_factor 2 whatever nprobe).
        Returns the recorded options and whether the target was reached."""
        tuned = TUNED[kind]
        parameter = SEARCH_PARAMETERS[kind][1]
        cache = {}

        def recall(value: int) -> tuple[float, float]:
            if value not in cache:
                set_search_parameter(index, parameter, value)
                cache[value] = self.recall(index)
            return cache[value]

        recorded = {"recall_queries": self.source}
        if opts[tuned] is not None:
            mean = recall(int(opts[tuned]))[0]
            target = opts.get("target_recall")
            return {"recall_at_10": round(mean, 4), **recorded}, target is None or mean >= target
        target = opts["target_recall"]
        top = ceiling_value(kind, opts) if ceiling else (int(opts["nlist"]) if kind == "ivf" else MAX_EF_SEARCH)
        reaches = lambda value: recall(value)[1] >= target  # noqa: E731
        refine = find_refine(index)
        if refine is not None:  # re-ranking more candidates, where probing more lists cannot reach it
            recorded["k_factor"] = opts["k_factor"]
            for factor in (f for f in K_FACTORS if f >= opts["k_factor"]):
                refine.k_factor, recorded["k_factor"] = float(factor), factor
                cache.clear()
                if reaches(top):
                    break
        # invariant: lo fails (nothing searched; HNSW's beam is never below k), hi not yet known to fail
        lo, hi = (0, 1) if kind == "ivf" else (self.k - 1, self.k)
        with _phase(f"tuning {tuned} on {self.description}", None, self.progress) as bar:
            while hi < top and not reaches(hi):
                lo, hi = hi, min(2 * hi, top)
                bar.update(1)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
                bar.update(1)
        set_search_parameter(index, parameter, hi)
        return {tuned: hi, "recall_at_10": round(recall(hi)[0], 4), **recorded}, reaches(hi)


def ceiling_value(kind: str, opts: dict) -> int:
    """The largest nprobe (ef_search) auto tunes to: ``MAX_SCAN_FRACTION`` of the lists (``MAX_EF_SEARCH``)."""
    if kind == "ivf":
        return max(1, math.ceil(MAX_SCAN_FRACTION * int(opts["nlist"])))
    return MAX_EF_SEARCH


def held_out_structures(structures: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """(n,) mask of the rows of the structures held out for tuning, and how many structures: whole
    structures in a fixed random order until ``HELD_OUT_ATOMS`` atoms, within ``HELD_OUT_FRACTION``
    of the rows (at least one, never all)."""
    structures = np.asarray(structures)
    if structures.shape != (n,):
        raise ConfigError(f"structures must give one structure id per descriptor row ({n}), got shape "
                          f"{structures.shape}")
    ids, sizes = np.unique(structures, return_counts=True)
    held, total = [], 0
    for i in np.random.default_rng(0).permutation(len(ids))[:len(ids) - 1]:
        if held and (total >= HELD_OUT_ATOMS or total + sizes[i] > HELD_OUT_FRACTION * n):
            break
        held.append(ids[i])
        total += sizes[i]
    return np.isin(structures, held), len(held)


def _training_sample(n: int, nlist: int, kept: np.ndarray | None) -> np.ndarray:
    """Rows to train on (fixed seed): ``KMEANS_POINTS_PER_LIST`` per IVF list (at least
    ``PCA_SAMPLE`` for the PCA and the centre), among the kept rows."""
    rows = np.arange(n) if kept is None else np.flatnonzero(kept)
    size = min(len(rows), max(KMEANS_POINTS_PER_LIST * nlist, PCA_SAMPLE))
    return np.sort(np.random.default_rng(0).choice(rows, size=size, replace=False))


def _add_rows(index, vectors: np.ndarray, mask: np.ndarray | None, progress: bool, with_ids: bool,
              desc: str) -> None:
    """Add the rows (those of ``mask`` when given) in their order, with their row numbers as ids."""
    n = len(vectors)
    with _phase(desc, n if mask is None else int(mask.sum()), progress) as bar:
        for start in range(0, n, CHUNK_ROWS):
            rows = np.arange(start, min(n, start + CHUNK_ROWS))
            if mask is not None:
                rows = rows[mask[start:start + CHUNK_ROWS]]
            if not len(rows):
                continue
            block = vectors[start:start + len(rows)] if mask is None else vectors[rows]
            if with_ids:
                index.add_with_ids(block, rows.astype(np.int64))
            else:
                index.add(block)
            bar.update(len(rows))


def _reserve_flat_storage(index, kind: str, n: int) -> None:
    """Size the exact vectors' storage (flat, HNSW's, the re-ranking copy) for all ``n`` rows before
    filling: grown chunk by chunk, its last reallocation held old and new copies at once (10M x
    256: 17.6 GB peak for 10 GB of vectors)."""
    faiss = require_faiss()
    refine = find_refine(index)
    storage = refine.refine_index if refine is not None else (unwrap(index)[1] if kind in ("flat", "hnsw") else None)
    if kind == "hnsw":
        storage = storage.storage
    if storage is not None:
        codes = faiss.downcast_index(storage).codes
        codes.resize(n * faiss.downcast_index(storage).code_size)  # capacity for n rows, kept when emptied
        codes.resize(0)


def _store_in_locality_order(id_map, vectors: np.ndarray) -> None:
    """Reorder a filled HNSW's nodes (vectors and links) by latent locality; the graph itself is
    unchanged, so are the answers. The graph is built in row order: inserting in locality order
    leaves too few long links (1M Si latents: recall never reached 0.95)."""
    faiss = require_faiss()
    chain, graph = unwrap(id_map)
    rows = faiss.vector_to_array(id_map.id_map)  # node i holds row rows[i]
    pivots = graph.storage.reconstruct_batch(pivot_rows(len(rows)))
    nearest = np.concatenate([faiss.knn(transform(chain, vectors[rows[start:start + CHUNK_ROWS]]), pivots, 1)[1][:, 0]
                              for start in range(0, len(rows), CHUNK_ROWS)])
    order = np.argsort(nearest, kind="stable").astype(np.int64)
    graph.permute_entries(order)
    faiss.copy_array_to_vector(rows[order], id_map.id_map)


def _phase(desc: str, total: int | None, progress: bool):
    """One progress bar per build phase (tqdm; silent unless ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec" if total and total > 1 else "step", disable=not progress,
                leave=False)
