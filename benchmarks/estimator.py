"""Estimator benchmark: build time + peak memory per backend, query throughput, recall, the PDF
table against a dense one (bytes, mixing time), log updates.

    python benchmarks/estimator.py                 # 1M entries x 32 dims x 100 bins (paper-scale)
    python benchmarks/estimator.py --entries 200000 --queries 20000

Synthetic clustered latent vectors (a mixture of Gaussians, like a trained model's latent
space). Each backend is built in a fresh subprocess so its peak resident memory is its own.
Throughputs of one run are compared side by side; the machine is shared, so read ratios,
not absolute figures, across runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

KINDS = ("flat", "hnsw", "ivfpq")


def clustered(n: int, dim: int, seed: int, n_clusters: int = 256, intrinsic_dim: int = 8) -> np.ndarray:
    """Gaussian clusters on an ``intrinsic_dim``-dimensional subspace of R^dim plus small noise.

    Real latent spaces are low-dimensional: the 3BPA NequIP descriptors in tests/data need
    4 principal components for 96 % of their variance. Isotropic 32-D noise would instead make
    every point nearly equidistant and no approximate index could reach useful recall.
    """
    rng = np.random.default_rng(1234)  # same embedding for index and queries
    basis = np.linalg.qr(rng.normal(size=(dim, intrinsic_dim)))[0].T.astype(np.float32)
    centers = rng.normal(scale=4.0, size=(n_clusters, intrinsic_dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, n)
    low = rng.standard_normal((n, intrinsic_dim), dtype=np.float32)
    low += centers[labels]
    out = low @ basis
    out += rng.normal(scale=0.05, size=(n, dim)).astype(np.float32)
    return out


def synthetic_pdfs(n: int, nbins: int, seed: int) -> np.ndarray:
    """Error histograms like real ones (si_cell.epoch_histograms: 100 epochs' errors around each
    entry's median, median log-uniform over bins 20-80 of 1e-3..10), built in blocks."""
    from si_cell import epoch_histograms

    rng = np.random.default_rng(seed)
    edges = np.logspace(-3, 1, nbins + 1)
    out = np.empty((n, nbins), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        median = 10.0 ** (-3 + 4 * rng.uniform(20, 80, (stop - start, 1)) / nbins)
        out[start:stop] = epoch_histograms(rng, median, edges)
    return out


def peak_rss_mb() -> float:
    """VmHWM of this process (resettable, unlike getrusage's ru_maxrss)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def child_build(kind: str, n: int, dim: int, nbins: int, queries: int, out_dir: str) -> dict:
    """Runs in its own process: build one estimator, save it, report time and peak memory."""
    from ltau_lmp.estimator import LTAUEstimator

    vectors, pdfs = clustered(n, dim, seed=0), synthetic_pdfs(n, nbins, seed=1)
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    base_mb = peak_rss_mb()
    t0 = time.perf_counter()
    est = LTAUEstimator.build(vectors, pdfs, np.logspace(-3, 1, nbins + 1), index=kind, threads=2, progress=True)
    build_s = time.perf_counter() - t0
    est.save(f"{out_dir}/{kind}", overwrite=True)  # the previous benchmark run's estimator
    return {"kind": kind, "build_s": build_s, "peak_rss_mb": peak_rss_mb(),
            "inputs_mb": base_mb, "rss_over_inputs_mb": peak_rss_mb() - base_mb}


def throughput(est, queries: np.ndarray, threads: int, with_interval: bool, repeats: int = 3) -> float:
    """Points/s of ``query`` (kNN search, expected error, distance), optionally plus the CI."""
    from ltau_lmp.estimator.index import set_threads

    set_threads(threads)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = est.query(queries)
        if with_interval:
            res.interval(0.05, 0.95)  # what fix ltau computes per atom, too
        best = max(best, len(queries) / (time.perf_counter() - t0))
    return best


def recall_at_10(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))


def pdf_table_comparison(est, pdfs: np.ndarray, queries: np.ndarray, k: int = 10, repeats: int = 5) -> None:
    """Bytes and mixing time (4096 queries x k) of the PDF table against the dense float32 table that
    version-1 estimators held (its product, ``DensePDFTable``), side by side, interleaved."""
    from ltau_lmp.estimator.pdf_table import DensePDFTable

    dense = DensePDFTable(pdfs)
    res = est.query(queries[:4096], k=k)
    best = {"dense": float("inf"), "table": float("inf")}
    for _ in range(repeats):
        for name, table in (("dense", dense), ("table", est.pdfs)):
            t0 = time.perf_counter()
            table.mix(res.neighbors, res.weights)
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"\nPDF table ({est.n_entries:,} entries x {est.nbins} bins): dense float32 {dense.nbytes / 1e6:.1f} MB, "
          f"table {est.pdfs.nbytes / 1e6:.1f} MB ({est.pdfs.describe()})")
    print(f"mix {len(res):,} queries x k={k}: dense {best['dense'] * 1e3:.2f} ms, table {best['table'] * 1e3:.2f} ms "
          f"({best['table'] / best['dense']:.2f}x)")


def errorlog_throughput(n_samples: int, nbins: int, batch: int = 10_000, epochs: int = 3,
                        atoms_per_structure: int = 64) -> float:
    """Errors/s of ``ErrorLog.update`` as a trainer calls it: structures shuffled, their atoms'
    ids contiguous (``atoms_per_structure=1`` shuffles single atoms: the cache-hostile worst case)."""
    from ltau_lmp.estimator import ErrorLog

    rng = np.random.default_rng(2)
    log = ErrorLog.log_spaced(n_samples, 1e-3, 10.0, nbins)
    starts = rng.permutation(n_samples // atoms_per_structure) * atoms_per_structure
    perm = (starts[:, None] + np.arange(atoms_per_structure)).reshape(-1)
    batches = [(perm[s:s + batch], rng.lognormal(-3, 1, len(perm[s:s + batch]))) for s in range(0, n_samples, batch)]
    for ids, errors in batches:  # untimed first epoch: the OS maps the count matrix's pages
        log.update(ids, errors)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for ids, errors in batches:
            log.update(ids, errors)
        log.end_epoch()
    return epochs * n_samples / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--nbins", type=int, default=100)
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--out", default="/tmp/ltau_bench_estimators")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_build(args.child, args.entries, args.dim, args.nbins, args.queries, args.out)))
        return

    from ltau_lmp.estimator import LTAUEstimator

    print(f"# LTAU estimator benchmark: {args.entries:,} entries x {args.dim} dims x {args.nbins} bins, "
          f"{args.queries:,} queries")
    builds = {}
    for kind in KINDS:
        cmd = [sys.executable, __file__, "--child", kind, "--entries", str(args.entries), "--dim", str(args.dim),
               "--nbins", str(args.nbins), "--queries", str(args.queries), "--out", args.out]
        builds[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    queries = clustered(args.queries, args.dim, seed=3)
    ests = {kind: LTAUEstimator.load(f"{args.out}/{kind}", verify=False) for kind in KINDS}
    n_truth = min(2000, args.queries)
    exact = ests["flat"].query(queries[:n_truth], k=10).neighbors
    print(f"\n{'backend':8s} {'build s':>8s} {'peak MB':>8s} {'+build MB':>9s} {'recall@10':>10s} "
          f"{'q/s 1 thr':>11s} {'q/s 2 thr':>11s} {'+CI 1 thr':>11s}")
    for kind in KINDS:
        sub = queries[:n_truth] if kind == "flat" else queries
        recall = recall_at_10(ests[kind].query(queries[:n_truth], k=10).neighbors, exact)
        q1, q2 = throughput(ests[kind], sub, 1, False), throughput(ests[kind], sub, 2, False)
        qci = throughput(ests[kind], sub, 1, True)
        b = builds[kind]
        print(f"{kind:8s} {b['build_s']:8.1f} {b['peak_rss_mb']:8.0f} {b['rss_over_inputs_mb']:9.0f} "
              f"{recall:10.3f} {q1:11,.0f} {q2:11,.0f} {qci:11,.0f}")
    print("(q/s: kNN search + expected error + distance; +CI adds the 5-95 % interval from the mixed PDFs)")
    print("(peak MB: whole build process incl. the synthetic inputs; +build MB: above the inputs)")
    pdf_table_comparison(ests["flat"], synthetic_pdfs(args.entries, args.nbins, seed=1), queries)
    rate = errorlog_throughput(args.entries, args.nbins)
    worst = errorlog_throughput(args.entries, args.nbins, atoms_per_structure=1)
    print(f"\nErrorLog.update ({args.entries:,} samples x {args.nbins} bins, batches of 10k errors): "
          f"{rate / 1e6:.1f} M errors/s with shuffled 64-atom structures, {worst / 1e6:.1f} M errors/s "
          "with shuffled single atoms (random rows of the count matrix: memory-bound)")


if __name__ == "__main__":
    main()
