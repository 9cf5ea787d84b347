"""Cells and checks shared by the model-family adapter tests (MACE in the main environment,
NequIP/Allegro in .venv-nequip): the same contract, tested the same way for every family."""

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

from ltau_lmp.model import evaluate, neighbor_list, species_indices


def lammps_results(script: str, per_atom: bool = False) -> dict:
    """Run ``script`` (ending in ``run 0``) in one LAMMPS and read back, atoms in ID order: energy,
    forces, pressure (bar, the virial alone without velocities), the bar -> eV/A^3 factor nktv2p,
    volume; with ``per_atom`` also the computes ``pe`` (pe/atom) and ``s`` (stress/atom)."""
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)
    try:
        lmp.commands_string(script)
        n = lmp.extract_global("nlocal")
        order = np.argsort(lmp.numpy.extract_atom("id")[:n])
        result = {
            "energy": lmp.get_thermo("pe"),
            "forces": lmp.numpy.extract_atom("f")[:n][order].copy(),
            "pressure": np.array([lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]),
            "nktv2p": lmp.extract_global("nktv2p"),
            "volume": lmp.get_thermo("vol"),
        }
        if per_atom:
            result["energies"] = lmp.numpy.extract_compute("pe", 1, 1)[:n][order].copy()
            result["stress_atom"] = lmp.numpy.extract_compute("s", 1, 2)[:n][order].copy()
    finally:
        lmp.close()
    return result


def si_c_cell(repeat=(1, 1, 1), rattle=0.1, seed=0, cubic=True):
    """Strained, rattled diamond Si with every fifth atom C: two species, no symmetry left."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=cubic).repeat(repeat)
    rng = np.random.default_rng(seed)
    atoms.symbols[::5] = "C"
    atoms.set_cell(atoms.cell @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))), scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    return atoms


def inputs(model, atoms):
    """The forward contract's arguments for a periodic cell (shift-based neighbour list)."""
    c, n, s = neighbor_list(atoms, model.card.cutoff)
    return (torch.tensor(atoms.positions), torch.from_numpy(species_indices(atoms, list(model.card.species))),
            torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms))


def explicit_images(atoms, reach):
    """Local atoms then every periodic image within ``reach`` of one of them (no shifts needed)."""
    heights = atoms.get_volume() / np.linalg.norm(np.cross(atoms.cell[[1, 2, 0]], atoms.cell[[2, 0, 1]]), axis=1)
    m = np.ceil(reach / heights).astype(int) + 1
    grid = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in m), indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.argsort(np.abs(grid).sum(1), kind="stable")]  # (0, 0, 0) first: the local atoms
    images = (grid @ atoms.cell.array)[:, None, :] + atoms.positions[None]  # (n_images, n, 3)
    distance = np.linalg.norm(images.reshape(-1, 1, 3) - atoms.positions[None], axis=2).min(1)
    keep = np.flatnonzero(distance < reach)
    positions = images.reshape(-1, 3)[keep]
    owners = keep % len(atoms)
    assert np.array_equal(owners[:len(atoms)], np.arange(len(atoms)))
    return Atoms(numbers=atoms.numbers[owners], positions=positions, pbc=False), owners


def check_shift_gradient_gives_pair_forces(adapter, atoms):
    """The contract's ``evaluate`` (and so the LAMMPS runtime) differentiates w.r.t. the per-pair
    offsets (``shifts``) and scatters that gradient onto both atoms of each pair: that must give
    the forces -dE/dpositions."""
    positions, species, c, n, s, n_local = inputs(adapter, atoms)
    positions.requires_grad_()
    atom_energy, _ = adapter(positions, species, c, n, s, n_local)
    (grad,) = torch.autograd.grad(atom_energy.sum(), positions)
    expected = -grad
    out = evaluate(adapter, positions.detach(), species, c, n, s, n_local)
    forces = torch.zeros(len(atoms), 3, dtype=torch.float64)
    forces.index_add_(0, c, out.pair_gradient).index_add_(0, n, -out.pair_gradient)  # r_ij = x_j - x_i + s_ij
    assert torch.equal(forces, out.forces)
    assert torch.abs(forces - expected).max() <= 1e-12 * torch.abs(expected).max()


class Touch:
    """Unpickling this object creates a file: the marker shows whether a refused file ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)
