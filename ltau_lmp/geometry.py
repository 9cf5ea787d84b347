"""LAMMPS box <-> ASE cell, in one place (numpy and ASE only: no torch, no lammps import).

LAMMPS boxes are lower-triangular prisms (``a`` along x, ``b`` in the xy plane) at an origin
``(xlo, ylo, zlo)``; an ASE cell is any three row vectors. ``ase.calculators.lammps.Prism``
does the rotation between the two frames; this module adds the checks and the box layouts
that the data generator, the reference labels and ``fix ltau`` exchange with LAMMPS.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.lammps import Prism
from ase.stress import voigt_6_to_full_3x3_stress

from ltau_lmp.errors import LTAUError

# LAMMPS orders symmetric tensors (pressure, per-atom virial) xx yy zz xy xz yz, Voigt xx yy zz yz xz xy.
_LAMMPS_TO_VOIGT = (0, 1, 2, 5, 4, 3)


def cell_to_lammps(cell) -> tuple[np.ndarray, np.ndarray]:
    """LAMMPS prism ``(lx, ly, lz, xy, xz, yz)`` of an ASE cell and the rotation ``q`` into it.

    ``cell @ q`` is the lower-triangular LAMMPS cell; vectors (positions, forces) go to LAMMPS
    as ``v @ q`` and back as ``v @ q.T``, tensors back as ``q @ t @ q.T``. A left-handed or
    flat cell has no LAMMPS box (a rotation cannot make its diagonal positive), so it is refused.
    """
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3) or not np.linalg.det(cell) > 0:
        raise LTAUError("the cell must be right-handed with a positive volume for LAMMPS "
                        f"(got cell {cell.tolist()})")
    prism = Prism(cell)
    return prism.get_lammps_prism(), prism.rot_mat


def lammps_box_to_cell(box) -> tuple[np.ndarray, np.ndarray]:
    """LAMMPS box ``xlo ylo zlo xhi yhi zhi xy xz yz`` -> ASE cell rows (3, 3) and the origin (3,).

    Positions in the cell's frame are LAMMPS positions minus the origin.
    """
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (9,):
        raise LTAUError(f"a LAMMPS box has 9 numbers (xlo ylo zlo xhi yhi zhi xy xz yz), got shape {box.shape}")
    lo = box[:3].copy()
    lx, ly, lz = box[3:6] - lo
    xy, xz, yz = box[6:9]
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]]), lo


def lammps_tensor_to_3x3(values) -> np.ndarray:
    """Symmetric 3x3 tensor(s) from LAMMPS's 6-component order xx yy zz xy xz yz (last axis)."""
    return voigt_6_to_full_3x3_stress(np.asarray(values)[..., _LAMMPS_TO_VOIGT])
