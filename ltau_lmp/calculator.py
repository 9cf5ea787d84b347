"""ASE calculator: energies, forces, stress of a force field, plus per-atom LTAU uncertainty.

It follows ASE's calculator protocol: every result is named in ``implemented_properties`` (so
``calc.get_property(name, atoms)`` works for the extra outputs too), a call computes only what
was asked for and keeps what is still valid, and it raises ASE's exception types: ``InputError``
for a bad set-up or structure (``CalculatorInputError``), ``PropertyNotImplementedError`` for a
property this set-up cannot give, ``CalculationFailed`` when the model's energies or forces are not
finite (``CalculatorFailedError``); the two ltau_lmp classes are also ``LTAUError`` (one CLI line).
The model is used only through the contract's ``evaluate`` (``ltau_lmp.model.contract``) and its
``card`` (species, cutoff, hash), so every family behind the model contract works. The neighbour
list is the full periodic list with image shifts over all atoms, which is MACE's own graph too: a
message-passing model sees periodic images through the shifts, so no ghost atoms are needed.
"""

from __future__ import annotations

import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import (CalculationFailed, Calculator, InputError, PropertyNotImplementedError,
                                         all_changes)
from ase.outputs import Properties, all_outputs
from ase.stress import full_3x3_to_voigt_6_stress

from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.calibration import NO_REFERENCE
from ltau_lmp.model import load_model, neighbor_list, species_indices
from ltau_lmp.model.contract import evaluate, non_finite

MODEL_PROPERTIES = ("energy", "free_energy", "energies", "forces", "latent")  # one model pass
UNCERTAINTY_PROPERTIES = ("uncertainty", "uncertainty_ci", "knn_distance")    # one estimator query
OOD_PROPERTY = "ood_pvalue"  # from knn_distance: needs an estimator calibrated on held-out atoms


class CalculatorInputError(InputError, LTAUError):
    """Bad input or set-up: ASE's ``InputError``, and an ``LTAUError`` so the CLI prints one line."""


class CalculatorFailedError(CalculationFailed, LTAUError):
    """The model gave NaN or inf energies or forces: ASE's ``CalculationFailed``, and an ``LTAUError``."""


def _atom_list(indices: np.ndarray) -> str:
    """``atom(s) 3, 7, ...`` (0-based ASE indices), at most 10 named."""
    shown = ", ".join(str(i) for i in indices[:10])
    return f"atom(s) {shown}" + (f", ... ({len(indices)} in all)" if len(indices) > 10 else "")


@contextmanager
def _as_input_error():
    """Re-raise the package's user-facing errors as the ASE type callers of a calculator expect."""
    try:
        yield
    except LTAUError as exc:
        raise CalculatorInputError(str(exc)) from None


