"""Reference data: deterministic generation, labels equal a direct LAMMPS evaluation, true forces."""

import numpy as np
import pytest
from ase.build import bulk

from ltau_lmp.data.config import from_dict
from ltau_lmp.data.datasets import AtomsDataset, read_frames
from ltau_lmp.data.generate import GenerateConfig, SetSpec, generate, load_generate_config
from ltau_lmp.data.reference import reference_calculation
from ltau_lmp.errors import ConfigError, FileFormatError, LTAUError


def tiny_config(seed=3):
    return GenerateConfig(sets={
        "train": SetSpec(kind="crystal", supercells=[2], temperatures=[600, 900], strain=0.02,
                         n_frames=4, equil_steps=20, stride=5, seed=seed),
        "vacancy": SetSpec(kind="vacancy", supercells=[2], temperatures=[300], n_frames=2,
                           equil_steps=10, stride=5, seed=seed + 1),
    })


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return generate(tiny_config(), out, show_progress=False)


def strained_si(seed=0):
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    rng = np.random.default_rng(seed)
    atoms.rattle(0.08, seed=seed)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.03 * rng.standard_normal((3, 3))), scale_atoms=True)
    return atoms


def test_generation_is_deterministic(tiny_data, tmp_path):
    again = generate(tiny_config(), tmp_path, show_progress=False)
    for name in ("train", "vacancy"):
        a, b = read_frames(tiny_data[name]), read_frames(again[name])
        assert len(a) == len(b) == tiny_config().sets[name].n_frames
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.positions, y.positions)
            np.testing.assert_array_equal(x.get_forces(), y.get_forces())
    other = generate(tiny_config(seed=11), tmp_path / "other", sets=["train"], show_progress=False)
    assert not np.allclose(read_frames(other["train"])[0].positions, read_frames(tiny_data["train"])[0].positions)


def test_labels_equal_direct_lammps_evaluation(tiny_data):
    """Re-labelling the written frames reproduces the labels (extxyz keeps 8 decimals of positions)."""
    frames = read_frames(tiny_data["train"]) + read_frames(tiny_data["vacancy"])
    assert {len(a) for a in frames} == {64, 63}
    for atoms, (energy, forces, stress) in zip(frames, reference_calculation(frames)):
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-6)
        np.testing.assert_allclose(atoms.get_stress(), stress, atol=1e-8)
    assert frames[0].info["set"] == "train" and frames[0].info["temperature"] == 600.0


def test_reference_forces_and_stress_are_energy_derivatives():
    atoms = strained_si()
    energy, forces, stress = reference_calculation(atoms)
    h = 1e-4
    for i, c in [(0, 0), (5, 1), (17, 2)]:
        shifted = []
        for d in (h, -h):
            b = atoms.copy()
            b.positions[i, c] += d
            shifted.append(b)
        ep, em = (r[0] for r in reference_calculation(shifted))
        assert -(ep - em) / (2 * h) == pytest.approx(forces[i, c], abs=1e-6)
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    for v, (k, l) in enumerate(voigt):
        strained = []
        for d in (h, -h):
            eps = np.eye(3)
            eps[k, l] += d / 2
            eps[l, k] += d / 2
            b = atoms.copy()
            b.set_cell(atoms.cell.array @ eps, scale_atoms=True)
            strained.append(b)
        ep, em = (r[0] for r in reference_calculation(strained))
        assert (ep - em) / (2 * h) / atoms.get_volume() == pytest.approx(stress[v], abs=1e-7)


def test_reference_is_rotation_covariant():
    atoms = strained_si(1)
    energy, forces, _ = reference_calculation(atoms)
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rot.T, scale_atoms=True)
    e2, f2, _ = reference_calculation(rotated)
    assert e2 == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(f2, forces @ rot.T, atol=1e-9)


def test_reference_errors_are_clear():
    with pytest.raises(ConfigError, match="not found"):
        reference_calculation(strained_si(), potential="NoSuch.sw")
    with pytest.raises(LTAUError, match="Ge"):
        reference_calculation(bulk("Ge", "diamond", a=5.65, cubic=True))


def test_dataset_batches_keep_global_atom_ids(tiny_data):
    frames = read_frames(tiny_data["vacancy"]) + read_frames(tiny_data["train"])
    ds = AtomsDataset(frames, ["Si"], 4.0)
    assert ds.total_atoms == sum(len(a) for a in frames)
    batch = ds.batch([2, 0])
    np.testing.assert_array_equal(batch.atom_ids, np.r_[np.arange(126, 190), np.arange(0, 63)])
    np.testing.assert_array_equal(batch.forces[:64].numpy(), frames[2].get_forces())
    assert batch.n_local == 127 and batch.centers.max() < 127 and batch.neighbors.min() >= 0
    assert int(batch.centers[batch.structure[batch.centers] == 1].min()) == 64  # offsets applied
    r = batch.positions[batch.neighbors] - batch.positions[batch.centers] + batch.shifts
    assert float(r.norm(dim=1).max()) < 4.0
    energies = batch.structure_energy(torch_ones(batch.n_local))
    assert energies.tolist() == [64.0, 63.0]


def torch_ones(n):
    import torch

    return torch.ones(n, dtype=torch.float64)


def test_generate_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*temperature"):
        from_dict(SetSpec, {"temperature": 300}, "generate.sets.x")
    with pytest.raises(ConfigError, match="kind"):
        from_dict(SetSpec, {"kind": "gas"}, "generate.sets.x")
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(SetSpec, {"strain": "big"}, "generate.sets.x")
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  out_dir: d\n  sets:\n    t: {kind: liquid, n_frames: 2}\n")
    cfg, out = load_generate_config(path)
    assert out == tmp_path / "d" and cfg.sets["t"].kind == "liquid"
    with pytest.raises(FileFormatError):
        read_frames(tmp_path / "missing.xyz")
