"""Deployed archives behind pair_style ltau (issue 24 targets), side by side in one run:

1. Bridge overhead: LAMMPS step time with `pair_style ltau` + `pair_coeff * * ARCHIVE Si` (1 rank,
   the graph folded onto the local atoms) over the archive's own documented forward + backward
   on the same atoms and graph (what pair_nequip / pair_allegro / pair_style mace call; for a
   metatomic export its ASE calculator's energy + forces). Target <= 1.10.
2. `--mpi`: 2 ranks, `message_passing exchange` (through the archive's own layers) against
   `message_passing shell` (ghosts out to the receptive field), interleaved in one mpirun, for the
   archives that take the exchange; their forces compared by atom ID.

Interleaved rounds, the fastest counts (shared machines are noisy). The archives default to the
fixtures in tests/data/archives (tiny models: the bridge's fixed costs weigh more than they would
against a production model).

Usage: python benchmarks/lammps_archives.py [--archives FILE ...] [--cells 4] [--steps 10] [--rounds 3]
       [--mpi --rank-cells 6]   (the venv's bin first in PATH, so that `mpirun` is MPICH's)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from si_cell import loop_time, ltau_pair, si_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ["nequip_si_compiled.nequip.pth", "allegro_si_compiled.nequip.pth", "nequip_si_deployed.pth",
            "allegro_si_deployed.pth", "mace_si.model-lammps.pt", "metatomic_si.pt"]
TARGET_BRIDGE = 1.10


def lammps_atoms(cells: int):
    """The benchmark's atoms as LAMMPS holds them after setup (the same rattled cell)."""
    import numpy as np
    from ase import Atoms

    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(cells, "pair_style zero 4.0\npair_coeff * *") + "\nrun 0 post no")
    n = lmp.extract_global("nlocal")
    boxlo, boxhi, *_ = lmp.extract_box()
    atoms = Atoms("Si" * n, positions=np.array(lmp.numpy.extract_atom("x")[:n]) - boxlo,
                  cell=np.diag(np.array(boxhi) - np.array(boxlo)), pbc=True)
    lmp.close()
    return atoms


def own_call(model, atoms):
    """A function running the archive's own documented forward + backward on ``atoms`` (its inputs
    prepared once, as a pair style keeps them between steps)."""
    import numpy as np
    import torch
    from ase.neighborlist import neighbor_list

    archive, family = model.archive if hasattr(model, "archive") else None, model.card.family
    if family == "metatomic":
        from metatomic_ase import MetatomicCalculator

        calc = MetatomicCalculator(model.path)

        def run():
            calc.reset()
            calc.get_forces(atoms)
        return run
    dtype = getattr(torch, model.card.dtype)
    i, j, shifts = neighbor_list("ijS", atoms, model.card.cutoff)
    pos, cell = torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.cell.array, dtype=dtype)
    n, edge_index = len(atoms), torch.tensor(np.stack([i, j]))
    if family in ("nequip", "allegro"):
        data = {"edge_index": edge_index, "atom_types": torch.zeros(n, dtype=torch.long), "cell": cell,
                "edge_cell_shift": torch.tensor(shifts, dtype=dtype)}
        return lambda: archive(dict(data, pos=pos.clone()))["forces"]
    unit = torch.tensor(shifts, dtype=dtype)
    data = {"edge_index": edge_index, "shifts": unit @ cell, "unit_shifts": unit, "cell": cell,
            "node_attrs": torch.ones(n, 1, dtype=dtype), "batch": torch.zeros(n, dtype=torch.long),
            "ptr": torch.tensor([0, n])}
    if hasattr(archive, "model"):  # LAMMPS_MACE, as pair_style mace calls it
        ones = torch.ones(n, dtype=dtype)
        return lambda: archive(dict(data, positions=pos.clone()), ones, compute_virials=False)["forces"]
    return lambda: archive(dict(data, positions=pos.clone()), training=False, compute_force=True)["forces"]


def best_of(function, rounds: int) -> float:
    function()  # warm-up (TorchScript profiles its first calls)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - t0)
    return best


def bridge(path: Path, cells: int, steps: int, rounds: int) -> dict:
    """One archive: its own forward + backward and the LAMMPS step, interleaved."""
    from ltau_lmp.lammps.driver import create_lammps
    from ltau_lmp.model import load_model

    model = load_model(path)
    model.path = str(path)
    atoms = lammps_atoms(cells)
    own = own_call(model, atoms)
    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(cells, ltau_pair(str(path))))
    loop_time(lmp, 1)
    best_own, best_step = float("inf"), float("inf")
    for _ in range(rounds):
        best_own = min(best_own, best_of(own, 1))
        best_step = min(best_step, loop_time(lmp, steps))
    lmp.close()
    return {"archive": path.name, "family": model.card.family, "natoms": len(atoms), "own": best_own,
            "step": best_step, "exchange": model.card.ghost_exchange}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archives", nargs="+", type=Path,
                    default=[ROOT / "tests" / "data" / "archives" / name for name in FIXTURES])
    ap.add_argument("--cells", type=int, default=4, help="diamond cells per side (4: 512 atoms)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mpi", action="store_true", help="also 2 ranks, exchange against shell")
    ap.add_argument("--rank-cells", type=int, default=6, help="cells per side of the 2-rank comparison")
    args = ap.parse_args()
    print(f"# {os.environ['OMP_NUM_THREADS']} thread(s); best of {args.rounds} rounds; target bridge <= {TARGET_BRIDGE}")
    print("| archive | family | atoms | own forward + backward | LAMMPS step | bridge overhead |\n|---|---|---:|---:|---:|---:|")
    results = []
    for path in args.archives:
        r = bridge(path, args.cells, args.steps, args.rounds)
        results.append(r)
        print(f"| {r['archive']} | {r['family']} | {r['natoms']} | {r['own'] * 1e3:.1f} ms | {r['step'] * 1e3:.1f} ms | "
              f"**{r['step'] / r['own']:.3f}** |", flush=True)
    if args.mpi:
        from lammps_mace import mpi_run, print_mpi

        args.allow_pickle = True
        for r, path in zip(results, args.archives):
            if not r["exchange"]:
                continue
            print(f"\n{r['archive']}, 2 ranks:\n\n| quantity | value |\n|---|---:|")
            with tempfile.TemporaryDirectory() as tmp:
                one = mpi_run(1, str(path), args, ["exchange"], Path(tmp))
                two = mpi_run(2, str(path), args, ["exchange", "shell"], Path(tmp))
            print_mpi(one, two)


if __name__ == "__main__":
    main()
