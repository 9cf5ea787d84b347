"""fix ltau cost, printed side by side in one run (4096 Si atoms, 1 rank, one thread).

1. LAMMPS step time (loop time / steps, excluding run setup) without fix ltau and with
   `fix ltau every 1` / `every 10`, for exact (flat) and HNSW estimators of 100k and 1M
   entries. Configurations are measured in interleaved rounds and the fastest round counts,
   so the load of a shared machine hits them alike. Overhead = t_fix / t_nofix - 1.
2. LTAU cost per evaluated step (every 1: t_fix - t_nofix; also a bare `LTAUEstimator.query`
   of the same 4096 latent vectors) against the extra cost of a 5-member ensemble: 4 more
   model force calls per step, taken as 4 x the no-fix step time of the same run.
3. `--memory`: RSS growth over a long run with fix ltau every 10 (VmRSS sampled in chunks),
   and the total resident memory of 1 vs 2 ranks with a 1M-entry estimator loaded (RSS and
   PSS summed over ranks; PSS splits shared pages, i.e. the memory-mapped estimator arrays).

Estimators are synthetic: descriptors are the model's real latent features of rattled and
heated Si, replicated with small noise; PDFs are random log-normal bumps. Each is calibrated on
the latents of other rattled cells (held-out reference atoms, as a training run's validation
set), on which auto also tunes its nprobe. They are built once and cached under --cache
(default /tmp/ltau_bench_fix).

Usage: python benchmarks/lammps_fix.py [--model MODEL.pt] [--steps 20] [--rounds 2] [--memory]
(the venv's bin must come first in PATH so that `mpirun` is MPICH's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")   # torch and faiss: one thread per rank

from si_cell import loop_time, ltau_pair, si_script, synthetic_estimator_arrays  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "examples" / "si" / "run" / "model.pt"

# --------------------------------------------------------------------------------------------
# model and synthetic estimators
# --------------------------------------------------------------------------------------------

def _model_file(arg: str | None, cache: Path) -> str:
    if arg:
        return arg
    if DEFAULT_MODEL.is_file():
        return str(DEFAULT_MODEL)
    from ltau_lmp.model import LocalForceField, save_model

    path = cache / "random_model.pt"
    if not path.is_file():
        save_model(LocalForceField(["Si"], cutoff=4.0, seed=0), path)
    return str(path)


def _latent_pool(model, seed: int = 0):
    """Real latent features of 4096-atom Si cells, rattled and heated (0.02 - 0.25 A)."""
    import numpy as np
    from ase.build import bulk

    from ltau_lmp.calculator import LTAUCalculator

    calc = LTAUCalculator(model)
    rng = np.random.default_rng(seed)
    pool = []
    for amp in (0.02, 0.05, 0.1, 0.15, 0.25):
        atoms = bulk("Si", "diamond", a=5.431 * (1 + amp / 20), cubic=True) * (8, 8, 8)
        atoms.positions += rng.normal(0, amp, atoms.positions.shape)
        atoms.calc = calc
        atoms.get_potential_energy()
        pool.append(np.asarray(calc.results["latent"], np.float32))
    return np.concatenate(pool)


def _synthetic(model, n: int, kind: str, cache: Path) -> Path:
    from ltau_lmp.estimator import LTAUEstimator

    path = cache / f"est_{model.model_hash[:12]}_{n}_{kind}_ref"
    if (path / "meta.json").is_file():
        return path
    t0 = time.perf_counter()
    desc, pdfs, edges = synthetic_estimator_arrays(_latent_pool(model), n)
    est = LTAUEstimator.build(desc, pdfs, bin_edges=edges, index=kind, k=10, reference_descriptors=_latent_pool(model, 3),
                              metadata={"model_hash": model.model_hash, "synthetic": True})
    est.save(path)
    print(f"# built {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# --------------------------------------------------------------------------------------------
# 1-2: step times
# --------------------------------------------------------------------------------------------

def _query_latent(model_file: str):
    """Latent features of the benchmark's 4096-atom cell, rattled by 0.05 A."""
    import numpy as np
    from ase.build import bulk

    from ltau_lmp.calculator import LTAUCalculator
    from ltau_lmp.model import load_model

    atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (8, 8, 8)
    atoms.positions += np.random.default_rng(2).normal(0, 0.05, atoms.positions.shape)
    atoms.calc = LTAUCalculator(load_model(model_file))
    atoms.get_potential_energy()
    return np.asarray(atoms.calc.results["latent"], np.float32)


