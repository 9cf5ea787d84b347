"""A MACE model behind pair_style ltau: costs printed side by side in one run (CPU, one thread/rank).

1. Bridge overhead: LAMMPS step time with `pair_style ltau` (1 rank; the graph is folded onto the
   local atoms, so the model sees exactly MACE's periodic graph) divided by MACE's own
   forward + backward (`model(batch, compute_force=True)`) on the same atoms and graph.
2. Message passing on 2 ranks (--rank-cells, ~1000 atoms per rank by default), both ways in one
   mpirun, interleaved: `message_passing exchange` (one cutoff of ghosts, ghost node features
   exchanged after each layer: layers run on the local atoms) and `message_passing shell` (ghosts
   out to the receptive field, every layer also on them): step time, nodes per layer / atoms,
   their ratio, the largest force difference between the two (by atom ID, same trajectory), and
   the speed-up over 1 rank (folded graph) on the same atoms.
3. fix ltau cost: step time with `fix ltau every 1` and `every 10` over the step without it, and
   LTAU's extra cost per evaluated step against the extra cost of a 5-member MACE ensemble
   (4 more force calls of the same model per step, taken as 4 x MACE's own forward+backward).

Interleaved rounds, the fastest counts (shared machines are noisy). The estimator has --entries
synthetic entries: the model's own latent features of rattled / heated Si replicated with noise
(examples/mace_si/ has the real one; pass it with --estimator).

Usage: python benchmarks/lammps_mace.py [--model FILE.model --allow-pickle] [--estimator DIR]
       [--cells 5] [--rank-cells 6] [--steps 10] [--rounds 3] [--entries 100000] [--index hnsw]
A MACE .model is a pickled module (loading it runs code from the file): a --model of yours is
loaded only with --allow-pickle; without --model the script builds and uses a random MACE.
(the venv's bin first in PATH, so that `mpirun` is MPICH's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from si_cell import loop_time, ltau_pair, si_script, synthetic_estimator_arrays  # noqa: E402


def random_mace(path: Path) -> Path:
    """A randomly initialised MACE of the example's size (16 channels, L = 0, r_max 4 A, 2 layers)."""
    import numpy as np
    import torch
    from mace import modules  # before e3nn: mace lets e3nn 0.4.4 load its constants with torch >= 2.6
    from e3nn import o3

    if not path.is_file():
        torch.manual_seed(0)
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=4.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3, interaction_cls=block,
            interaction_cls_first=block, num_interactions=2, num_elements=1,
            hidden_irreps=o3.Irreps("16x0e"), MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.array([-4.0]), avg_num_neighbors=16.0, atomic_numbers=[14],
            correlation=3, gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64],
            atomic_inter_scale=1.0, atomic_inter_shift=0.0)
        torch.save(model.double(), path)
    return path


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


def latent_pool(model):
    """The model's own latents of rattled / heated Si (0.02 - 0.25 A)."""
    import numpy as np
    import torch
    from ase.build import bulk

    from ltau_lmp.model import evaluate, neighbor_list, species_indices

    rng, pool = np.random.default_rng(0), []
    for amp in (0.02, 0.05, 0.1, 0.15, 0.25):
        atoms = bulk("Si", "diamond", a=5.431 * (1 + amp / 20), cubic=True) * (4, 4, 4)
        atoms.positions += rng.normal(0, amp, atoms.positions.shape)
        c, n, s = neighbor_list(atoms, model.card.cutoff)
        out = evaluate(model, torch.tensor(atoms.positions), torch.from_numpy(species_indices(atoms, list(model.card.species))),
                       torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms), forces=False)
        pool.append(out.latent.detach().numpy().astype(np.float32))
    return np.concatenate(pool)


def synthetic_estimator(model, entries: int, index: str, path: Path) -> Path:
    from ltau_lmp.estimator import LTAUEstimator

    if (path / "meta.json").is_file():
        return path
    desc, pdfs, edges = synthetic_estimator_arrays(latent_pool(model), entries)
    LTAUEstimator.build(desc, pdfs, bin_edges=edges, k=10, index=index,
                        metadata={"model_hash": model.card.model_hash, "synthetic": True}).save(path)
    return path


