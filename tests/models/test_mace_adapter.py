"""MACE behind the model contract: equal to MACE's own calculator, exact with ghost atoms, files, card."""

import numpy as np
import pytest
import torch

from helpers.adapter_checks import Touch, check_shift_gradient_gives_pair_forces, explicit_images, inputs, si_c_cell
from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.model import MACEForceField, PickleRefusedError, detect_family, evaluate, load_model

pytest.importorskip("mace")
from mace.calculators import MACECalculator  # noqa: E402

from helpers.mace_models import tiny_mace  # noqa: E402


@pytest.fixture(scope="module")
def mace_model():
    return tiny_mace()


@pytest.fixture(scope="module")
def adapter(mace_model):
    return MACEForceField(mace_model)


@pytest.mark.parametrize("atoms", [
    si_c_cell((2, 1, 1), seed=1),           # 16 atoms, 10.9 x 5.4 x 5.4 A: several images along y, z
    si_c_cell(seed=2),                      # 8 atoms, cell < 2 x r_max in every direction
    si_c_cell(cubic=False, seed=3),         # 2 atoms (Si + C): every atom sees many of its own images
], ids=["16 atoms", "8 atoms", "2 atoms"])
def test_equals_mace_calculator(adapter, mace_model, atoms):
    calc = MACECalculator(models=mace_model, device="cpu", default_dtype="float64")
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    stress = atoms.get_stress(voigt=False)
    descriptors = calc.get_descriptors(atoms, invariants_only=True, num_layers=-1)

    out = evaluate(adapter, *inputs(adapter, atoms), virial=True)
    assert abs(float(out.atom_energy.sum()) - energy) <= 1e-10 * abs(energy)
    assert np.abs(out.forces.numpy() - forces).max() <= 1e-8 * np.abs(forces).max()
    assert np.abs(-out.virial.numpy() / atoms.get_volume() - stress).max() <= 1e-8 * np.abs(stress).max()
    assert out.latent.shape == descriptors.shape == (len(atoms), 16)
    np.testing.assert_allclose(out.latent.numpy(), descriptors, rtol=0, atol=1e-12)


def test_atom_energy_includes_e0(adapter, mace_model):
    """Per-atom energies sum to the total: MACE's node_energy with E0 (the calculator's "energies";
    its "node_energy" result has E0 subtracted)."""
    atoms = si_c_cell(seed=4)
    calc = MACECalculator(models=mace_model, device="cpu", default_dtype="float64")
    calc.calculate(atoms)
    atom_energy = evaluate(adapter, *inputs(adapter, atoms), forces=False).atom_energy.numpy()
    np.testing.assert_allclose(atom_energy, calc.results["energies"], rtol=0, atol=1e-12)
    e0 = np.where(atoms.numbers == 6, -7.5, -4.0)
    np.testing.assert_allclose(atom_energy - e0, calc.results["node_energy"], rtol=0, atol=1e-12)


def test_shift_gradient_gives_pair_forces(adapter):
    check_shift_gradient_gives_pair_forces(adapter, si_c_cell(seed=5))




@pytest.mark.parametrize("shell, exact", [(2, True), (1, False)])
def test_ghost_atoms_out_to_receptive_field_are_exact(adapter, shell, exact):
    atoms = si_c_cell(seed=6)
    periodic = evaluate(adapter, *inputs(adapter, atoms))
    cluster, owners = explicit_images(atoms, shell * adapter.card.cutoff + 0.5)
    positions, species, c, n, s, _ = inputs(adapter, cluster)
    assert s is not None and not s.any() and (c >= len(atoms)).any()  # ghost-centred pairs, no shifts
    out = evaluate(adapter, positions, species, c, n, None, len(atoms))
    folded = np.zeros((len(atoms), 3))
    np.add.at(folded, owners, out.forces.numpy())
    force_error = np.abs(folded - periodic.forces.numpy()).max()
    energy_error = np.abs(out.atom_energy.numpy() - periodic.atom_energy.numpy()).max()
    if exact:
        assert force_error <= 1e-10 and energy_error <= 1e-10
        np.testing.assert_allclose(out.latent.numpy(), periodic.latent.numpy(), rtol=0, atol=1e-10)
    else:  # one cutoff of ghosts is not enough for two message-passing layers
        assert force_error > 1e-7


class RecordingExchange:
    """A one-process ``exchange=``: ghost rows := their owners' rows by indexing (differentiable,
    its backward sums ghost gradients onto the owners); records the widths of the forward calls
    and of the gradients going back through them."""

    def __init__(self, owners):
        self.owners, self.forward, self.reverse = torch.as_tensor(owners), [], []

    def __call__(self, rows):
        self.forward.append(rows.shape[1])
        out = rows[self.owners]
        if out.requires_grad:
            out.register_hook(lambda grad: self.reverse.append(grad.shape[1]))
        return out