def step_times(model_file: str, estimators: dict, steps: int, rounds: int, max_seconds: float):
    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(8, ltau_pair(model_file)))
    natoms = lmp.get_natoms()
    t_nofix = loop_time(lmp, steps)                                         # warm-up
    latent = _query_latent(model_file)   # bare queries: the LTAU cost without LAMMPS
    query = {}
    for name, path in estimators.items():
        est = LTAUEstimator.load(path)
        est.query(latent[:64])
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            res = est.query(latent)
            res.interval(0.05, 0.95)
            best = min(best, time.perf_counter() - t0)
        query[name] = best
        del est

    configs = [(name, every) for name in estimators for every in (1, 10)]
    configs += [(name + " ci no", every) for name in estimators for every in (1, 10)]
    skipped = {c for c in configs if c[1] == 1 and query[c[0].removesuffix(" ci no")] * steps > max_seconds}
    best = {c: float("inf") for c in configs}
    best[("nofix", 0)] = t_nofix
    for _ in range(rounds):
        best[("nofix", 0)] = min(best[("nofix", 0)], loop_time(lmp, steps))
        for name, every in configs:
            if (name, every) in skipped:
                continue
            base, lean = name.removesuffix(" ci no"), name.endswith(" ci no")
            lmp.command(f"fix u all ltau {estimators[base]} every {every}" + (" ci no" if lean else ""))
            best[(name, every)] = min(best[(name, every)], loop_time(lmp, steps))
            lmp.command("unfix u")
            best[("nofix", 0)] = min(best[("nofix", 0)], loop_time(lmp, steps))
    lmp.close()
    return natoms, best, query, skipped, latent


def phase_times(estimators: dict, latent, repeats: int = 5) -> dict:
    """Per-phase cost of one evaluation of ``latent`` (fastest of ``repeats``, interleaved):
    the kNN search (as the estimator runs it, in latent-locality order, and as faiss alone does
    in the atoms' order: the same answers), the expected error, mixing the neighbours' PDFs and the interval quantiles,
    the ood p-value; mixing as with a dense float32 PDF table (version-1 estimators) and as now
    (the compressed table, ``pdf_table``), quantiles as before one cumulative sum served both
    levels and as now."""
    import numpy as np

    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.estimator.histogram import pdf_quantiles
    from ltau_lmp.estimator.pdf_table import DensePDFTable

    out = {}
    for name, path in estimators.items():
        est = LTAUEstimator.load(path)
        res = est.query(latent[:64])
        dense = DensePDFTable(np.concatenate([est.pdfs.rows(np.arange(s, min(s + 65_536, est.n_entries)))
                                              for s in range(0, est.n_entries, 65_536)]))
        phases = {
            "search": lambda: est.index.search(latent, est.k),
            "search faiss order": lambda: est.index.cpu_index.search(latent, est.k),
            "query (search + expected)": lambda: est.query(latent),
            "mix old": lambda: dense.mix(res.neighbors, res.weights),
            "mix new": lambda: est.mix_pdfs(res.neighbors, res.weights),
            "quantiles old": lambda: [pdf_quantiles(mixed, est.bin_edges, (q,)) for q in (0.05, 0.95)],
            "quantiles new": lambda: pdf_quantiles(mixed, est.bin_edges, (0.05, 0.95)),
        }
        res = est.query(latent)
        mixed = est.mix_pdfs(res.neighbors, res.weights)
        best = dict.fromkeys(phases, float("inf"))
        for _ in range(repeats):
            for phase, work in phases.items():
                t0 = time.perf_counter()
                work()
                best[phase] = min(best[phase], time.perf_counter() - t0)
        if est.has_ood_reference:
            t0 = time.perf_counter()
            res.ood
            best["ood"] = time.perf_counter() - t0
        best["ids"] = res.neighbors
        out[name] = best
    for name, t in out.items():   # recall@k against the exact (flat) estimator of the same size
        exact = out.get("flat " + name.split()[-1])
        t["recall"] = float(np.mean((t["ids"][:, :, None] == exact["ids"][:, None, :]).any(axis=2))) if exact else None
    return out


# --------------------------------------------------------------------------------------------
# 3: memory
# --------------------------------------------------------------------------------------------

def _proc_kb(path: str, key: str) -> int:
    with open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_growth(model_file: str, estimator: Path, cells: int, steps: int, chunk: int):
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(cells, ltau_pair(model_file)).replace("fix md all nve",
                        "fix md all nvt temp 600 600 0.1"))
    lmp.command(f"fix u all ltau {estimator} every 10 log /tmp/ltau_bench_fix_memory.log")
    Path("/tmp/ltau_bench_fix_memory.log").unlink(missing_ok=True)
    lmp.command(f"run {chunk}")                       # warm-up chunk: allocations settle
    samples = [_proc_kb("/proc/self/status", "VmRSS")]
    done = chunk
    while done < steps:
        lmp.command(f"run {chunk} pre no post no")
        done += chunk
        samples.append(_proc_kb("/proc/self/status", "VmRSS"))
    natoms = lmp.get_natoms()
    lmp.close()
    return natoms, samples


