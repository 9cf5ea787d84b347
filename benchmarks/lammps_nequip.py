"""NequIP on 2 MPI ranks: `message_passing exchange` against `message_passing shell`, side by side.

Both modes run in one mpirun (one LAMMPS instance each, timed in interleaved rounds, the fastest
counts: shared machines are noisy), plus one rank (the folded periodic graph) as reference:
step time, rows per convolution / atoms (both modes run the node-wise work on the ghost rows
too), pair centres / atoms (the exchange gathers messages on the local atoms only, the shell on
every ghost too), and the largest force difference between the modes by atom ID after the same
steps.

Usage (.venv-nequip, its bin first in PATH so that `mpirun` is its MPICH):
    python benchmarks/lammps_nequip.py [--model runs/nequip_demo/nequip/ltau/model.ckpt]
        [--cells 6] [--steps 3] [--rounds 2]
The default model is the one `make demo-nequip` trains (2 convolutions, l_max 1, 8 features,
r_max 4 A).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from si_cell import loop_time, ltau_pair, si_script  # noqa: E402


def worker(args) -> None:
    import numpy as np
    from mpi4py import MPI

    from ltau_lmp.lammps.driver import create_lammps

    comm, modes = MPI.COMM_WORLD, args.modes.split(",")
    runs = {}
    for mode in modes:
        runs[mode] = create_lammps(log="none", screen=False)
        runs[mode].commands_string(si_script(args.cells, ltau_pair(args.model, f"message_passing {mode}")))
    best = {mode: float("inf") for mode in modes}
    for _ in range(args.rounds + 1):    # the first round warms up; every instance runs the same steps
        for mode, lmp in runs.items():
            best[mode] = min(best[mode], loop_time(lmp, args.steps))
    result = {"natoms": runs[modes[0]].get_natoms(), "modes": {}}
    forces = {}
    for mode, lmp in runs.items():
        nlocal, nghost = lmp.extract_global("nlocal"), lmp.extract_global("nghost")
        # one rank folds the graph onto its atoms; on several, every node-wise stage runs on the
        # ghost rows too, and the shell also gathers messages on them
        rows = nlocal + nghost if comm.Get_size() > 1 else nlocal
        centres = rows if mode == "shell" else nlocal
        result["modes"][mode] = {"step": best[mode], "rows": comm.allreduce(rows),
                                 "centres": comm.allreduce(centres), "ghosts": comm.allreduce(nghost)}
        forces[mode] = np.array(lmp.gather_atoms("f", 1, 3)).reshape(-1, 3)    # ordered by atom ID
        lmp.close()
    if comm.Get_rank() == 0:
        result["max_force_difference"] = float(np.abs(forces[modes[0]] - forces[modes[-1]]).max())
        Path(args.out).write_text(json.dumps(result))


def mpi_run(nprocs: int, modes: list[str], args) -> dict:
    out = Path(args.tmp) / f"np{nprocs}.json"
    subprocess.run(["mpirun", "-np", str(nprocs), sys.executable, __file__, "--worker", "--model", args.model,
                    "--cells", str(args.cells), "--steps", str(args.steps), "--rounds", str(args.rounds),
                    "--modes", ",".join(modes), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/nequip_demo/nequip/ltau/model.ckpt")
    ap.add_argument("--cells", type=int, default=6, help="diamond cells per side (6: 1728 atoms, 864 per rank)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="exchange", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = str(Path(args.model).resolve())
    if args.worker:
        worker(args)
        return
    one = mpi_run(1, ["exchange"], args)
    two = mpi_run(2, ["exchange", "shell"], args)
    n, ref = two["natoms"], one["modes"]["exchange"]["step"]
    print(f"\n{n} atoms, {os.environ['OMP_NUM_THREADS']} thread(s) per rank, best of {args.rounds} rounds "
          f"of {args.steps} steps\n")
    print("| | step time | rows per convolution / atoms (ghosts / atoms) | pair centres / atoms | "
          "speed-up over 1 rank |\n|---|---:|---:|---:|---:|")
    print(f"| 1 rank (folded graph) | {ref * 1e3:.0f} ms | 1.00 (0) | 1.00 | 1.00 |")
    for mode in ("exchange", "shell"):
        r = two["modes"][mode]
        print(f"| 2 ranks, {mode} | {r['step'] * 1e3:.0f} ms | {r['rows'] / n:.2f} ({r['ghosts'] / n:.2f}) | "
              f"{r['centres'] / n:.2f} | {ref / r['step']:.2f} |")
    print(f"\nexchange speed-up over shell: {two['modes']['shell']['step'] / two['modes']['exchange']['step']:.2f}; "
          f"max force difference exchange vs shell: {two['max_force_difference']:.1e} eV/A")


if __name__ == "__main__":
    main()
