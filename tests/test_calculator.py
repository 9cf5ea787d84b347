"""The ASE calculator: consistency with the model, stress, uncertainty outputs, MD."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.md.verlet import VelocityVerlet

from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.model import LocalForceField, evaluate, neighbor_list, save_model, species_indices


def si_cell(rattle=0.1, seed=0):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle, atoms.positions.shape)
    return atoms


@pytest.fixture(scope="module")
def model():
    model = LocalForceField(["Si"], seed=0)
    atoms = si_cell(seed=99).repeat((2, 1, 1))
    c, n, s = neighbor_list(atoms, model.cutoff)
    model.fit_normalization(model.descriptors(
        torch.tensor(atoms.positions), torch.zeros(len(atoms), dtype=torch.int64),
        torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms)))
    return model


@pytest.fixture(scope="module")
def estimator(model):
    calc = LTAUCalculator(model)
    latent = []
    for seed in range(4):
        atoms = si_cell(seed=seed)
        atoms.calc = calc
        atoms.get_potential_energy()
        latent.append(calc.results["latent"])
    latent = np.concatenate(latent)
    edges = np.logspace(-3, 1, 21)
    pdfs = np.random.default_rng(0).dirichlet(np.ones(20), size=len(latent))
    return LTAUEstimator.build(latent, pdfs, bin_edges=edges, index="flat", k=5,
                               metadata={"model_hash": model.model_hash, "units": "eV/Angstrom"})


def test_energy_forces_match_the_model(model):
    atoms = si_cell(seed=5)
    atoms.calc = LTAUCalculator(model)
    c, n, s = neighbor_list(atoms, model.cutoff)
    out = evaluate(model, torch.tensor(atoms.positions), torch.from_numpy(species_indices(atoms, model.species)),
                   torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms))
    np.testing.assert_allclose(atoms.get_potential_energies(), out.atom_energy.numpy(), atol=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), out.forces.numpy(), atol=1e-12)
    assert atoms.get_potential_energy() == pytest.approx(out.atom_energy.sum().item(), abs=1e-10)
    assert atoms.calc.get_property("free_energy") == atoms.get_potential_energy()
    assert atoms.calc.results["latent"].shape == (len(atoms), model.latent_dim)
    assert "uncertainty" not in atoms.calc.results


def test_stress_is_strain_derivative_of_energy(model):
    atoms = si_cell(seed=6)
    atoms.set_cell(atoms.cell.array @ np.array([[1.02, 0.01, 0.0], [0.0, 0.98, 0.03], [0.0, 0.0, 1.0]]),
                   scale_atoms=True)
    atoms.calc = LTAUCalculator(model)
    stress = atoms.get_stress()
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, numerical, atol=1e-7)


def test_no_stress_without_periodic_cell(model):
    atoms = Atoms("Si3", positions=[[0, 0, 0], [2.3, 0, 0], [0, 2.4, 0.2]])
    atoms.calc = LTAUCalculator(model)
    assert np.isfinite(atoms.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_uncertainty_outputs(model, estimator, tmp_path):
    atoms = si_cell(rattle=0.3, seed=7)
    atoms.calc = LTAUCalculator(model, estimator, ci=(0.1, 0.9))
    atoms.get_forces()
    res = atoms.calc.results
    direct = estimator.query(res["latent"].astype(np.float32))
    np.testing.assert_allclose(res["uncertainty"], direct.expected)
    np.testing.assert_allclose(res["uncertainty_ci"], direct.interval(0.1, 0.9))
    np.testing.assert_allclose(res["knn_distance"], direct.distance)
    assert res["uncertainty_ci"].shape == (len(atoms), 2)
    assert np.all(res["uncertainty_ci"][:, 0] <= res["uncertainty_ci"][:, 1])

    # the same from files
    save_model(model, tmp_path / "model.pt")
    estimator.save(tmp_path / "est")
    atoms.calc = LTAUCalculator(tmp_path / "model.pt", tmp_path / "est", ci=(0.1, 0.9))
    atoms.get_forces()
    np.testing.assert_allclose(atoms.calc.results["uncertainty"], res["uncertainty"], rtol=1e-6)


def test_estimator_for_another_model_is_refused(model, estimator):
    with pytest.raises(LTAUError, match="rebuild the estimator"):
        LTAUCalculator(LocalForceField(["Si"], seed=1), estimator)
    with pytest.raises(ConfigError):
        LTAUCalculator(model, estimator, ci=(0.9, 0.1))


def test_velocity_verlet_conserves_energy(model, estimator):
    atoms = si_cell(rattle=0.05, seed=8).repeat((2, 1, 1))
    atoms.calc = LTAUCalculator(model, estimator)
    kT = 300 * units.kB
    sigma = np.sqrt(kT / atoms.get_masses())[:, None]
    atoms.set_velocities(np.random.default_rng(0).normal(size=(len(atoms), 3)) * sigma)
    e0 = atoms.get_total_energy()
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(20)
    assert atoms.calc.results["uncertainty"].shape == (len(atoms),)
    assert abs(atoms.get_total_energy() - e0) < 1e-3 * len(atoms)
