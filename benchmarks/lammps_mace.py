"""A MACE model behind pair_style ltau: costs printed side by side in one run (CPU, one thread/rank).

1. Bridge overhead: LAMMPS step time with `pair_style ltau` (1 rank; the graph is folded onto the
   local atoms, so the model sees exactly MACE's periodic graph) divided by MACE's own
   forward + backward (`model(batch, compute_force=True)`) on the same atoms and graph.
2. fix ltau cost at production size: step time with `fix ltau every 1` and `every 10` over the
   step without it, for two synthetic estimators of --entries entries, interleaved in one run:
   "with held-out atoms" (built with `reference_descriptors`: the latents of other structures,
   as `ltau-lmp train` passes its validation atoms; auto tunes on them and the estimator is
   calibrated: the fix also computes the ood p-value) and "without held-out atoms" (built with
   `structures=` only: auto holds whole training structures out to tune on; no ood). Reported
   three ways: the step-time difference (best of rounds: noisy at the 1 % level on a shared
   machine), the difference of LAMMPS's own `Modify` time per step (where the fix runs), and a
   bare `LTAUEstimator.query` + interval (+ ood) of the same atoms' latents in Python, over the
   step time. Also LTAU's extra cost per evaluated step against the extra cost of a 5-member
   ensemble (4 more force calls of the same model per step, taken as 4 x MACE's own
   forward+backward). Target (issue 23): `fix ltau every 1` <= +1 % of the step, with or
   without held-out atoms.
3. `--mpi`: message passing on 2 ranks (--rank-cells), both ways in one mpirun, interleaved:
   `message_passing exchange` (one cutoff of ghosts, ghost node features exchanged after each
   layer) and `message_passing shell` (ghosts out to the receptive field): step time, nodes per
   layer / atoms, the largest force difference between the two, speed-up over 1 rank.

The model: a random MACE of production size (`--channels 128`, the default: 128 x (0e + 1o),
2 interactions, r_max 5 A, float32; 256-dimensional latents: `mace_latents.random_mace`), or
`--channels 16` for the example's small MACE (16 x 0e, r_max 4 A, float64). Synthetic estimator
entries: the model's own latents of 512-site Si structures (`mace_latents.latent_pool`: strained,
rattled, with vacancies; the small model: rattled / heated cells) drawn with replacement plus
2 % noise, log-normal error histograms (`si_cell.synthetic_estimator_arrays`' recipe, with the
structure of each row kept); held-out atoms: other structures' latents. `--estimator DIR` times
a given estimator instead (as "given").

Interleaved rounds, the fastest counts (shared machines are noisy).

Usage: python benchmarks/lammps_mace.py [--channels 128] [--entries 1000000] [--cells 3]
       [--steps 10] [--rounds 3] [--mpi] [--model FILE.model --allow-pickle] [--estimator DIR]
A MACE .model is a pickled module (loading it runs code from the file): a --model of yours is
loaded only with --allow-pickle; without --model the script builds and uses a random MACE.
(the venv's bin first in PATH, so that `mpirun` is MPICH's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from mace_latents import CACHE, atom_latents, random_mace  # noqa: E402
from si_cell import epoch_histograms, ltau_pair, si_script  # noqa: E402

SMALL_CHANNELS = 16  # --channels 16: the example's small MACE (L = 0, float64)
TARGET_EVERY1 = 0.01  # issue 23: fix ltau every 1 at most +1 % of a production MACE step
ESTIMATORS = {"with held-out atoms": "ref", "without held-out atoms": "structures"}


def _atoms(cells: int):
    import numpy as np
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (cells, cells, cells)
    atoms.positions += np.random.default_rng(2).uniform(-0.05, 0.05, atoms.positions.shape)
    return atoms


def mace_own_time(adapter, cells: int, rounds: int) -> float:
    """Seconds of MACE's own forward + backward (forces) on the benchmark's atoms."""
    import torch
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    model = adapter.mace    # the MACE module itself, called as MACE calls it
    torch.set_default_dtype(next(model.parameters()).dtype)    # MACE builds its graph in the default dtype
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    config = mace_data.config_from_atoms(_atoms(cells))
    graph = mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=float(model.r_max))
    batch = next(iter(torch_geometric.dataloader.DataLoader([graph], batch_size=1))).to_dict()
    best = float("inf")
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        model(dict(batch), training=False, compute_force=True)
        best = min(best, time.perf_counter() - t0)
    return best


def small_pool(model):
    """The small model's latents of rattled / heated Si (0.02 - 0.25 A): (training latents, structure
    of each row, held-out latents: other cells of the same recipe)."""
    import numpy as np
    from ase.build import bulk

    def cells(seed):
        rng = np.random.default_rng(seed)
        for amp in (0.02, 0.05, 0.1, 0.15, 0.25):
            atoms = bulk("Si", "diamond", a=5.431 * (1 + amp / 20), cubic=True) * (4, 4, 4)
            atoms.positions += rng.normal(0, amp, atoms.positions.shape)
            yield atom_latents(model, atoms)

    train = list(cells(0))
    return np.concatenate(train), np.repeat(np.arange(len(train)), [len(t) for t in train]), np.concatenate(list(cells(3)))


def synthetic_arrays(pool, groups, n: int, seed: int = 1, chunk: int = 100_000):
    """``si_cell.synthetic_estimator_arrays``' recipe (rows of ``pool`` drawn with replacement plus
    2 % noise; log-normal error histograms), in blocks, also returning the structure of each row."""
    import numpy as np

    from ltau_lmp.estimator.errorlog import log_spaced_edges

    rng = np.random.default_rng(seed)
    noise = 0.02 * pool.std(axis=0, keepdims=True)
    rows = rng.integers(0, len(pool), n)
    edges = log_spaced_edges(1e-3, 10.0, 100)
    desc, pdfs = np.empty((n, pool.shape[1]), np.float32), np.empty((n, 100), np.float32)
    for s in range(0, n, chunk):
        block = pool[rows[s:s + chunk]]
        desc[s:s + len(block)] = block + rng.standard_normal(block.shape, dtype=np.float32) * noise
        median = np.exp(rng.normal(np.log(0.05), 0.7, (len(block), 1)))
        pdfs[s:s + len(block)] = epoch_histograms(rng, median, edges)
    return desc, pdfs, edges, groups[rows]


def synthetic_estimators(model, pool, entries: int, index: str, cache: Path) -> dict:
    """The two estimators of the module docstring (built once, cached): {label: path}."""
    from ltau_lmp.estimator import LTAUEstimator

    paths = {label: cache / f"est_{model.card.model_hash[:12]}_{entries}_{index}_{tag}"
             for label, tag in ESTIMATORS.items()}
    if all((path / "meta.json").is_file() for path in paths.values()):
        return paths
    train, groups, held = pool()
    desc, pdfs, edges, structures = synthetic_arrays(train, groups, entries)
    for label, path in paths.items():
        if (path / "meta.json").is_file():
            continue
        held_out = ({"reference_descriptors": held} if ESTIMATORS[label] == "ref" else {"structures": structures})
        t0 = time.perf_counter()
        est = LTAUEstimator.build(desc, pdfs, bin_edges=edges, k=10, index=index, **held_out,
                                  metadata={"model_hash": model.card.model_hash, "synthetic": True})
        print(f"# built the estimator {label} ({entries:,} x {desc.shape[1]}) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        est.save(path)
    return paths


def _modify_seconds(log: Path) -> float:
    """LAMMPS's `Modify` time (s, max over ranks) of the last run in ``log``."""
    found = re.findall(r"^Modify\s*\|\s*[\d.eE+-]+\s*\|\s*[\d.eE+-]+\s*\|\s*([\d.eE+-]+)", log.read_text(), re.M)
    return float(found[-1]) if found else float("nan")


