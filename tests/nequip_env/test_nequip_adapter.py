"""NequIP and Allegro behind the model contract: equal to nequip's own ASE calculator, exact with
ghost atoms (NequIP: out to the receptive field; Allegro: one cutoff), files, card."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("nequip")
pytest.importorskip("allegro")
from nequip.data import AtomicDataDict  # noqa: E402
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform  # noqa: E402
from nequip.integrations.ase import NequIPCalculator  # noqa: E402

from helpers.adapter_checks import Touch, check_shift_gradient_gives_pair_forces, explicit_images, inputs, si_c_cell  # noqa: E402
from helpers.nequip_models import TYPES, tiny  # noqa: E402
from ltau_lmp.errors import ConfigError, FileFormatError  # noqa: E402
from ltau_lmp.model import NequIPForceField, PickleRefusedError, detect_family, evaluate, load_model  # noqa: E402


def calculator(model):
    return NequIPCalculator(model, "cpu", transforms=[
        ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES,
                                        chemical_species_to_atom_type_map={t: t for t in TYPES}),
        NeighborListTransform(r_max=4.0)])


@pytest.fixture(scope="module", params=["nequip", "allegro"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def graph_model(kind):
    return tiny(kind)


@pytest.fixture(scope="module")
def adapter(graph_model):
    return NequIPForceField(graph_model)


@pytest.mark.parametrize("atoms", [
    si_c_cell((2, 1, 1), seed=1),           # 16 atoms, several images along y, z
    si_c_cell(seed=2),                      # 8 atoms, cell < 2 x r_max in every direction
    si_c_cell(cubic=False, seed=3),         # 2 atoms (Si + C): every atom sees many of its own images
], ids=["16 atoms", "8 atoms", "2 atoms"])
def test_equals_nequip_calculator(adapter, graph_model, atoms):
    atoms.calc = calculator(graph_model)
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    out = evaluate(adapter, *inputs(adapter, atoms), virial=True)
    assert abs(float(out.atom_energy.sum()) - energy) <= 1e-10 * abs(energy)
    np.testing.assert_allclose(out.atom_energy.detach().numpy(), atoms.calc.results["energies"], rtol=0, atol=1e-10)
    assert np.abs(out.forces.numpy() - forces).max() <= 1e-10 * np.abs(forces).max()
    assert np.abs(-out.virial.numpy() / atoms.get_volume() - stress).max() <= 1e-10 * np.abs(stress).max()
    assert out.latent.shape == (len(atoms), adapter.card.latent_dim)


def test_latent_is_what_nequip_computes(adapter, graph_model, kind):
    """NequIP: the node features nequip outputs; Allegro: its readout's edge features summed per centre."""
    atoms = si_c_cell((2, 1, 1), seed=4)
    calc = calculator(graph_model)
    data = calc.atoms_to_data(atoms)
    seen = {}
    stage = graph_model.model.func.allegro if kind == "allegro" else None
    hook = stage.register_forward_hook(lambda m, i, o: seen.update(edges=o[AtomicDataDict.EDGE_FEATURES_KEY])) \
        if stage is not None else None
    out = calc.call_model(data)
    if kind == "nequip":
        expected = out[AtomicDataDict.NODE_FEATURES_KEY]
    else:
        hook.remove()
        expected = torch.zeros(len(atoms), seen["edges"].shape[1], dtype=torch.float64).index_add_(
            0, data[AtomicDataDict.EDGE_INDEX_KEY][0], seen["edges"])
    latent = evaluate(adapter, *inputs(adapter, atoms), forces=False).latent
    # the two neighbour lists order the pairs differently: sums agree to round-off
    np.testing.assert_allclose(latent.numpy(), expected.detach().numpy(), rtol=0, atol=1e-12)


def test_shift_gradient_gives_pair_forces(adapter):
    check_shift_gradient_gives_pair_forces(adapter, si_c_cell(seed=5))




def _ghost_run(adapter, atoms, shell, local_centres):
    periodic = evaluate(adapter, *inputs(adapter, atoms))
    cluster, owners = explicit_images(atoms, shell * adapter.card.cutoff + 0.5)
    positions, species, c, n, _, _ = inputs(adapter, cluster)
    if local_centres:  # as LAMMPS gives a strictly local model: pairs centred on local atoms only
        keep = c < len(atoms)
        c, n = c[keep], n[keep]
    out = evaluate(adapter, positions, species, c, n, None, len(atoms))
    folded = np.zeros((len(atoms), 3))
    np.add.at(folded, owners, out.forces.numpy())
    return periodic, out, np.abs(folded - periodic.forces.numpy()).max()


