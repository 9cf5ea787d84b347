"""Building a search index: which kind, filled how, tuned to what recall (build time only).

``build_index`` resolves ``auto`` (``resolve_kind``, ``auto_options``): exact below
``AUTO_EXACT_LIMIT`` entries, so small estimators keep exact answers, and IVF-Flat above: ``nlist``
from the size, ``nprobe`` the smallest that reaches ``AUTO_RECALL`` recall@10 against exact search
for held-out atoms: the estimator's reference (validation) atoms when it is given at least
``MIN_TUNING_QUERIES`` of them, else a fixed sample of the data taken as new atoms
(``RecallProbe``). With reference atoms, auto also builds an HNSW graph tuned to the same recall on
them and keeps the faster of the two (``_race_hnsw``). The recall, the queries it was measured on
and the raced speeds are recorded in the options (``recall_at_10``, ``recall_queries``,
``queries_per_cpu_s``; shown by ``ltau-lmp info``). HNSW nodes are stored in latent-locality order
behind an id map, the order ``SearchIndex.search`` sorts its queries in.

Measured (``benchmarks/knn_index.py``, doc/validation/knn_index.json; Si, 3BPA, GAP-20 latents
replicated with noise, held-out queries, one thread): auto's IVF answers 104-132k queries/s at
100k entries and 21-55k at 1M, recall@10 0.95-0.97, 40-50x faster than exact at 100k. IVF with
SQ8 / SQ4 / fast-scan PQ codes refined exactly was no faster at recall 0.95 in 32 dimensions:
near-duplicate MD atoms differ by less than the quantisation error, so the exact refinement
must re-rank hundreds.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.histogram import CHUNK_ROWS
from ltau_lmp.estimator.index import (DEFAULT_KIND, INDEX_KINDS, KIND_CHOICES, RECORDED, SEARCH_PARAMETERS, TUNED,
                                      SearchIndex, gpu_available, hnsw_flat, locality_order, pivot_rows,
                                      require_faiss, resolve_options, set_search_parameter)

AUTO_EXACT_LIMIT = 20_000  # below: flat, exact and still >= ~20k queries/s per core
AUTO_RECALL = 0.95  # recall@10 auto's nprobe (ef_search) must reach on the build-time queries (``RecallProbe``)
AUTO_HNSW_QUANTIZER_NLIST = 16_384  # from here an HNSW over the centroids: below, the batched flat scan (BLAS)
# is faster (4096 lists, 1M Si latents: 42.7k vs 36.7k queries/s at the same nprobe; 8192: equal)
RECALL_K = 10
RECALL_QUERIES = 1000  # queries for the build-time recall: ~±0.005, a few s of exact search at 1M
MIN_TUNING_QUERIES = 200  # fewer reference atoms than this: tune on the training sample instead
RECALL_Z = 2.0  # the tuned recall's lower bound, in standard errors over the queries, must reach the target:
# 3BPA 100k tuned on 675 reference atoms to 0.956 (nprobe 4) gave 0.940 on the other held-out half
NEAR_DUPLICATE_FACTOR = 2.0  # entries closer than this x a sample row's nearest one are its near-duplicates
MAX_NEAR_DUPLICATES = 256  # at most that many left out per sample row (bounds the searches' k)
AUTO_HNSW = {"M": 16, "ef_construction": 40}  # auto's HNSW candidate: M 16 beat M 32 at equal recall (Si latents)
HNSW_MARGIN = 1.2  # auto takes HNSW over IVF only when this much faster (IVF: faster build, GPU-capable)
MAX_EF_SEARCH = 1024


def build_index(vectors: np.ndarray, kind: str = DEFAULT_KIND, options: dict | None = None,
                use_gpu: bool | str = "auto", gpu_device: int = 0, progress: bool = False,
                tuning_queries: np.ndarray | None = None) -> SearchIndex:
    """A ``SearchIndex`` over (n, d) float32 vectors; entries keep their row number as id.

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
    probe = RecallProbe(vectors, tuning_queries)
    index, opts = _build_one(vectors, kind, opts, progress, probe, auto)
    search_index = SearchIndex(kind, opts, index)
    want_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
    if auto and kind == "ivf" and not options and probe.source == "reference" and not want_gpu:
        search_index = _race_hnsw(search_index, vectors, progress, probe)
    search_index.place(use_gpu, gpu_device)
    return search_index


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


def factory_string(kind: str, opts: dict) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{int(opts['M'])},Flat"
    if kind == "ivf":
        quantizer = "_HNSW32" if opts["quantizer"] == "hnsw" else ""
        return f"IVF{int(opts['nlist'])}{quantizer},Flat"
    return f"IVF{int(opts['nlist'])},PQ{int(opts['pq_m'])}x{int(opts['nbits'])}"


def _build_one(vectors: np.ndarray, kind: str, opts: dict, progress: bool, probe: "RecallProbe",
               auto: bool) -> tuple[object, dict]:
    """The faiss index of one kind, filled; a tuned parameter set to reach the target recall."""
    faiss = require_faiss()
    n, dim = vectors.shape
    index = faiss.index_factory(dim, factory_string(kind, opts), faiss.METRIC_L2)
    if kind == "hnsw":  # answers row ids through an id map: its nodes are stored in locality order
        hnsw_flat(index).hnsw.efConstruction = int(opts["ef_construction"])
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


def _race_hnsw(ivf: SearchIndex, vectors: np.ndarray, progress: bool, probe: "RecallProbe") -> SearchIndex:
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


class RecallProbe:
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
        tuned = TUNED[kind]
        if self.source is None:
            return {tuned: opts[tuned] or 1}
        if kind == "hnsw" and self.source == "training":
            raise ConfigError(f"hnsw target_recall needs at least {MIN_TUNING_QUERIES} held-out reference atoms to tune "
                              "ef_search on (--reference-descriptors); or give ef_search")
        top = int(opts["nlist"]) if kind == "ivf" else MAX_EF_SEARCH
        parameter = SEARCH_PARAMETERS[kind][1]
        cache = {}

        def recall(value: int) -> tuple[float, float]:
            if value not in cache:
                set_search_parameter(index, parameter, value)
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
        set_search_parameter(index, parameter, hi)
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
    order = locality_order(vectors, vectors[pivot_rows(len(vectors))]).astype(np.int64)
    hnsw_flat(id_map).permute_entries(order)
    require_faiss().copy_array_to_vector(order, id_map.id_map)  # node i is row order[i]