def timed_run(lmp, log: Path, steps: int) -> tuple[float, float]:
    """(loop seconds per step, Modify seconds per step) of one run (setup excluded)."""
    lmp.command(f"run {steps}")
    lmp.command("print '' screen no")  # makes LAMMPS flush the log's timing breakdown
    return lmp.last_thermo()["CPU"] / steps, _modify_seconds(log) / steps


def step_times(model_file: str, estimators: dict, cells: int, steps: int, rounds: int, log: Path) -> dict:
    """1 rank: best step time (and Modify time) without the fix, and with every 1 and every 10 of
    each estimator, interleaved."""
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log=str(log), screen=False)
    lmp.commands_string(si_script(cells, ltau_pair(model_file, "allow_pickle yes")))
    configs = [("nofix", 0)] + [(label, every) for label in estimators for every in (1, 10)]
    best = {config: (float("inf"), float("inf")) for config in configs}
    timed_run(lmp, log, 2)  # warm-up
    for _ in range(rounds):
        for label, every in configs:
            if every:
                lmp.command(f"fix u all ltau {estimators[label]} every {every}")
            step, modify = timed_run(lmp, log, max(steps, 10) if every else steps)
            best[(label, every)] = (min(best[(label, every)][0], step), min(best[(label, every)][1], modify))
            if every:
                lmp.command("unfix u")
    natoms = lmp.get_natoms()
    lmp.close()
    return {"natoms": natoms, "best": best}


