"""The ASE calculator: consistency with the model, stress, uncertainty outputs, ASE protocol, MD."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import CalculationFailed, InputError, PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.md.verlet import VelocityVerlet

import ltau_lmp.calculator as calculator_module
from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.errors import LTAUError
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


def _latents(model, seeds):
    calc = LTAUCalculator(model)
    latent = []
    for seed in seeds:
        atoms = si_cell(seed=seed)
        atoms.calc = calc
        atoms.get_potential_energy()
        latent.append(calc.results["latent"])
    return np.concatenate(latent)


@pytest.fixture(scope="module")
def estimator(model):
    """Training atoms from 4 rattled cells, held-out reference atoms from 3 others."""
    latent = _latents(model, range(4))
    edges = np.logspace(-3, 1, 21)
    pdfs = np.random.default_rng(0).dirichlet(np.ones(20), size=len(latent))
    return LTAUEstimator.build(latent, pdfs, bin_edges=edges, index="flat", k=5,
                               metadata={"model_hash": model.model_hash, "units": "eV/Angstrom"},
                               reference_descriptors=_latents(model, range(20, 23)))


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
    assert atoms.calc.get_uncertainty(atoms).shape == (len(atoms),)
    res = atoms.calc.results
    direct = estimator.query(res["latent"].astype(np.float32))
    np.testing.assert_allclose(res["uncertainty"], direct.expected)
    np.testing.assert_allclose(res["uncertainty_ci"], direct.interval(0.1, 0.9))
    np.testing.assert_allclose(res["knn_distance"], direct.distance)
    np.testing.assert_array_equal(atoms.calc.get_ood_pvalue(atoms), direct.ood)
    assert res["uncertainty_ci"].shape == (len(atoms), 2)
    assert np.all(res["uncertainty_ci"][:, 0] <= res["uncertainty_ci"][:, 1])

    # the same from files
    save_model(model, tmp_path / "model.pt")
    estimator.save(tmp_path / "est")
    atoms.calc = LTAUCalculator(tmp_path / "model.pt", tmp_path / "est", ci=(0.1, 0.9))
    np.testing.assert_allclose(atoms.calc.get_uncertainty(atoms), res["uncertainty"], rtol=1e-6)


def test_bad_set_up_and_input_raise_ase_errors(model, estimator):
    """ASE's InputError (also an LTAUError, so the CLI prints one line) names the cause."""
    for bad in (lambda: LTAUCalculator(LocalForceField(["Si"], seed=1), estimator),
                lambda: LTAUCalculator(model, estimator, ci=(0.9, 0.1)),
                lambda: LTAUCalculator(model, skin=-1.0),
                lambda: LTAUCalculator(model, "/no/such/estimator"),
                lambda: LTAUCalculator(model, ci=(0.1, 0.5, 0.9)),
                lambda: LTAUCalculator(model, ci=None),
                lambda: LTAUCalculator(model, skin="0.5"),
                lambda: LTAUCalculator(model, estimator=42),
                lambda: LTAUCalculator(42)):
        with pytest.raises(InputError) as info:
            bad()
        assert isinstance(info.value, LTAUError)
    with pytest.raises(InputError, match="rebuild the estimator"):
        LTAUCalculator(LocalForceField(["Si"], seed=1), estimator)
    with pytest.raises(InputError, match="latent features but this model has latent_dim 5"):
        LTAUCalculator(LocalForceField(["Si"], latent_dim=5, seed=1), estimator)
    with pytest.raises(InputError, match="Linear has no model card"):
        LTAUCalculator(torch.nn.Linear(3, 1))
    germanium = bulk("Ge", "diamond", a=5.65, cubic=True)
    germanium.calc = LTAUCalculator(model)
    with pytest.raises(InputError, match="Ge.*not known to the model"):
        germanium.get_potential_energy()


