"""``ltau-lmp run in.lammps [-var NAME VALUE ...] [-log FILE]``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a LAMMPS input script with pair_style ltau / fix ltau (works under mpirun)",
        description="Run a LAMMPS input script with the ltau plugin loaded. Under "
                    "`mpirun -np N ltau-lmp run in.lammps` each rank runs a Python runtime.")
    p.add_argument("script", help="LAMMPS input script")
    p.add_argument("-var", "-v", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   dest="variables", help="define an index variable, as lmp -var (repeatable)")
    p.add_argument("-log", "-l", default=None, metavar="FILE",
                   help="LAMMPS log file (default log.lammps; 'none' for no log)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from ltau_lmp.errors import LTAUError
    from ltau_lmp.lammps.driver import run

    try:
        run(args.script, [tuple(v) for v in args.variables], args.log)
    except LTAUError as exc:  # every rank gets it; say it once
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"ltau-lmp run: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