def bare_query(estimators: dict, latent, rounds: int) -> dict:
    """Seconds of one fix-like evaluation in Python (query + 5-95 % interval, + ood when
    calibrated) of ``latent``, best of ``rounds``; and the index's choice."""
    from ltau_lmp.estimator import LTAUEstimator

    out = {}
    for label, path in estimators.items():
        est = LTAUEstimator.load(path, use_gpu=False)
        est.query(latent[:64])
        best = float("inf")
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            res = est.query(latent)
            res.interval(0.05, 0.95)
            if est.has_ood_reference:
                res.ood
            best = min(best, time.perf_counter() - t0)
        opts = est.index.options
        out[label] = {"seconds": best, "kind": est.index.kind, "entries": est.n_entries,
                      "choice": opts.get("choice", f"{est.index.kind} {opts}"), "ood": est.has_ood_reference}
    return out


def worker(model_file: str, cells: int, steps: int, rounds: int, modes: list[str], out: str) -> None:
    """Under mpirun: one LAMMPS per message_passing mode, timed in interleaved rounds (best
    step time each), node counts per layer summed over ranks, and each mode's final forces."""
    import numpy as np
    from mpi4py import MPI

    from ltau_lmp.lammps.driver import create_lammps
    from si_cell import loop_time

    comm = MPI.COMM_WORLD
    runs = {}
    for mode in modes:
        runs[mode] = create_lammps(log="none", screen=False)
        runs[mode].commands_string(si_script(cells, ltau_pair(model_file, f"allow_pickle yes message_passing {mode}")))
    best = {mode: float("inf") for mode in modes}
    for _ in range(rounds + 1):    # the first round warms up, and every instance runs the same steps
        for mode, lmp in runs.items():
            best[mode] = min(best[mode], loop_time(lmp, steps))
    result = {"nprocs": comm.Get_size(), "natoms": runs[modes[0]].get_natoms(), "modes": {}}
    forces = {}
    for mode, lmp in runs.items():
        nlocal, nghost = lmp.extract_global("nlocal"), lmp.extract_global("nghost")
        # the plugin's rule: one rank folds the graph onto its atoms; on several, the shell
        # computes every layer on the ghost atoms too, the exchange only on the local ones
        per_layer = nlocal + nghost if comm.Get_size() > 1 and mode == "shell" else nlocal
        result["modes"][mode] = {"step": best[mode], "nodes": comm.allreduce(per_layer),
                                 "ghosts": comm.allreduce(nghost)}
        forces[mode] = np.array(lmp.gather_atoms("f", 1, 3)).reshape(-1, 3)    # ordered by atom ID
        lmp.close()
    if comm.Get_rank() == 0:
        result["max_force_difference"] = float(np.abs(forces[modes[0]] - forces[modes[-1]]).max())
        Path(out).write_text(json.dumps(result))