def test_non_finite_structure_or_output_names_the_atoms(model, estimator):
    """NaN positions are an InputError; NaN energies or forces (overlapping atoms) ASE's CalculationFailed,
    never a NaN energy or an estimator error about its descriptors."""
    atoms = si_cell(seed=12)
    atoms.positions[3] = np.nan
    atoms.calc = LTAUCalculator(model, estimator)
    with pytest.raises(InputError, match=r"atom\(s\) 3 have non-finite positions"):
        atoms.get_potential_energy()
    atoms = si_cell(seed=12)
    atoms.positions[1] = atoms.positions[0]
    atoms.calc = LTAUCalculator(model, estimator)
    for get in (atoms.get_potential_energy, atoms.calc.get_uncertainty):
        with pytest.raises(CalculationFailed, match=r"non-finite \(NaN or inf\) energies or forces on atom\(s\) 0, 1") \
                as info:
            get()
        assert isinstance(info.value, LTAUError)


def test_every_result_is_an_implemented_property(model, estimator):
    atoms = si_cell(seed=9)
    calc = LTAUCalculator(model, estimator)
    for name in calc.implemented_properties:
        value = calc.get_property(name, atoms)
        np.testing.assert_array_equal(value, calc.results[name])
    assert set(calc.results) == set(calc.implemented_properties)
    assert calc.get_property("latent", atoms).shape == (len(atoms), model.latent_dim)
    np.testing.assert_array_equal(calc.get_knn_distance(atoms), calc.results["knn_distance"])
    np.testing.assert_array_equal(calc.get_uncertainty_ci(atoms), calc.results["uncertainty_ci"])
    # ASE's own Properties export (Atoms.get_properties) takes the standard outputs
    props = atoms.copy()
    props.calc = calc
    assert props.get_properties(["energy", "forces", "stress"])["energy"] == calc.results["energy"]


def test_uncertainty_without_estimator_is_not_implemented(model):
    atoms = si_cell(seed=10)
    atoms.calc = LTAUCalculator(model)
    for name in ("uncertainty", "uncertainty_ci", "knn_distance", "ood_pvalue"):
        with pytest.raises(PropertyNotImplementedError, match=f"{name} needs an LTAU estimator"):
            atoms.calc.get_property(name, atoms)
    assert np.isfinite(atoms.get_forces()).all()


def test_ood_needs_a_calibrated_estimator(model, estimator):
    uncalibrated = LTAUEstimator(estimator.index, estimator.pdfs, estimator.bin_edges, k=estimator.k,
                                 metadata=estimator.metadata)
    atoms = si_cell(seed=10)
    atoms.calc = LTAUCalculator(model, uncalibrated)
    with pytest.raises(PropertyNotImplementedError, match="ood_pvalue: this estimator has no reference distances"):
        atoms.calc.get_ood_pvalue(atoms)
    assert atoms.calc.get_uncertainty(atoms).shape == (len(atoms),)  # the rest still works


def test_only_what_is_asked_is_computed(model, estimator, monkeypatch):
    calls, queries = [], []
    real_evaluate, real_query = calculator_module.evaluate, estimator.query
    monkeypatch.setattr(calculator_module, "evaluate",
                        lambda *a, **kw: calls.append(kw["virial"]) or real_evaluate(*a, **kw))
    monkeypatch.setattr(estimator, "query", lambda *a, **kw: queries.append(1) or real_query(*a, **kw))
    atoms = si_cell(seed=11)
    atoms.calc = LTAUCalculator(model, estimator)
    atoms.get_potential_energy()
    assert (calls, queries) == ([False], [])          # no virial, no estimator query
    atoms.get_forces()
    atoms.get_potential_energies()
    atoms.calc.get_property("latent", atoms)
    assert (calls, queries) == ([False], [])          # all from the same model pass
    atoms.calc.get_uncertainty(atoms)
    assert "ood_pvalue" not in atoms.calc.results      # not asked for
    atoms.calc.get_knn_distance(atoms)
    atoms.calc.get_ood_pvalue(atoms)
    assert (calls, queries) == ([False], [1])         # one query, no new model pass
    atoms.get_stress()
    assert (calls, queries) == ([False, True], [1])   # the virial needs a model pass
    atoms.get_forces()
    atoms.calc.get_uncertainty(atoms)
    assert (calls, queries) == ([False, True], [1])
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert (calls, queries) == ([False, True, False], [1])
    assert "uncertainty" not in atoms.calc.results and "stress" not in atoms.calc.results