@dataclass
class _PairCache:
    """A neighbour list built out to cutoff + skin, valid while no atom moved more than skin / 2.

    With the cell, pbc and atoms unchanged, a pair (i, j, shift) now closer than the cutoff was
    closer than cutoff + skin when the list was built (each end moved at most skin / 2).
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    centers: np.ndarray
    neighbors: np.ndarray
    shifts: np.ndarray

    @classmethod
    def build(cls, atoms: Atoms, cutoff: float, skin: float) -> "_PairCache":
        with _as_input_error():
            centers, neighbors, shifts = neighbor_list(atoms, cutoff + skin)
        return cls(atoms.positions.copy(), atoms.numbers.copy(), atoms.cell.array.copy(),
                   atoms.pbc.copy(), centers, neighbors, shifts)

    def valid_for(self, atoms: Atoms, skin: float) -> bool:
        if not (np.array_equal(atoms.numbers, self.numbers) and np.array_equal(atoms.cell.array, self.cell)
                and np.array_equal(atoms.pbc, self.pbc)):
            return False
        moved = np.linalg.norm(atoms.positions - self.positions, axis=1)
        return 2.0 * moved.max(initial=0.0) <= skin

    def within(self, positions: np.ndarray, cutoff: float):
        """The pairs closer than ``cutoff``: the others contribute exactly 0 at full model cost."""
        r = np.linalg.norm(positions[self.neighbors] - positions[self.centers] + self.shifts, axis=1)
        keep = r < cutoff
        return self.centers[keep], self.neighbors[keep], self.shifts[keep]


class LTAUCalculator(Calculator):
    """ASE calculator for a force field with optional LTAU uncertainty.

    ``model``: a model honouring the model contract (it has a ``card``) or a model file, loaded by
    ``load_model(model, family=family, allow_pickle=allow_pickle)`` (a MACE ``.model`` needs
    ``allow_pickle=True``); ``estimator``: an ``LTAUEstimator`` or its directory, built from this
    model's latent features (checked against the card: latent dimension and hash).
    Properties: ``energy``, ``free_energy``, ``energies``, ``forces``, ``latent`` (per-atom latent
    features) from one model pass; ``stress`` (ASE convention, eV/Angstrom^3; fully periodic cells
    only) adds the virial to that pass; with an estimator, ``uncertainty`` (expected force error,
    eV/Angstrom), ``uncertainty_ci`` (n, 2) between the quantiles ``ci`` and ``knn_distance``
    come from one estimator query on the latent features; ``ood_pvalue`` (per-atom conformal
    out-of-domain p-value, small = unusual) follows from ``knn_distance`` when the estimator was
    calibrated on held-out atoms (``estimator.has_ood_reference``). The neighbour list is built out
    to ``cutoff + skin`` (Angstrom) and reused until an atom moved more than ``skin / 2`` or the
    atoms, cell or pbc changed.
    """

    implemented_properties = [*MODEL_PROPERTIES, "stress", *UNCERTAINTY_PROPERTIES, OOD_PROPERTY]

    def __init__(self, model: torch.nn.Module | str | os.PathLike, estimator=None, allow_pickle: bool = False,
                 family: str | None = None, ci: tuple[float, float] = (0.05, 0.95), skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, (torch.nn.Module, str, os.PathLike)):
            raise CalculatorInputError(f"model must be a loaded model or a model file, got {type(model).__name__}")
        with _as_input_error():
            self.model = model if isinstance(model, torch.nn.Module) else load_model(
                model, family=family, allow_pickle=allow_pickle)
        if not hasattr(self.model, "card"):
            raise CalculatorInputError(
                f"{type(self.model).__name__} has no model card, so it does not honour the ltau_lmp model contract: "
                f"load a file with ltau_lmp.model.load_model, or wrap a MACE module in MACEForceField")
        self.model.eval()
        self.card = self.model.card
        try:
            lo, hi = (float(q) for q in ci)
        except (TypeError, ValueError):  # not two numbers
            lo = hi = float("nan")
        if not 0.0 <= lo < hi <= 1.0:
            raise CalculatorInputError(f"ci must be two quantiles 0 <= lo < hi <= 1, got {ci!r}")
        self.ci = (lo, hi)
        if not (isinstance(skin, numbers.Real) and skin >= 0.0):
            raise CalculatorInputError(f"skin must be a number >= 0 Angstrom, got {skin!r}")
        self.skin = float(skin)
        if estimator is not None:
            with _as_input_error():
                if isinstance(estimator, (str, os.PathLike)):
                    estimator = LTAUEstimator.load(estimator)
                if not isinstance(estimator, LTAUEstimator):
                    raise CalculatorInputError(f"estimator must be an LTAUEstimator or its directory, "
                                               f"got {type(estimator).__name__}")
                estimator.check_model(self.card)
        self.estimator = estimator
        self._pairs: _PairCache | None = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if system_changes:
            self.results = {}
        wanted = set(properties)
        needs_query = wanted & {*UNCERTAINTY_PROPERTIES, OOD_PROPERTY}
        if "stress" in wanted and not self.atoms.pbc.all():
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic in all three directions, this one has pbc={self.atoms.pbc.tolist()}")
        if needs_query and self.estimator is None:
            raise PropertyNotImplementedError(
                f"{', '.join(sorted(needs_query))} needs an LTAU estimator: LTAUCalculator(model, estimator=...)")
        if OOD_PROPERTY in wanted and not self.estimator.has_ood_reference:
            raise PropertyNotImplementedError(f"{OOD_PROPERTY}: {NO_REFERENCE}")
        if "forces" not in self.results or ("stress" in wanted and "stress" not in self.results):
            self._run_model(virial="stress" in wanted)
        if needs_query and "uncertainty" not in self.results:
            self._query_estimator()
        if OOD_PROPERTY in wanted and OOD_PROPERTY not in self.results:
            self.results[OOD_PROPERTY] = self.estimator.ood_pvalues(self.results["knn_distance"])

    def _run_model(self, virial: bool) -> None:
        """Energies, forces and latent features (and the virial when asked) in one pass."""
        atoms, cutoff = self.atoms, self.card.cutoff
        bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
        if len(bad) or not np.isfinite(atoms.cell.array).all():
            raise CalculatorInputError(f"{_atom_list(bad)} have non-finite positions" if len(bad) else
                                       f"the cell is not finite: {atoms.cell.array.tolist()}")
        with _as_input_error():
            species = species_indices(atoms, self.card.species)
        if self._pairs is None or not self._pairs.valid_for(atoms, self.skin):
            self._pairs = _PairCache.build(atoms, cutoff, self.skin)
        centers, neighbors, shifts = self._pairs.within(atoms.positions, cutoff)
        out = evaluate(self.model, torch.from_numpy(atoms.positions.copy()), torch.from_numpy(species),
                       torch.from_numpy(centers), torch.from_numpy(neighbors), torch.from_numpy(shifts),
                       len(atoms), forces=True, virial=virial)
        found = non_finite(out, torch.from_numpy(centers), torch.from_numpy(neighbors))
        if found is not None:  # NaN would otherwise reach the caller as an energy, or the estimator as a latent
            raise CalculatorFailedError(f"the model gave non-finite (NaN or inf) energies or forces on "
                                        f"{_atom_list(found[1].numpy())}: overlapping atoms, or a structure far "
                                        f"outside the model's training data?")
        energies, forces = out.atom_energy.numpy().astype(np.float64), out.forces.numpy().astype(np.float64)
        self.results.update(energies=energies, energy=float(energies.sum()), free_energy=float(energies.sum()),
                            forces=forces, latent=out.latent.numpy())
        if virial:
            self.results["stress"] = full_3x3_to_voigt_6_stress(-out.virial.numpy() / atoms.get_volume())

    def _query_estimator(self) -> None:
        res = self.estimator.query(np.ascontiguousarray(self.results["latent"], dtype=np.float32))
        self.results.update(uncertainty=np.asarray(res.expected, dtype=np.float64),
                            uncertainty_ci=np.asarray(res.interval(*self.ci), dtype=np.float64),
                            knn_distance=np.asarray(res.distance, dtype=np.float64))

    def export_properties(self):
        """ASE's ``Properties`` knows only its standard outputs: leave the LTAU extras out of it."""
        return Properties({k: v for k, v in self.results.items() if k in all_outputs})

    def get_uncertainty(self, atoms=None) -> np.ndarray:
        """Per-atom expected force error (eV/Angstrom)."""
        return self.get_property("uncertainty", atoms)

    def get_uncertainty_ci(self, atoms=None) -> np.ndarray:
        """Per-atom (n, 2) force-error interval between the quantiles ``ci``."""
        return self.get_property("uncertainty_ci", atoms)

    def get_knn_distance(self, atoms=None) -> np.ndarray:
        """Per-atom mean latent distance to the k nearest training atoms (large = out of domain)."""
        return self.get_property("knn_distance", atoms)

    def get_ood_pvalue(self, atoms=None) -> np.ndarray:
        """Per-atom out-of-domain p-value: the fraction of held-out in-domain atoms at least as far
        from the training data (conformal; small = unusual, >= 1/(n_reference + 1))."""
        return self.get_property(OOD_PROPERTY, atoms)