def memory_worker(model_file: str, estimator: str, cells: int) -> None:
    """Under mpirun: load the fix, run a few steps, report RSS/PSS summed over ranks."""
    from mpi4py import MPI

    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(cells, ltau_pair(model_file)))
    lmp.command(f"fix u all ltau {estimator} every 1")
    lmp.command("run 5")
    comm = MPI.COMM_WORLD
    mine = (_proc_kb("/proc/self/smaps_rollup", "Rss"), _proc_kb("/proc/self/smaps_rollup", "Pss"))
    both = comm.gather(mine, root=0)
    if comm.Get_rank() == 0:
        print(f"MEMORY {sum(r for r, _ in both)} {sum(p for _, p in both)}", flush=True)
    lmp.close()


def _memory_ranks(nprocs: int, model_file: str, estimator: Path, cells: int) -> tuple[int, int]:
    cmd = ["mpirun", "-np", str(nprocs), sys.executable, os.path.abspath(__file__), "--memory-worker",
           "--model", model_file, "--estimator", str(estimator), "--memory-cells", str(cells)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         check=True, timeout=900).stdout
    line = next(l for l in out.splitlines() if l.startswith("MEMORY"))
    return int(line.split()[1]), int(line.split()[2])


# --------------------------------------------------------------------------------------------

