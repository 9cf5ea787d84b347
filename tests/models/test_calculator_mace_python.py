"""A MACE model through ltau_lmp's Python paths: ASE calculator (= MACE's own calculator), LTAU
uncertainty from the adapter's latents, batched prediction (several structures in one graph)."""

import numpy as np
import pytest
import torch
from ase.calculators.calculator import InputError

from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.pipeline import card_metadata
from ltau_lmp.model import MACEForceField, evaluate, load_model, neighbor_list, species_indices

pytest.importorskip("mace")
from mace.calculators import MACECalculator  # noqa: E402
from helpers.adapter_checks import si_c_cell  # noqa: E402
from helpers.mace_models import tiny_mace  # noqa: E402


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mace") / "tiny.model"
    torch.save(tiny_mace(), path)
    return path


@pytest.fixture(scope="module")
def adapter(model_file):
    return load_model(model_file, allow_pickle=True)


@pytest.fixture(scope="module")
def estimator(adapter):
    """An estimator over the adapter's latents of a few training cells, recording the model's card."""
    calc = LTAUCalculator(adapter)
    latent = np.concatenate([calc.get_property("latent", si_c_cell(seed=10 + s)) for s in range(4)])
    pdfs = np.random.default_rng(0).dirichlet(np.ones(12), size=len(latent))
    return LTAUEstimator.build(latent, pdfs, bin_edges=np.logspace(-3, 1, 13), index="flat", k=4,
                               metadata=card_metadata(adapter.card))


@pytest.mark.parametrize("atoms", [
    si_c_cell((2, 1, 1), seed=1),      # 16 atoms in a strained cell, several images per neighbour
    si_c_cell(cubic=False, seed=3),    # 2 atoms: every atom sees many of its own images
], ids=["16 atoms", "2 atoms"])
def test_equals_mace_calculator(model_file, atoms):
    """The periodic list with shifts over all atoms is MACE's own graph: same energy, forces, stress."""
    ref = MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float64")
    ref.calculate(atoms, ["energy", "forces", "stress"])
    ours = LTAUCalculator(model_file, allow_pickle=True)
    ours.calculate(atoms, ["energy", "forces", "stress"])
    assert abs(ours.results["energy"] - ref.results["energy"]) <= 1e-8 * abs(ref.results["energy"])
    for key in ("energies", "forces", "stress"):
        scale = np.abs(ref.results[key]).max()
        assert np.abs(ours.results[key] - ref.results[key]).max() <= 1e-8 * scale, key


def test_uncertainty_from_the_adapters_latents(adapter, estimator, model_file):
    atoms = si_c_cell(seed=5, rattle=0.2)
    atoms.calc = LTAUCalculator(model_file, estimator, allow_pickle=True, family="mace")
    assert atoms.calc.card == adapter.card
    uncertainty = atoms.calc.get_uncertainty(atoms)
    direct = estimator.query(atoms.calc.results["latent"].astype(np.float32))
    np.testing.assert_allclose(uncertainty, direct.expected)
    np.testing.assert_allclose(atoms.calc.get_knn_distance(atoms), direct.distance)
    assert uncertainty.shape == (len(atoms),) and np.all(uncertainty > 0)
    train_latent = atoms.calc.get_property("latent", si_c_cell(seed=10))  # a training cell of the estimator
    assert estimator.query(train_latent, k=1).distance.max() < 1e-6  # each atom finds itself


def test_refusals_name_the_cause(adapter, estimator, model_file):
    with pytest.raises(InputError, match="allow_pickle=True"):
        LTAUCalculator(model_file)
    with pytest.raises(InputError, match=r"built for model .*, not for this model \(mace model"):
        LTAUCalculator(MACEForceField(tiny_mace(seed=1)), estimator)
    with pytest.raises(InputError, match="16-dimensional latent features but this model has latent_dim 8"):
        LTAUCalculator(MACEForceField(adapter.mace, layers=[-1]), estimator)
    with pytest.raises(InputError, match="no model card.*MACEForceField"):
        LTAUCalculator(adapter.mace)  # the bare MACE module: no contract, no guessing


def test_batched_prediction_equals_per_structure(adapter):
    """Several structures in one graph (training, evaluation, estimator build): per-structure
    energies, forces and latents equal each structure evaluated alone."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from ltau_lmp.data.datasets import AtomsDataset
    from ltau_lmp.evaluation.evaluate import predict_frames
    from ltau_lmp.prediction import predict_batch

    frames = [si_c_cell((2, 1, 1), seed=1), si_c_cell(cubic=False, seed=3), si_c_cell(seed=2)]
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((len(atoms), 3)))
    card = adapter.card
    dataset = AtomsDataset(frames, card.species, card.cutoff)
    energy, forces, latent = predict_batch(adapter, dataset.batch([2, 0, 1]))
    alone = []
    for atoms in frames:
        c, n, s = neighbor_list(atoms, card.cutoff)
        alone.append(evaluate(adapter, torch.tensor(atoms.positions),
                              torch.from_numpy(species_indices(atoms, card.species)), torch.from_numpy(c),
                              torch.from_numpy(n), torch.from_numpy(s), len(atoms)))
    order = [alone[2], alone[0], alone[1]]
    expected_energy = torch.stack([out.atom_energy.sum() for out in order])
    assert torch.abs(energy - expected_energy).max() <= 1e-10 * torch.abs(expected_energy).max()
    expected_forces = torch.cat([out.forces for out in order])
    assert torch.abs(forces - expected_forces).max() <= 1e-10 * torch.abs(expected_forces).max()
    assert torch.abs(latent - torch.cat([out.latent for out in order])).max() <= 1e-10

    per_atom = np.concatenate([out.latent.numpy() for out in alone]).astype(np.float32)
    latent_only = predict_frames(adapter, dataset.frames, forces=False, batch_size=2).latent
    np.testing.assert_allclose(latent_only, per_atom, rtol=0, atol=1e-6)
    f, _, lat = predict_frames(adapter, frames, batch_size=3)
    np.testing.assert_allclose(f, np.concatenate([out.forces.numpy() for out in alone]), rtol=0, atol=1e-10)
    np.testing.assert_allclose(lat, per_atom, rtol=0, atol=1e-6)
