"""The local force field: forces, symmetry, locality, periodic images, neighbour lists, files."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list
from scipy.spatial.transform import Rotation

from ltau_lmp.errors import ConfigError, FileFormatError, LTAUError
from ltau_lmp.model import LocalForceField, evaluate, load_model, neighbor_list, save_model, species_indices


def si_cell(repeat=(1, 1, 1), rattle=0.1, seed=0):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle, atoms.positions.shape)
    return atoms


def make_model(species=("Si",), seed=0, **kwargs):
    """A random model whose normalisation is fitted to Si so that energies have a sensible scale."""
    model = LocalForceField(list(species), seed=seed, **kwargs)
    atoms = si_cell((2, 1, 1), seed=99)
    if len(species) > 1:
        atoms.symbols[::2] = species[1]
    model.fit_normalization(model.descriptors(*inputs(model, atoms)))
    return model


def inputs(model, atoms):
    c, n, s = neighbor_list(atoms, model.cutoff)
    return (torch.tensor(atoms.positions), torch.from_numpy(species_indices(atoms, model.species)),
            torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms))


def run(model, atoms, **kwargs):
    return evaluate(model, *inputs(model, atoms), **kwargs)


def total_energy(model, atoms):
    return float(run(model, atoms, forces=False).atom_energy.sum())


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.mark.parametrize("species", [("Si",), ("Si", "C")])
def test_forces_are_minus_energy_gradient(species):
    model = make_model(species)
    atoms = si_cell(rattle=0.15, seed=1)
    if len(species) > 1:
        atoms.symbols[1::3] = "C"
    forces = run(model, atoms).forces.numpy()
    h = 1e-5
    fd = np.zeros_like(forces)
    for a in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, k] += h
            minus.positions[a, k] -= h
            fd[a, k] = -(total_energy(model, plus) - total_energy(model, minus)) / (2 * h)
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces, fd, atol=1e-7 * np.abs(forces).max(), rtol=0)


def test_rotation_translation_permutation_invariance(model):
    atoms = si_cell(rattle=0.2, seed=2)
    ref = run(model, atoms)
    rot = Rotation.random(random_state=3).as_matrix()
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    moved.positions = atoms.positions @ rot.T + np.array([1.3, -0.7, 2.9])
    perm = np.random.default_rng(4).permutation(len(atoms))
    moved = moved[perm]
    out = run(model, moved)
    np.testing.assert_allclose(out.atom_energy.numpy(), ref.atom_energy.numpy()[perm], atol=1e-10)
    np.testing.assert_allclose(out.forces.numpy(), ref.forces.numpy()[perm] @ rot.T, atol=1e-10)
    np.testing.assert_allclose(out.latent.numpy(), ref.latent.numpy()[perm], atol=1e-10)


def test_pairs_beyond_cutoff_contribute_exactly_zero(model):
    # A list with a skin (as LAMMPS passes) must give bitwise the same energy of atom 0 when an
    # atom inside the skin but outside the cutoff of atom 0 moves.
    rng = np.random.default_rng(5)
    positions = rng.uniform(-3.0, 3.0, (6, 3)) * [1, 1, 0.3]
    positions = np.vstack([positions, [[model.cutoff + 0.3, 0, 0]]])
    positions[0] = 0.0
    positions[1] = [2.0, 0.5, 0.0]  # a neighbour of atom 6, so atom 6's own energy does change
    atoms = Atoms("Si7", positions=positions)
    c, n, s = neighbor_list(atoms, model.cutoff + 1.0)
    args = (torch.from_numpy(species_indices(atoms, model.species)), torch.from_numpy(c),
            torch.from_numpy(n), torch.from_numpy(s), len(atoms))
    e1 = evaluate(model, torch.tensor(positions), *args).atom_energy
    moved = positions.copy()
    moved[6] = [model.cutoff + 0.8, 0.2, 0.0]
    assert np.linalg.norm(moved[6] - moved[0]) < model.cutoff + 1.0
    e2 = evaluate(model, torch.tensor(moved), *args).atom_energy
    assert e1[0].item() == e2[0].item()
    assert e1[6].item() != e2[6].item()
    # and the skin list gives the same energies as the tight list
    tight = run(model, atoms).atom_energy
    np.testing.assert_allclose(e1.numpy(), tight.numpy(), atol=1e-12)


def test_energy_is_smooth_at_the_cutoff(model):
    def dimer(r):
        out = run(model, Atoms("Si2", positions=[[0, 0, 0], [r, 0, 0]]))
        return float(out.atom_energy.sum()), float(out.forces[1, 0])

    isolated = dimer(model.cutoff + 0.5)[0]
    assert dimer(model.cutoff)[0] == isolated
    assert dimer(model.cutoff - 0.05)[0] != isolated  # the pair is seen inside the cutoff

    # C2 at the cutoff: the curvature d2E/dr2 = -dF/dr must vanish there (like delta^2 for the
    # quintic envelope times the sine basis), not tend to a constant.
    def curvature(delta, h=1e-4):
        r = model.cutoff - delta
        return -(dimer(r + h)[1] - dimer(r - h)[1]) / (2 * h)

    c = [abs(curvature(d)) for d in (0.02, 0.01, 0.005)]
    assert c[0] > 0
    assert 3.0 < c[0] / c[1] < 5.0 and 3.0 < c[1] / c[2] < 5.0


def test_small_periodic_cell_matches_supercell(model):
    primitive = bulk("Si", "diamond", a=5.43)  # cell vectors 3.84 A < 2 x cutoff
    primitive.positions[1] += [0.05, -0.03, 0.02]
    small = run(model, primitive)
    big = run(model, primitive.repeat((3, 3, 3)))
    np.testing.assert_allclose(big.atom_energy.numpy(), np.tile(small.atom_energy.numpy(), 27), atol=1e-10)
    np.testing.assert_allclose(big.forces.numpy(), np.tile(small.forces.numpy(), (27, 1)), atol=1e-10)
    np.testing.assert_allclose(big.latent.numpy(), np.tile(small.latent.numpy(), (27, 1)), atol=1e-10)


def test_explicit_ghost_images_equal_shifted_pairs(model):
    # The LAMMPS form of the contract: ghost atoms are explicit images, shifts=None, and ghost
    # forces summed back onto their owners give the periodic forces.
    atoms = si_cell(rattle=0.1, seed=6)
    c, n, s = neighbor_list(atoms, model.cutoff)
    keys = {}
    ghost_of = np.empty(len(n), dtype=np.int64)
    for e, (j, shift) in enumerate(zip(n, map(tuple, np.round(s, 8)))):
        ghost_of[e] = j if not any(shift) else keys.setdefault((j, shift), len(atoms) + len(keys))
    owners = np.array([j for j, _ in keys])
    ghost_pos = np.array([atoms.positions[j] + np.array(shift) for j, shift in keys])
    positions = np.vstack([atoms.positions, ghost_pos])
    species = species_indices(atoms, model.species)[np.concatenate([np.arange(len(atoms)), owners])]
    ghosts = evaluate(model, torch.tensor(positions), torch.from_numpy(species), torch.from_numpy(c),
                      torch.from_numpy(ghost_of), None, len(atoms), virial=True)
    ref = run(model, atoms, virial=True)
    folded = ghosts.forces[: len(atoms)].clone().index_add_(0, torch.from_numpy(owners), ghosts.forces[len(atoms):])
    np.testing.assert_allclose(ghosts.atom_energy.numpy(), ref.atom_energy.numpy(), atol=1e-12)
    np.testing.assert_allclose(folded.numpy(), ref.forces.numpy(), atol=1e-10)
    np.testing.assert_allclose(ghosts.virial.numpy(), ref.virial.numpy(), atol=1e-9)


def test_virial_of_a_cluster_is_sum_of_position_times_force(model):
    atoms = si_cell(rattle=0.1, seed=7)
    atoms.pbc = False
    out = run(model, atoms, virial=True)
    expected = atoms.positions.T @ out.forces.numpy()
    np.testing.assert_allclose(out.virial.numpy(), expected, atol=1e-10)


def test_create_graph_gives_parameter_gradients_of_a_force_loss(model):
    atoms = si_cell(seed=8)
    out = run(model, atoms, create_graph=True)
    assert out.forces.requires_grad
    loss = (out.forces**2).sum() + out.atom_energy.sum()
    grads = torch.autograd.grad(loss, [model.radial_mixing, model.readout.weight])
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


def test_neighbor_list_matches_ase():
    cases = [si_cell(seed=9), bulk("Si", "diamond", a=5.43), Atoms("Si4", positions=np.eye(4, 3) * 2.5)]
    mixed = si_cell(seed=10)
    mixed.pbc = [True, False, True]
    cases.append(mixed)
    for atoms in cases:
        c, n, s = neighbor_list(atoms, 4.0)
        d = np.linalg.norm(atoms.positions[n] - atoms.positions[c] + s, axis=1)
        ai, aj, ad = ase_neighbor_list("ijd", atoms, 4.0)
        assert c.dtype == n.dtype == np.int64 and s.dtype == np.float64
        assert len(c) == len(ai) and np.all(d < 4.0)
        np.testing.assert_allclose(np.sort(d), np.sort(ad), atol=1e-12)
        np.testing.assert_array_equal(np.bincount(c, minlength=len(atoms)), np.bincount(ai, minlength=len(atoms)))


def test_species_errors():
    with pytest.raises(LTAUError, match="Ge"):
        species_indices(Atoms("SiGe", positions=[[0, 0, 0], [2, 0, 0]]), ["Si"])
    for bad in [dict(species=[]), dict(species=["Si", "Si"]), dict(species=["Xx"]),
                dict(species=["Si"], cutoff=-1.0), dict(species=["Si"], dtype="float16")]:
        with pytest.raises(ConfigError):
            LocalForceField(**bad)


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "model.pt"
    assert save_model(model, path) == model.model_hash
    loaded = load_model(path)
    assert loaded.model_hash == model.model_hash
    assert loaded.species == model.species and loaded.cutoff == model.cutoff
    atoms = si_cell(seed=11)
    a, b = run(model, atoms, virial=True, atom_virial=True), run(loaded, atoms, virial=True, atom_virial=True)
    for x, y in zip(a, b):  # every output
        assert torch.equal(x, y)
    save_model(loaded, tmp_path / "again.pt")
    assert load_model(tmp_path / "again.pt").model_hash == model.model_hash


def test_hash_changes_with_weights(model):
    other = make_model(seed=1)
    assert other.model_hash != model.model_hash
    clone = make_model(seed=0)
    assert clone.model_hash == model.model_hash


def test_corrupt_model_files_raise_file_format_error(model, tmp_path):
    good = tmp_path / "good.pt"
    save_model(model, good)
    payload = torch.load(good, weights_only=True)

    def write(name, data):
        path = tmp_path / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            torch.save(data, path)
        return path

    cases = {
        "missing": tmp_path / "nope.pt",
        "text": write("text.pt", b"this is not a torch file\n"),
        "truncated": write("truncated.pt", good.read_bytes()[: good.stat().st_size // 2]),
        "not a dict": write("list.pt", [1, 2, 3]),
        "format": write("format.pt", {**payload, "format": "something.else"}),
        "version": write("version.pt", {**payload, "version": 99}),
        "hash": write("hash.pt", {**payload, "state_dict": {
            k: (v + 1e-9 if k == "readout.weight" else v) for k, v in payload["state_dict"].items()}}),
        "missing key": write("key.pt", {k: v for k, v in payload.items() if k != "state_dict"}),
        "missing weight": write("weight.pt", {**payload, "state_dict": {
            k: v for k, v in payload["state_dict"].items() if k != "readout.bias"}}),
        "bad config": write("config.pt", {**payload, "config": {**payload["config"], "n_radial": 4}}),
    }
    for case, path in cases.items():
        with pytest.raises(FileFormatError, match=str(path.name)):
            load_model(path)


def test_rank_without_atoms_or_pairs(model):
    # A LAMMPS rank may own no atoms, or atoms with no neighbours: zeros, not an autograd error.
    empty = torch.zeros(0, dtype=torch.int64)
    out = evaluate(model, torch.zeros(0, 3, dtype=torch.float64), empty, empty, empty, None, 0, virial=True)
    assert out.atom_energy.shape == (0,) and out.latent.shape == (0, model.latent_dim)
    assert out.forces.shape == (0, 3) and torch.equal(out.virial, torch.zeros(3, 3, dtype=torch.float64))
    positions = torch.tensor([[0.0, 0, 0], [9.0, 0, 0], [3.0, 0, 0]], dtype=torch.float64)
    out = evaluate(model, positions, torch.zeros(3, dtype=torch.int64), empty, empty, None, 2)
    assert out.forces.shape == (3, 3) and not out.forces.any()
    assert torch.allclose(out.atom_energy[0], out.atom_energy[1], rtol=0, atol=1e-12)
