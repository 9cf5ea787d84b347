"""kNN index benchmark on real latents: flat (exact) vs the old default vs ``auto``, side by side.

    python benchmarks/knn_index.py                                  # si, 3bpa, gap20 at 100k and 1M
    python benchmarks/knn_index.py --datasets si --sizes 10000   # below auto's exact limit: flat vs IVF
    python benchmarks/knn_index.py --datasets 3bpa --sizes 100000 --out /tmp/knn.json

Rows of (data set, size) cases not rerun are kept from an existing ``--out`` file.

Index vectors: the real training latents of a data set (90 % of its atoms; for ``si`` all the
training atoms of the built-in Si model in ``--si-run``), replicated with Gaussian noise to each
size (σ per dimension = half the median nearest-neighbour distance of the originals / √d: MD-like
near-duplicates). Held-out atoms (the other 10 %; for ``si`` the model's validation atoms,
reference_descriptors.npy) are split in two halves: ``auto`` is given one as its reference atoms
(tuning, as an estimator build with --reference-descriptors does; too few for gap20, which then
tunes on its training sample), the queries are the other half with the same noise, so none of
them is in the index or was tuned on.

Per-entry expected errors: ``si`` its real training-error PDFs, the others log-normal
(median 0.05 eV/Å, σ_log 0.7) per original atom; each replica scales its original's value by
exp(N(0, 0.2)) (near-duplicates have close, not equal, errors). A query's expected error is
the mean over its k = 10 neighbours, as ``LTAUEstimator`` computes it with uniform weights.

Everything runs with faiss at 1 thread; q/s are raw ``SearchIndex.search`` throughputs for
batches of 4096 and 512 queries (one MD evaluation per rank), best of 3 interleaved rounds, per
CPU-second of this process (one core's rate, robust to other processes) and per wall second.
The machine is shared: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from ltau_lmp.estimator.index import require_faiss, set_threads
from ltau_lmp.estimator.index_tuning import AUTO_EXACT_LIMIT, auto_options, build_index

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data")
DATASETS = ("si", "3bpa", "gap20")
K = 10
N_QUERIES = 4096
N_TRUTH = 2048  # queries searched exactly: the reference for recall and expected-error differences
OLD_DEFAULT = {"limit": 200_000, "kind": "hnsw"}  # before auto: flat below 200k, HNSW (M 32, efS 16) above


def load_dataset(name: str, si_run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index originals, held-out originals, per-original expected error)."""
    rng = np.random.default_rng(0)
    if name == "si":
        from ltau_lmp.estimator import LTAUEstimator

        base = np.load(si_run / "descriptors.npy").astype(np.float32)
        held = np.load(si_run / "reference_descriptors.npy").astype(np.float32)
        return base, held, LTAUEstimator.load(si_run / "estimator", use_gpu=False).entry_expected
    file = {"3bpa": "3bpa/descriptors.npy", "gap20": "gap20/descriptors_sample_215.npy"}[name]
    data = np.load(SHARED / file).astype(np.float32)
    perm = rng.permutation(len(data))
    n_held = max(1, len(data) // 10)
    base, held = data[perm[n_held:]], data[perm[:n_held]]
    return base, held, np.exp(rng.normal(np.log(0.05), 0.7, len(base)))


def noise_sigma(base: np.ndarray) -> float:
    sample = base[np.random.default_rng(1).choice(len(base), min(2000, len(base)), replace=False)]
    dist = require_faiss().knn(sample, base, 2)[0][:, 1]
    return 0.5 * float(np.median(np.sqrt(dist))) / np.sqrt(base.shape[1])


def replicate(base: np.ndarray, n: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n noisy copies of random rows of ``base`` (each original at least once when n allows)."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(len(base))[:n], rng.integers(0, len(base), max(0, n - len(base)))])
    out = base[rows]
    out += rng.normal(scale=sigma, size=out.shape).astype(np.float32)
    return out, rows


def search_rates(indexes: dict, queries: np.ndarray, batch: int, rounds: int = 3) -> dict:
    """Best q/s per index over ``rounds``, indexes interleaved so that load from other processes
    hits them alike; per CPU-second of this process (what one core delivers) and per wall second."""
    best = {name: (0.0, 0.0) for name in indexes}
    for _ in range(rounds):
        for name, index in indexes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for start in range(0, len(queries), batch):
                index.search(queries[start:start + batch], K)
            rate_cpu = len(queries) / (time.process_time() - cpu)
            rate_wall = len(queries) / (time.perf_counter() - wall)
            best[name] = (max(best[name][0], rate_cpu), max(best[name][1], rate_wall))
    return best


def compare(ids: np.ndarray, exact: np.ndarray, entry_expected: np.ndarray) -> dict:
    recall = float(np.mean((ids[:, :, None] == exact[:, None, :]).any(axis=2)))
    expected, reference = entry_expected[ids].mean(axis=1), entry_expected[exact].mean(axis=1)
    diff = np.abs(expected - reference)
    return {"recall_at_10": round(recall, 4), "max_abs_expected_diff": float(diff.max()),
            "mean_abs_expected_diff": float(diff.mean()), "mean_rel_expected_diff": float(np.mean(diff / reference))}


def run_case(name: str, size: int, si_run: Path) -> list[dict]:
    base, held, base_expected = load_dataset(name, si_run)
    sigma = noise_sigma(base)
    vectors, rows = replicate(base, size, sigma, seed=2)
    entry_expected = base_expected[rows] * np.exp(np.random.default_rng(3).normal(0.0, 0.2, size))
    split = np.random.default_rng(5).permutation(len(held))
    tuning, held = held[split[:len(held) // 2]], held[split[len(held) // 2:]]
    queries = replicate(held, N_QUERIES, sigma, seed=4)[0]
    old_kind = "flat" if size < OLD_DEFAULT["limit"] else OLD_DEFAULT["kind"]
    specs = {"flat": ("flat", None), "old default": (old_kind, None), "auto": ("auto", None)}
    if size < AUTO_EXACT_LIMIT:  # what auto would build above the limit: why it stays exact here
        tuned = {key: value for key, value in auto_options("ivf", size, None).items() if key != "auto"}
        specs["ivf (auto's tuning)"] = ("ivf", tuned)
    same_as_flat = {label for label, (kind, _) in specs.items() if kind == "flat" and label != "flat"}
    indexes, build_s = {}, {}
    for label, (kind, options) in specs.items():
        if label not in same_as_flat:
            t0 = time.perf_counter()
            indexes[label] = build_index(vectors, kind, options, use_gpu=False,
                                         tuning_queries=tuning if label == "auto" else None)
            build_s[label] = time.perf_counter() - t0
    exact = indexes["flat"].search(queries[:N_TRUTH], K)[1]
    exhaustive = {label: index for label, index in indexes.items() if index.kind == "flat"}
    fast = {label: index for label, index in indexes.items() if index.kind != "flat"}
    flat_queries = queries[:max(512, N_QUERIES * 20_000 // size)]  # exact search: a few seconds at most
    rate4096 = {**search_rates(exhaustive, flat_queries, 4096), **search_rates(fast, queries, 4096)}
    rate512 = {**search_rates(exhaustive, flat_queries, 512), **search_rates(fast, queries, 512)}
    out = []
    for label in specs:
        key = "flat" if label in same_as_flat else label
        index = indexes[key]
        out.append({"dataset": name, "n_entries": size, "n_originals": len(base), "noise_sigma": sigma,
                    "index": label, "kind": index.kind, "options": index.options, "build_s": round(build_s[key], 2),
                    "qps_cpu_batch4096": round(rate4096[key][0]), "qps_wall_batch4096": round(rate4096[key][1]),
                    "qps_cpu_batch512": round(rate512[key][0]),
                    **compare(index.search(queries[:N_TRUTH], K)[1], exact, entry_expected)})
    return out


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        opts = {k: v for k, v in r["options"].items() if k not in ("auto", "recall_at_10", "recall_queries")}
        built = r["options"].get("recall_at_10")
        print(f"{r['dataset']:6s} {r['n_entries']:>9,} {r['index']:20s} {r['kind']:5s} {r['build_s']:7.1f} "
              f"{r['qps_cpu_batch4096']:>9,} {r['qps_wall_batch4096']:>9,} {r['qps_cpu_batch512']:>9,} "
              f"{r['recall_at_10']:7.3f} "
              f"{'' if built is None else f'{built:.3f}':>6s} {r['max_abs_expected_diff']:9.2e} "
              f"{r['mean_abs_expected_diff']:9.2e} {r['mean_rel_expected_diff']:7.2%}  {opts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--si-run", type=Path, default=ROOT / "runs" / "demo" / "run",
                        help="training run of the built-in Si model (descriptors.npy, reference_descriptors.npy, "
                             "estimator/)")
    parser.add_argument("--out", type=Path, default=ROOT / "doc" / "validation" / "knn_index.json")
    args = parser.parse_args()
    set_threads(1)
    print("# kNN index benchmark, faiss 1 thread, k = 10; q/s = raw search, best of 3 rounds; recall and expected-"
          f"error differences over {N_TRUTH} held-out queries against exact search")
    print(f"{'data':6s} {'entries':>9s} {'index':20s} {'kind':5s} {'build s':>7s} {'q/cpu-s':>9s} "
          f"{'q/wall-s':>9s} {'q/cpu 512':>9s} {'rec@10':>7s} {'build':>6s} {'max|dE|':>9s} {'mean|dE|':>9s} "
          f"{'rel':>7s}  options")
    results = []
    for name in args.datasets:
        if name == "si" and not (args.si_run / "estimator" / "meta.json").is_file():
            print(f"# skipping si: no trained run in {args.si_run} (make demo)")
            continue
        for size in args.sizes:
            rows = run_case(name, size, args.si_run)
            print_rows(rows)
            results.extend(rows)
    print("(build: recall@10 auto measured at build on its own sample, stored in the index options; "
          "dE: expected-error difference to exact search, eV/Å; rel: mean |dE| / exact expected error)")
    rerun = {(r["dataset"], r["n_entries"]) for r in results}
    if args.out.is_file():  # keep the other cases of an earlier run: partial reruns update the file
        earlier = json.loads(args.out.read_text())["results"]
        results = [r for r in earlier if (r["dataset"], r["n_entries"]) not in rerun] + results
    results.sort(key=lambda r: (DATASETS.index(r["dataset"]), r["n_entries"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "benchmarks/knn_index.py", "faiss_threads": 1, "k": K, "n_queries": N_QUERIES,
        "n_truth": N_TRUTH, "machine": f"{platform.processor() or platform.machine()}, shared; read ratios",
        "results": results}, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