def step_times(model_file: str, estimator: str, cells: int, steps: int, rounds: int) -> dict:
    """1 rank: best step time without the fix, with every 1 and every 10 (interleaved)."""
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(cells, ltau_pair(model_file, "allow_pickle yes")))
    best = {"nofix": loop_time(lmp, 2), "every1": float("inf"), "every10": float("inf")}
    for _ in range(rounds):
        best["nofix"] = min(best["nofix"], loop_time(lmp, steps))
        for every in (1, 10):
            lmp.command(f"fix u all ltau {estimator} every {every}")
            best[f"every{every}"] = min(best[f"every{every}"], loop_time(lmp, max(steps, 10)))
            lmp.command("unfix u")
    best["natoms"] = lmp.get_natoms()
    lmp.close()
    return best


def worker(model_file: str, cells: int, steps: int, rounds: int, modes: list[str], out: str) -> None:
    """Under mpirun: one LAMMPS per message_passing mode, timed in interleaved rounds (best
    step time each), node counts per layer summed over ranks, and each mode's final forces."""
    import numpy as np
    from mpi4py import MPI

    from ltau_lmp.lammps.driver import create_lammps

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


def mpi_run(nprocs: int, model_file: str, cells: int, steps: int, rounds: int, modes: list[str], tmp: Path) -> dict:
    out = tmp / f"np{nprocs}.json"
    cmd = ["mpirun", "-np", str(nprocs), sys.executable, __file__, "--worker", "--allow-pickle",
           "--model", model_file, "--rank-cells", str(cells), "--steps", str(steps), "--rounds", str(rounds),
           "--modes", ",".join(modes), "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a MACE .model file (default: a random MACE built here)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="load --model although it is a pickled module (it runs code from the file)")
    ap.add_argument("--estimator", help="an estimator of that model (default: synthetic, --entries)")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--index", default="hnsw", help="index kind of the synthetic estimator")
    ap.add_argument("--cells", type=int, default=5, help="diamond cells per side (8 atoms each)")
    ap.add_argument("--rank-cells", type=int, default=6,
                    help="cells per side of the 1- vs 2-rank comparison (6: 1728 atoms, 864 per rank)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
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
    model = args.model or str(random_mace(cache / "random_mace.model"))
    if args.worker:
        worker(model, args.rank_cells, args.steps, args.rounds, args.modes.split(","), args.out)
        return
    from ltau_lmp.model import load_model

    adapter = load_model(model, family="mace", allow_pickle=True)   # the user's opt-in, or our own file
    card = adapter.card
    estimator = args.estimator or str(synthetic_estimator(
        adapter, args.entries, args.index, cache / f"est_{card.model_hash[:12]}_{args.entries}_{args.index}"))
    print(f"# model {model}: {card.latent}; receptive field {card.receptive_field:g} A; estimator {estimator}")

    own = mace_own_time(adapter, args.cells, args.rounds)
    one = step_times(model, estimator, args.cells, args.steps, args.rounds)
    one_rank = mpi_run(1, model, args.rank_cells, args.steps, args.rounds, ["exchange"], cache)
    two = mpi_run(2, model, args.rank_cells, args.steps, args.rounds, ["exchange", "shell"], cache)
    natoms = one["natoms"]
    ltau_per_eval = one["every1"] - one["nofix"]
    ensemble_extra = 4 * own
    print(f"\natoms {natoms}, {os.environ['OMP_NUM_THREADS']} thread(s) per rank, best of {args.rounds} rounds\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| MACE's own forward + backward | {own * 1e3:.1f} ms |")
    print(f"| LAMMPS step, pair_style ltau, 1 rank (folded graph) | {one['nofix'] * 1e3:.1f} ms |")
    print(f"| **bridge overhead** (step / MACE's own) | **{one['nofix'] / own:.3f}** |")
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
    print(f"| fix ltau every 1 | +{100 * (one['every1'] / one['nofix'] - 1):.1f} % |")
    print(f"| fix ltau every 10 | +{100 * (one['every10'] / one['nofix'] - 1):.1f} % |")
    print(f"| LTAU per evaluation / 5-member ensemble extra (4 x MACE) | {ltau_per_eval / ensemble_extra:.4f} |")


if __name__ == "__main__":
    main()