def test_exchange_with_one_cutoff_of_ghosts_is_exact(adapter):
    """Pairs centred on local atoms, ghosts out to one cutoff, ghost features refreshed per layer."""
    atoms = si_c_cell(seed=6)
    periodic = evaluate(adapter, *inputs(adapter, atoms))
    cluster, owners = explicit_images(atoms, adapter.card.cutoff + 0.5)
    positions, species, c, n, _, _ = inputs(adapter, cluster)
    local = c < len(atoms)
    exchange = RecordingExchange(owners)
    positions.requires_grad_()
    atom_energy, latent = adapter(positions, species, c[local], n[local], None, len(atoms), exchange=exchange)
    (grad,) = torch.autograd.grad(atom_energy.sum(), positions)
    folded = np.zeros((len(atoms), 3))
    np.add.at(folded, owners, -grad.numpy())
    assert np.abs(folded - periodic.forces.numpy()).max() <= 1e-10
    assert np.abs(atom_energy.detach().numpy() - periodic.atom_energy.numpy()).max() <= 1e-10
    np.testing.assert_allclose(latent.detach().numpy(), periodic.latent.numpy(), rtol=0, atol=1e-10)
    assert adapter.card.ghost_exchange
    assert exchange.forward == exchange.reverse == list(adapter.exchange_widths) == [32]


def test_exchange_without_local_atoms_still_exchanges(adapter):
    """A rank without local atoms makes the same exchanges (collective), forward and backward."""
    positions, species, c, n, s, _ = inputs(adapter, si_c_cell(seed=9))
    offset = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    exchange = RecordingExchange(torch.arange(len(positions)))
    atom_energy, latent = adapter(positions, species, c[:0], n[:0], offset, 0, exchange=exchange)
    assert atom_energy.shape == (0,) and latent.shape == (0, 16)
    (grad,) = torch.autograd.grad(atom_energy.sum(), offset)
    assert exchange.forward == exchange.reverse == list(adapter.exchange_widths) and grad.shape == (0, 3)


def test_card(adapter, mace_model):
    card = adapter.card
    assert (card.family, card.species, card.cutoff, card.num_layers, card.receptive_field) == \
        ("mace", ("C", "Si"), 4.0, 2, 8.0)
    assert (card.latent_dim, card.dtype) == (16, "float64") and "layer(s) 1, 2" in card.latent
    assert card.model_hash == MACEForceField(mace_model).card.model_hash
    assert MACEForceField(tiny_mace(seed=1)).card.model_hash != card.model_hash
    last = MACEForceField(mace_model, layers=[-1])
    assert last.card.latent_dim == 8 and last.card.model_hash != card.model_hash
    atoms = si_c_cell(seed=7)
    full = evaluate(adapter, *inputs(adapter, atoms), forces=False).latent
    assert torch.equal(evaluate(last, *inputs(last, atoms), forces=False).latent, full[:, 8:])


def test_float32_model(mace_model):
    import copy

    single = MACEForceField(copy.deepcopy(mace_model).float())
    assert single.card.dtype == "float32"
    atoms = si_c_cell(seed=8)
    double = evaluate(MACEForceField(mace_model), *inputs(single, atoms)).forces
    out = evaluate(single, *inputs(single, atoms))
    assert out.forces.dtype == torch.float32
    assert torch.abs(out.forces.double() - double).max() <= 1e-4 * torch.abs(double).max()


def test_no_local_atoms(adapter):
    atoms = si_c_cell(seed=9)
    positions, species, c, n, s, _ = inputs(adapter, atoms)
    out = evaluate(adapter, positions, species, c, n, s, 0)
    assert out.atom_energy.shape == (0,) and out.latent.shape == (0, 16)
    assert not out.forces.any()


def test_options_and_refusals(mace_model):
    with pytest.raises(ConfigError, match="latent layers"):
        MACEForceField(mace_model, layers=[2])
    with pytest.raises(ConfigError, match="repeat"):
        MACEForceField(mace_model, layers=[1, -1])
    with pytest.raises(ConfigError, match="expected a MACE energy model"):
        MACEForceField(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="head 'x'"):
        MACEForceField(mace_model, head="x")
    two_heads = tiny_mace(heads=["pt_head", "Default"])
    assert MACEForceField(two_heads).head == "Default"
    with pytest.raises(ConfigError, match="none is 'Default'"):
        MACEForceField(tiny_mace(heads=["a", "b"]))


def test_model_file_needs_explicit_trust(tmp_path, adapter, mace_model):
    path = tmp_path / "tiny.model"
    torch.save(mace_model, path)
    assert detect_family(path) == "mace"
    for family in (None, "mace"):
        with pytest.raises(PickleRefusedError,
                           match=r"allow_pickle=True .*pair_style ltau allow_pickle yes.*--allow-pickle"):
            load_model(path, family=family)
    loaded = load_model(path, allow_pickle=True)
    assert isinstance(loaded, MACEForceField) and loaded.card == adapter.card
    with pytest.raises(FileFormatError, match=r"is a MACE model \(detected family mace\), not an ltau_lmp built-in"):
        load_model(path, family="ltau_local")  # told from the pickle, never unpickled




def test_refused_file_runs_no_code(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.model"
    torch.save({"mace.modules.models": Touch(str(marker))}, path)
    with pytest.raises(PickleRefusedError):
        load_model(path)
    assert not marker.exists()
    with pytest.raises(FileFormatError):
        load_model(path, family="ltau_local")
    assert not marker.exists()