def mpi_run(nprocs: int, model_file: str, args, modes: list[str], tmp: Path) -> dict:
    out = tmp / f"np{nprocs}.json"
    cmd = ["mpirun", "-np", str(nprocs), sys.executable, __file__, "--worker", "--allow-pickle",
           "--model", model_file, "--rank-cells", str(args.rank_cells), "--steps", str(args.steps),
           "--rounds", str(args.rounds), "--modes", ",".join(modes), "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def print_mpi(one_rank: dict, two: dict) -> None:
    n, ref = two["natoms"], one_rank["modes"]["exchange"]["step"]
    print(f"| {n} atoms, 1 rank (folded graph): step time | {ref * 1e3:.1f} ms |")
    for mode in ("exchange", "shell"):
        r = two["modes"][mode]
        print(f"| {n} atoms, 2 ranks, message_passing {mode}: step time | {r['step'] * 1e3:.1f} ms |")
        print(f"| 2 ranks, {mode}: nodes per layer / atoms (ghost atoms / atoms) | "
              f"{r['nodes'] / n:.2f} ({r['ghosts'] / n:.2f}) |")
        print(f"| speed-up 1 -> 2 ranks, {mode} | {ref / r['step']:.2f} |")
    print(f"| **exchange speed-up over shell, 2 ranks** | "
          f"**{two['modes']['shell']['step'] / two['modes']['exchange']['step']:.2f}** |")
    print(f"| max force difference exchange vs shell (by atom ID, after the same steps) | "
          f"{two['max_force_difference']:.1e} eV/A |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a MACE .model file (default: a random MACE built here)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="load --model although it is a pickled module (it runs code from the file)")
    ap.add_argument("--channels", type=int, default=128,
                    help="the random MACE's channels: 128 (production, the default; 256 also) or 16 (the example's)")
    ap.add_argument("--pool", type=int, nargs=2, default=[200, 20], metavar=("TRAIN", "HELD_OUT"),
                    help="512-site structures of the production latent pool (mace_latents.latent_pool)")
    ap.add_argument("--estimator", help="an estimator of that model to time (default: the two synthetic ones)")
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--index", default="auto", help="index kind of the synthetic estimators")
    ap.add_argument("--cells", type=int, default=3, help="diamond cells per side (8 atoms each; 3: 216 atoms)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mpi", action="store_true", help="also the 1- vs 2-rank message-passing comparison")
    ap.add_argument("--rank-cells", type=int, default=6,
                    help="cells per side of the 1- vs 2-rank comparison (6: 1728 atoms, 864 per rank)")
    ap.add_argument("--cache", default="/tmp/ltau_bench_mace")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="exchange", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.model and not args.allow_pickle:
        ap.error(f"{args.model} is a MACE .model, a pickled module: loading it runs code stored in the file; "
                 "pass --allow-pickle if you trust it")
    if args.worker:
        worker(args.model, args.rank_cells, args.steps, args.rounds, args.modes.split(","), args.out)
        return
    from ltau_lmp.model import load_model

    if args.model:
        model = args.model
    elif args.channels == SMALL_CHANNELS:
        model = str(random_mace(SMALL_CHANNELS, cache / "random_mace.model", l_max=0, r_max=4.0, double=True))
    else:
        model = str(random_mace(args.channels, CACHE / f"random_mace_{args.channels}.model"))
    adapter = load_model(model, family="mace", allow_pickle=True)   # the user's opt-in, or our own file
    card = adapter.card
    print(f"# model {model}: {card.latent}; receptive field {card.receptive_field:g} A", flush=True)
    if args.estimator:
        estimators = {"given": args.estimator}
    else:
        if args.model or args.channels == SMALL_CHANNELS:
            pool = lambda: small_pool(adapter)  # noqa: E731
        else:
            from mace_latents import latent_pool

            pool = lambda: latent_pool(args.channels, *args.pool)[:3]  # noqa: E731
        estimators = synthetic_estimators(adapter, pool, args.entries, args.index, cache)
    latent = atom_latents(adapter, _atoms(args.cells))
    query = bare_query(estimators, latent, args.rounds)
    own = mace_own_time(adapter, args.cells, args.rounds)
    one = step_times(model, estimators, args.cells, args.steps, args.rounds, cache / "log.lammps")
    natoms, best = one["natoms"], one["best"]
    nofix, nofix_modify = best[("nofix", 0)]
    print(f"\natoms {natoms}, {os.environ['OMP_NUM_THREADS']} thread(s) per rank, best of {args.rounds} rounds\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| MACE's own forward + backward | {own * 1e3:.1f} ms |")
    print(f"| LAMMPS step, pair_style ltau, 1 rank (folded graph) | {nofix * 1e3:.1f} ms |")
    print(f"| **bridge overhead** (step / MACE's own) | **{nofix / own:.3f}** |")
    if args.mpi:
        one_rank = mpi_run(1, model, args, ["exchange"], cache)
        two = mpi_run(2, model, args, ["exchange", "shell"], cache)
        print_mpi(one_rank, two)
    labels = list(estimators)
    print(f"\nfix ltau at {natoms} atoms; step {nofix * 1e3:.1f} ms without it; 5-member ensemble extra = "
          f"4 x MACE = {4 * own * 1e3:.0f} ms; target every 1 <= +{TARGET_EVERY1:.0%} (issue 23)\n")
    print("| | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels))
    print("| estimator | " + " | ".join(f"{query[label]['entries']:,} x {latent.shape[1]}, {query[label]['kind']}"
                                        f"{', ood' if query[label]['ood'] else ''}"
                                        for label in labels) + " |")
    rows = {"fix ltau every 1, step time": lambda l: f"{100 * (best[(l, 1)][0] / nofix - 1):+.2f} %",
            "fix ltau every 10, step time": lambda l: f"{100 * (best[(l, 10)][0] / nofix - 1):+.2f} %",
            "every 1, Modify time / step": lambda l: f"{100 * (best[(l, 1)][1] - nofix_modify) / nofix:+.2f} %",
            "every 10, Modify time / step": lambda l: f"{100 * (best[(l, 10)][1] - nofix_modify) / nofix:+.2f} %",
            "bare query (+ interval, ood) / step": lambda l: f"{query[l]['seconds'] * 1e3:.2f} ms: "
                                                             f"+{100 * query[l]['seconds'] / nofix:.2f} %",
            "LTAU per evaluation / ensemble extra (step difference)":
                lambda l: f"{(best[(l, 1)][0] - nofix) / (4 * own):.4f}",
            "LTAU per evaluation / ensemble extra (bare query)": lambda l: f"{query[l]['seconds'] / (4 * own):.4f}"}
    for name, cell in rows.items():
        print(f"| {name} | " + " | ".join(cell(label) for label in labels) + " |")
    for label in labels:
        measured = (best[(label, 1)][1] - nofix_modify) / nofix
        print(f"# target every 1 <= +{TARGET_EVERY1:.0%}, {label} (Modify time): {100 * measured:+.2f} %: "
              f"{'met' if measured <= TARGET_EVERY1 else 'MISSED'}; index: {query[label]['choice']}")


if __name__ == "__main__":
    main()