def _print_phases(phases: dict, natoms: int) -> None:
    print(f"\nper phase, one evaluation of {natoms} atoms (ms, fastest of 5); non-search = everything but the "
          "search, with intervals (default) and with `ci no`; old = before the lean path")
    columns = ["search", "query (search + expected)", "mix old", "mix new", "quantiles old", "quantiles new", "ood"]
    print(f"{'estimator':<12}" + "".join(f"{c:>14}" for c in ["faiss order", "search", "expected", "mix old",
                                                              "mix new", "quant old", "quant new", "ood",
                                                              "non-s. old %", "new %", "ci no %", "recall@10"]))
    for name, t in phases.items():
        expected = t["query (search + expected)"] - t["search"]
        ood = t.get("ood", 0.0)
        old = expected + t["mix old"] + t["quantiles old"] + ood
        new = expected + t["mix new"] + t["quantiles new"] + ood
        values = [t["search faiss order"] * 1e3, t["search"] * 1e3, expected * 1e3] + \
            [t[c] * 1e3 for c in columns[2:6]] + \
            [ood * 1e3, old / t["search"] * 100, new / t["search"] * 100, (expected + ood) / t["search"] * 100]
        recall = f"{t['recall']:>14.3f}" if t["recall"] is not None else f"{'-':>14}"
        print(f"{name:<12}" + "".join(f"{v:>14.2f}" for v in values) + recall)
    print("faiss order: the same index searched in the atoms' order, queries not sorted (HNSW nodes still stored "
          "in locality order); "
          "target: non-search <= 10 % of the search")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model file (default {DEFAULT_MODEL} if present, else a random model)")
    parser.add_argument("--cache", default="/tmp/ltau_bench_fix", help="where the synthetic estimators are kept")
    parser.add_argument("--sizes", default="100000,1000000", help="synthetic estimator sizes (entries; '' for none)")
    parser.add_argument("--estimators", nargs="*", default=[], metavar="NAME=DIR",
                        help="real estimators of --model to measure as well, e.g. 'demo auto=runs/demo/run/estimator'")
    parser.add_argument("--kinds", default="flat,hnsw,auto",
                        help="index kinds (hnsw: the old default; auto: IVF tuned to recall 0.95 above 20k entries)")
    parser.add_argument("--steps", type=int, default=20, help="MD steps per measurement (multiple of 10)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest counts")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip an every-1 configuration whose measurement would take longer")
    parser.add_argument("--phases-only", action="store_true", help="only the per-phase timing (no LAMMPS runs)")
    parser.add_argument("--memory", action="store_true", help="also the RSS-growth and 1-vs-2-rank memory runs")
    parser.add_argument("--memory-steps", type=int, default=10_000)
    parser.add_argument("--memory-cells", type=int, default=4, help="diamond cells per edge (4: 512 atoms)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--estimator", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.model, args.estimator, args.memory_cells)
        return

    import faiss
    import torch

    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.model import load_model

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model_file = _model_file(args.model, cache)
    model = load_model(model_file)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    estimators = {f"{kind} {n // 1000}k": _synthetic(model, n, kind, cache) for n in sizes
                  for kind in args.kinds.split(",")}
    estimators.update(dict(spec.split("=", 1) for spec in args.estimators))

    if args.phases_only:
        _print_phases(phase_times(estimators, _query_latent(model_file)), 4096)
        return
    natoms, best, query, skipped, latent = step_times(model_file, estimators, args.steps, args.rounds,
                                                      args.max_seconds)
    phases = phase_times(estimators, latent)
    t0 = best[("nofix", 0)]
    ensemble = 4 * t0
    print(f"\nfix ltau cost: {natoms} atoms, 1 rank, torch {torch.__version__}, faiss {faiss.__version__}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} cores (shared), "
          f"model {Path(model_file).name} (latent_dim {model.latent_dim}), k=10")
    print(f"fastest of {args.rounds} interleaved rounds of {args.steps} steps; HNSW M=32 efSearch=16; "
          "auto: " + "; ".join(f"{name} {LTAUEstimator.load(path).index.options}" for name, path in estimators.items()
                               if name.startswith("auto")))
    print(f"step time without fix ltau: {t0 * 1e3:.1f} ms "
          f"(= one model force call; 5-member ensemble extra = 4 x = {ensemble * 1e3:.0f} ms/step)\n")
    head = (f"{'estimator':<12}{'bare query':>12}{'every 1':>11}{'overhead':>10}{'every 10':>11}{'overhead':>10}"
            f"{'LTAU/eval':>11}{'LTAU/ens.':>11}")
    print(head)
    print(f"{'':<12}{'ms':>12}{'ms/step':>11}{'%':>10}{'ms/step':>11}{'%':>10}{'ms':>11}{'ratio':>11}")
    print("-" * len(head))
    for name in [n + lean for lean in ("", " ci no") for n in estimators]:
        t1, t10 = best[(name, 1)], best[(name, 10)]
        if (name, 1) in skipped:
            cost = query[name.removesuffix(" ci no")]            # projected from the bare query
            e1 = f"{'skipped':>11}{f'~{cost / t0 * 100:.0f}*':>10}"
        else:
            cost = max(t1 - t0, 0.0)
            e1 = f"{t1 * 1e3:>11.1f}{(t1 / t0 - 1) * 100:>10.1f}"
        print(f"{name:<18}{query[name.removesuffix(' ci no')] * 1e3:>6.1f}{e1}{t10 * 1e3:>11.1f}{(t10 / t0 - 1) * 100:>10.1f}"
              f"{cost * 1e3:>11.2f}{cost / ensemble:>11.3f}")
    print("\nLTAU/eval = t(every 1) - t(no fix) per step (* = projected from the bare query: the every-1 run "
          "was skipped as too slow); LTAU/ens. = LTAU/eval / (4 x no-fix step).")
    print("targets: every 10 <= 5 % at 100k entries and <= 10 % at 1M; every 1 <= 50 % at 100k; "
          "LTAU/ens. <= 0.05 at 100k")

    _print_phases(phases, natoms)

    if args.memory:
        hnsw_1m = estimators.get("hnsw 1000k") or list(estimators.values())[-1]
        chunk = max(10, args.memory_steps // 10)
        n_mem, samples = rss_growth(model_file, hnsw_1m, args.memory_cells, args.memory_steps, chunk)
        growth = (samples[-1] / samples[0] - 1) * 100
        print(f"\nRSS over {args.memory_steps} steps, {n_mem} atoms, fix ltau every 10 ({Path(hnsw_1m).name}): "
              f"{samples[0] / 1024:.0f} MiB after the first {chunk} steps -> {samples[-1] / 1024:.0f} MiB "
              f"({growth:+.2f} %; target < 2 %)")
        print("  samples (MiB): " + " ".join(f"{s / 1024:.0f}" for s in samples))
        for name in [n for n in estimators if n.endswith("1000k")] or list(estimators)[-1:]:
            r1, p1 = _memory_ranks(1, model_file, estimators[name], args.memory_cells)
            r2, p2 = _memory_ranks(2, model_file, estimators[name], args.memory_cells)
            print(f"memory with {name}, {n_mem} atoms: 1 rank RSS {r1 / 1024:.0f} MiB PSS {p1 / 1024:.0f} MiB; "
                  f"2 ranks RSS sum {r2 / 1024:.0f} MiB ({r2 / r1:.2f}x), PSS sum {p2 / 1024:.0f} MiB "
                  f"({p2 / p1:.2f}x; target <= 1.3x)")


if __name__ == "__main__":
    main()
