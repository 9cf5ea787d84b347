"""ASE calculator: energies, forces, stress of a ltau_lmp model, plus per-atom LTAU uncertainty."""

from __future__ import annotations

import os

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.model import LocalForceField, evaluate, load_model, neighbor_list, species_indices


class LTAUCalculator(Calculator):
    """ASE calculator for a ``LocalForceField`` with optional LTAU uncertainty.

    ``model``: a model or a model file; ``estimator``: an ``LTAUEstimator`` or its path, built
    from this model's latent features (checked through its ``model_hash`` metadata). With an
    estimator, ``results`` also holds per-atom ``uncertainty`` (expected force error, eV/Angstrom),
    ``uncertainty_ci`` (n, 2) for the quantiles ``ci`` and ``knn_distance``. ``latent`` is always
    stored. Stress (ASE convention, eV/Angstrom^3) is only given for fully periodic cells.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model: LocalForceField | str | os.PathLike, estimator=None,
                 ci: tuple[float, float] = (0.05, 0.95), **kwargs):
        super().__init__(**kwargs)
        self.model = model if isinstance(model, torch.nn.Module) else load_model(model)
        self.model.eval()
        lo, hi = (float(q) for q in ci)
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"ci must be two quantiles 0 <= lo < hi <= 1, got {ci}")
        self.ci = (lo, hi)
        if estimator is not None and not hasattr(estimator, "query"):
            from ltau_lmp.estimator import LTAUEstimator
            estimator = LTAUEstimator.load(estimator)
        if estimator is not None:
            expected = estimator.metadata.get("model_hash")
            if expected is not None and expected != self.model.model_hash:
                raise LTAUError(f"estimator was built for model {expected[:12]}..., but this model is "
                                f"{self.model.model_hash[:12]}...: rebuild the estimator for this model")
        self.estimator = estimator

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        centers, neighbors, shifts = neighbor_list(atoms, self.model.cutoff)
        species = species_indices(atoms, self.model.species)
        periodic = bool(np.all(atoms.pbc))
        out = evaluate(self.model, torch.from_numpy(atoms.positions.copy()), torch.from_numpy(species),
                       torch.from_numpy(centers), torch.from_numpy(neighbors), torch.from_numpy(shifts),
                       len(atoms), forces=True, virial=periodic)
        energies = out.atom_energy.numpy().astype(np.float64)
        latent = out.latent.numpy()
        self.results = {
            "energies": energies,
            "energy": float(energies.sum()),
            "free_energy": float(energies.sum()),
            "forces": out.forces.numpy().astype(np.float64),
            "latent": latent,
        }
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(-out.virial.numpy() / atoms.get_volume())
        if self.estimator is not None:
            res = self.estimator.query(np.ascontiguousarray(latent, dtype=np.float32))
            self.results["uncertainty"] = np.asarray(res.expected, dtype=np.float64)
            self.results["uncertainty_ci"] = np.asarray(res.interval(*self.ci), dtype=np.float64)
            self.results["knn_distance"] = np.asarray(res.distance, dtype=np.float64)