def test_ghost_atoms_out_to_receptive_field_are_exact(adapter, kind):
    atoms = si_c_cell(seed=6)
    card = adapter.card
    assert card.receptive_field == (8.0 if kind == "nequip" else 4.0)
    periodic, out, force_error = _ghost_run(adapter, atoms, card.num_layers, local_centres=card.num_layers == 1)
    assert force_error <= 1e-10
    np.testing.assert_allclose(out.atom_energy.detach().numpy(), periodic.atom_energy.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.latent.numpy(), periodic.latent.numpy(), rtol=0, atol=1e-10)
    if kind == "nequip":  # one cutoff of ghosts is not enough for two message-passing layers
        assert _ghost_run(adapter, atoms, 1, local_centres=False)[2] > 1e-7


def test_card(adapter, graph_model, kind):
    card = adapter.card
    assert (card.family, card.species, card.cutoff, card.dtype) == (kind, ("C", "Si"), 4.0, "float64")
    assert card.num_layers == (2 if kind == "nequip" else 1)
    assert card.latent_dim == (8 if kind == "nequip" else 24)
    assert card.model_hash == NequIPForceField(graph_model).card.model_hash
    assert NequIPForceField(tiny(kind, seed=1)).card.model_hash != card.model_hash


def test_float32_model(kind):
    graph_model = tiny(kind, dtype="float32")
    single = NequIPForceField(graph_model)
    assert single.card.dtype == "float32"
    atoms = si_c_cell(seed=8)
    out = evaluate(single, *inputs(single, atoms))
    assert out.forces.dtype == torch.float32
    atoms.calc = calculator(graph_model)
    forces = atoms.get_forces()
    assert np.abs(out.forces.numpy() - forces).max() <= 1e-5 * np.abs(forces).max()


def test_no_local_atoms(adapter):
    positions, species, c, n, s, _ = inputs(adapter, si_c_cell(seed=9))
    out = evaluate(adapter, positions, species, c, n, s, 0)
    assert out.atom_energy.shape == (0,) and out.latent.shape == (0, adapter.card.latent_dim)
    assert not out.forces.any()


def test_refusals(graph_model):
    with pytest.raises(ConfigError, match="expected a nequip GraphModel"):
        NequIPForceField(torch.nn.Linear(2, 2))
    renamed = copy.deepcopy(graph_model)
    renamed._metadata["type_names"] = "Cx Si"
    with pytest.raises(ConfigError, match=r"type names \[.Cx.\] are not chemical symbols"):
        NequIPForceField(renamed)




def test_refused_file_runs_no_code(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"model": {"_target_": "nequip.model.NequIPGNNModel"}},
                "x": Touch(str(marker))}, path)
    assert detect_family(path) == "nequip"
    with pytest.raises(PickleRefusedError, match="does not load with weights_only=True"):
        load_model(path)
    assert not marker.exists()


def test_checkpoint_files(nequip_run, tmp_path):
    """A checkpoint loads without unpickling (weights_only, the builder its config names, EMA weights),
    to the model nequip's own loader gives; a config naming anything else needs the opt-in."""
    from nequip.model.saved_models.load_utils import load_saved_model

    ckpt = nequip_run / "ltau" / "model.ckpt"
    assert detect_family(ckpt) == "nequip"
    own = NequIPForceField(load_saved_model(str(ckpt)).eval())
    lightning_ckpt = next((nequip_run / "csv").glob("version_0/checkpoints/*.ckpt"))  # nequip-train's own
    for path in (ckpt, lightning_ckpt):
        assert load_model(path).card == own.card
    payload = torch.load(ckpt, weights_only=True)
    payload["hyper_parameters"]["model"]["pair_potential"] = {"_target_": "mypackage.Potential"}
    edited = tmp_path / "edited.ckpt"
    torch.save(payload, edited)
    with pytest.raises(PickleRefusedError, match=r"names mypackage\.Potential.*allow_pickle=True"):
        load_model(edited)


def test_package_files(nequip_run, tmp_path):
    """A nequip-package file (it carries Python code) loads only with the opt-in, to the same model."""
    import subprocess
    import sys
    from pathlib import Path

    ckpt = nequip_run / "ltau" / "model.ckpt"
    package = tmp_path / "si.nequip.zip"
    res = subprocess.run([str(Path(sys.executable).parent / "nequip-package"), "build", str(ckpt), str(package)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert detect_family(package) == "nequip"
    with pytest.raises(PickleRefusedError, match="runs the Python code stored in it"):
        load_model(package)
    from_package, from_ckpt = load_model(package, allow_pickle=True), load_model(ckpt)
    atoms = si_c_cell(seed=10)
    atoms.symbols[:] = "Si"
    a = evaluate(from_ckpt, *inputs(from_ckpt, atoms))
    b = evaluate(from_package, *inputs(from_package, atoms))
    assert torch.equal(a.forces, b.forces) and torch.equal(a.latent, b.latent)
    renamed = tmp_path / "si.zip"
    renamed.write_bytes(package.read_bytes())
    with pytest.raises(FileFormatError, match=r"named \*\.nequip\.zip"):
        load_model(renamed, allow_pickle=True)
