"""LAMMPS box <-> ASE cell: rotations, round trips, LAMMPS's own reading of the box."""

import numpy as np
import pytest
from ase.build import bulk
from scipy.spatial.transform import Rotation

from ltau_lmp.data.reference import PotentialSpec, new_lammps, setup_system
from ltau_lmp.errors import LTAUError
from ltau_lmp.geometry import cell_to_lammps, lammps_box_to_cell, lammps_tensor_to_3x3


def random_cells(n=20, seed=0):
    """Right-handed triclinic cells in arbitrary orientation (not lower triangular)."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        lower = np.tril(rng.uniform(-3.0, 3.0, (3, 3)), -1) + np.diag(rng.uniform(2.0, 8.0, 3))
        yield lower @ Rotation.random(random_state=k).as_matrix().T


def box9(prism, origin=(0.0, 0.0, 0.0)):
    lx, ly, lz, xy, xz, yz = prism
    lo = np.asarray(origin)
    return np.r_[lo, lo + [lx, ly, lz], xy, xz, yz]


def test_rotation_into_the_lammps_frame_round_trips():
    for cell in random_cells():
        prism, q = cell_to_lammps(cell)
        np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(q) == pytest.approx(1.0, abs=1e-12)
        lammps_cell, origin = lammps_box_to_cell(box9(prism))
        np.testing.assert_allclose(cell @ q, lammps_cell, atol=1e-12)
        np.testing.assert_array_equal(origin, 0.0)
        # the unique lower-triangular factor with positive diagonal (the pre-ASE implementation)
        np.testing.assert_allclose(lammps_cell, np.linalg.cholesky(cell @ cell.T), atol=1e-12)
        v = np.random.default_rng(1).normal(size=(5, 3))
        np.testing.assert_allclose(v @ q @ q.T, v, atol=1e-12)


def test_lower_triangular_cell_needs_no_rotation():
    cell = np.array([[5.0, 0.0, 0.0], [1.2, 4.0, 0.0], [-0.7, 0.9, 6.0]])
    prism, q = cell_to_lammps(cell)
    np.testing.assert_allclose(q, np.eye(3), atol=1e-15)
    np.testing.assert_allclose(prism, [5.0, 4.0, 6.0, 1.2, -0.7, 0.9], atol=1e-15)


def test_box_with_an_origin():
    cell, origin = lammps_box_to_cell([-1.0, 2.0, 0.5, 4.0, 6.0, 7.5, 0.3, -0.2, 0.1])
    np.testing.assert_array_equal(origin, [-1.0, 2.0, 0.5])
    np.testing.assert_array_equal(cell, [[5.0, 0.0, 0.0], [0.3, 4.0, 0.0], [-0.2, 0.1, 7.0]])
    with pytest.raises(LTAUError, match="9 numbers"):
        lammps_box_to_cell([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_left_handed_or_flat_cells_are_refused():
    with pytest.raises(LTAUError, match="right-handed"):
        cell_to_lammps(np.diag([3.0, 3.0, -3.0]))
    with pytest.raises(LTAUError, match="positive volume"):
        cell_to_lammps(np.array([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]]))


def test_lammps_tensor_order():
    xx, yy, zz, xy, xz, yz = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0
    expected = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    np.testing.assert_array_equal(lammps_tensor_to_3x3([xx, yy, zz, xy, xz, yz]), expected)
    batch = lammps_tensor_to_3x3(np.tile([xx, yy, zz, xy, xz, yz], (4, 1)))
    assert batch.shape == (4, 3, 3)
    np.testing.assert_array_equal(batch[2], expected)


def test_lammps_reads_back_the_box_it_was_given():
    """ASE cell -> LAMMPS region -> extract_box -> cell: the rotated cell and positions come back."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    atoms.set_cell(next(random_cells(1, seed=4)) * 1.6, scale_atoms=True)
    lmp = new_lammps()
    try:
        q = setup_system(lmp, atoms, PotentialSpec())
        boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
        cell, origin = lammps_box_to_cell([*boxlo, *boxhi, xy, xz, yz])
        x = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3)).reshape(len(atoms), 3) - origin
    finally:
        lmp.close()
    np.testing.assert_allclose(cell, atoms.cell.array @ q, atol=1e-12)
    lattice_steps = np.linalg.solve(atoms.cell.array.T, (x @ q.T - atoms.positions).T).T  # LAMMPS wraps
    np.testing.assert_allclose(lattice_steps, np.round(lattice_steps), atol=1e-9)