def _same_results(a: dict, b: dict, names=("energy", "energies", "forces", "latent", "stress")):
    for name in names:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-12, err_msg=name)


def test_neighbour_list_reuse_matches_a_fresh_calculator(model):
    atoms = si_cell(rattle=0.05, seed=12)
    calc = LTAUCalculator(model, skin=0.5)
    rng = np.random.default_rng(0)
    lists = set()
    for step in range(8):   # small moves: each atom drifts < skin / 2 = 0.25 A in total
        atoms.positions += rng.uniform(-0.012, 0.012, atoms.positions.shape)
        calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])
        lists.add(id(calc._pairs))
        fresh = LTAUCalculator(model, skin=0.5)
        fresh.calculate(atoms, ["energy", "forces", "stress"])
        _same_results(calc.results, fresh.results)
    assert len(lists) == 1                          # built once, reused 7 times

    def rebuilt(change, system_changes):
        before = calc._pairs
        change()
        calc.calculate(atoms, ["energy", "forces"], system_changes)
        return calc._pairs is not before

    def move_one_atom():
        atoms.positions[3] += [0.3, 0.0, 0.0]       # beyond skin / 2
    assert rebuilt(move_one_atom, ["positions"])
    assert rebuilt(lambda: atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True), ["positions", "cell"])
    assert rebuilt(lambda: setattr(atoms, "pbc", [True, True, False]), ["pbc"])
    assert not rebuilt(lambda: None, ["positions"])

    def remove_an_atom():
        del atoms[0]
    assert rebuilt(remove_an_atom, ["positions", "numbers"])
    fresh = LTAUCalculator(model)
    fresh.calculate(atoms, ["energy", "forces"])
    _same_results(calc.results, fresh.results, ("energy", "forces"))


def test_pair_entering_the_cutoff_within_the_skin_is_seen(model):
    """An atom moving from outside the cutoff to inside it, without a rebuild, still interacts."""
    cutoff, skin = model.cutoff, 1.0
    atoms = Atoms("Si2", positions=[[0.0, 0.0, 0.0], [cutoff + 0.3, 0.0, 0.0]])
    calc = LTAUCalculator(model, skin=skin)
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_forces(), 0.0, atol=1e-14)   # out of range: no interaction
    atoms.positions[1, 0] -= 0.45                                      # now 0.15 A inside the cutoff
    pairs = calc._pairs
    forces = atoms.get_forces()
    assert calc._pairs is pairs                                       # reused, not rebuilt
    assert abs(forces[0, 0]) > 1e-8
    fresh = LTAUCalculator(model)
    fresh.calculate(atoms, ["energy", "forces"])
    _same_results(calc.results, fresh.results, ("energy", "forces"))


def test_velocity_verlet_conserves_energy(model, estimator):
    atoms = si_cell(rattle=0.05, seed=8).repeat((2, 1, 1))
    atoms.calc = LTAUCalculator(model, estimator)
    kT = 300 * units.kB
    sigma = np.sqrt(kT / atoms.get_masses())[:, None]
    atoms.set_velocities(np.random.default_rng(0).normal(size=(len(atoms), 3)) * sigma)
    e0 = atoms.get_total_energy()
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(20)
    assert atoms.calc.get_uncertainty(atoms).shape == (len(atoms),)
    assert abs(atoms.get_total_energy() - e0) < 1e-3 * len(atoms)
