"""TorchScript archives users already run in LAMMPS (tests/data/archives, made with the packages'
own tools: make_*.py / make_*.sh there) behind the model contract, without nequip or mace code:
energies, forces, virial and latents equal to the archive's own forward, the card read from the
archive, pair_style ltau equal to that forward, and clear refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io.lammpsdata import write_lammps_data
from helpers.adapter_checks import inputs, lammps_results
from helpers.archives import ARCHIVES, SI_HEADER, cell, own_forward

from ltau_lmp.errors import FileFormatError
from ltau_lmp.model import detect_family, evaluate, load_model

# file: (family, num_layers, latent width, ghost exchange)
KNOWN = {
    "nequip_si_compiled.nequip.pth": ("nequip", 2, 8, True),      # nequip 0.19 nequip-compile
    "allegro_si_compiled.nequip.pth": ("allegro", 1, 24, False),
    "nequip_si_deployed.pth": ("nequip", 2, 4, True),              # nequip 0.6 nequip-deploy, float64
    "nequip_si_f32_deployed.pth": ("nequip", 2, 4, True),          # float32 network, float64 outputs
    "nequip056_si_f32_deployed.pth": ("nequip", 2, 4, True),       # nequip 0.5.6, float32, no dtype metadata
    "allegro_si_deployed.pth": ("allegro", 1, 16, False),          # Allegro 0.2 (nequip-allegro 0.3.0)
    "mace_si.model-lammps.pt": ("mace", 2, 16, True),              # mace_create_lammps_model
    "mace_si_compiled.model": ("mace", 2, 16, True),               # mace_run_train's TorchScript
}


@pytest.fixture(scope="module", params=sorted(KNOWN))
def archive(request):
    return request.param, load_model(ARCHIVES / request.param)


def test_card_read_from_the_archive(archive):
    name, model = archive
    family, layers, width, exchange = KNOWN[name]
    card = model.card
    assert (card.family, card.species, card.cutoff, card.num_layers) == (family, ("Si",), 4.0, layers)
    assert card.receptive_field == 4.0 * layers and card.latent_dim == width and card.ghost_exchange is exchange
    assert detect_family(ARCHIVES / name) == family
    assert card.model_hash == load_model(ARCHIVES / name).card.model_hash    # the same file, the same hash


def test_equals_the_archives_own_forward(archive):
    """Energy, forces and virial from our per-pair gradient of the per-atom energies = the archive's
    own total-energy gradient (float64 <= 1e-10 relative; float32 networks within their noise), and
    the latent = the per-atom features the archive outputs."""
    name, model = archive
    atoms = cell()
    out = evaluate(model, *inputs(model, atoms), virial=True, force_dtype=torch.float64)
    energy, forces, virial, features = own_forward(model, atoms)
    tol = 1e-10 if model.card.dtype == "float64" else 2e-5
    scale = float(forces.abs().max())
    assert scale > 0.1
    assert float(out.atom_energy.sum()) == pytest.approx(energy, rel=tol)
    assert float((out.forces - forces.double()).abs().max()) <= tol * scale
    if virial is not None:
        assert float((out.virial - virial.double()).abs().max()) <= tol * float(virial.abs().max()) * 10
    np.testing.assert_allclose(out.latent.double().numpy(), features.double().detach().numpy(),
                               rtol=tol, atol=tol * float(features.abs().max()))


def test_exchange_path_equals_the_graph_path(archive):
    """Where the archive takes the per-layer exchange, running it (identity exchange on the
    periodic graph) gives the same numbers as the one-call path."""
    name, model = archive
    if not model.card.ghost_exchange:
        assert model.exchange_widths == ()
        return
    args = inputs(model, cell(1))
    widths = []
    plain = evaluate(model, *args)
    exchanged = evaluate(model, *args, exchange=lambda f: widths.append(f.shape[1]) or f)
    assert tuple(widths) == model.exchange_widths == (32,)
    tol = 1e-12 if model.card.dtype == "float64" else 1e-5
    assert float((plain.forces - exchanged.forces).abs().max()) <= tol * float(plain.forces.abs().max())
    assert torch.equal(plain.latent, exchanged.latent)


HEADER = SI_HEADER + "run 0\n"


@pytest.mark.parametrize("name", ["nequip_si_compiled.nequip.pth", "nequip_si_deployed.pth", "allegro_si_deployed.pth",
                                  "mace_si.model-lammps.pt"])
def test_pair_style_ltau_equals_the_archive(name, tmp_path):
    """pair_coeff * * THAT_FILE Si: energy, forces and pressure in LAMMPS = the archive's own forward."""
    atoms = cell(2, strain=False)
    write_lammps_data(tmp_path / "cell.lmp", atoms, specorder=["Si"], masses=False, units="metal")
    got = lammps_results(HEADER.format(data=tmp_path / "cell.lmp", model=ARCHIVES / name))
    model = load_model(ARCHIVES / name)
    energy, forces, virial, _ = own_forward(model, atoms)
    assert got["energy"] == pytest.approx(energy, rel=1e-10)
    assert np.abs(got["forces"] - forces.detach().numpy()).max() <= 1e-10 * float(forces.abs().max())
    w = got["pressure"] / got["nktv2p"] * got["volume"]                   # xx yy zz xy xz yz, eV
    want = virial.detach().numpy()[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
    np.testing.assert_allclose(w, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


def test_info_describes_an_archive():
    res = subprocess.run([sys.executable, "-m", "ltau_lmp.cli", "info", str(ARCHIVES / "nequip_si_deployed.pth")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "nequip-deploy TorchScript archive" in res.stdout and "receptive_field" in res.stdout


# ---- refusals ----------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, drop: str) -> Path:
    """A copy of the archive ``src`` without its entries whose name ends with ``drop``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if not item.filename.endswith(drop):
                zout.writestr(item, zin.read(item.filename))
    return dst


def test_refuses_an_archive_without_r_max(tmp_path):
    path = _rewrite(ARCHIVES / "nequip_si_compiled.nequip.pth", tmp_path / "no_rmax.nequip.pth", "/extra/r_max")
    with pytest.raises(FileFormatError, match="lacks the extra file.*r_max"):
        load_model(path)


def test_refuses_a_frozen_archive(tmp_path):
    frozen = torch.jit.freeze(torch.jit.load(ARCHIVES / "nequip_si_compiled.nequip.pth"))
    torch.jit.save(frozen, tmp_path / "frozen.pth", _extra_files={"r_max": "4.0", "type_names": "Si"})
    with pytest.raises(FileFormatError, match="frozen"):
        load_model(tmp_path / "frozen.pth")


class _NoFeatures(torch.nn.Module):
    """A nequip-shaped archive whose energy model writes per-atom energies but no node features."""

    class SequentialGraphNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer0_convnet = torch.jit.script(_NoFeatures.ConvNetLayer())

        def forward(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self.layer0_convnet(data)

    class ConvNetLayer(torch.nn.Module):
        def forward(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            data["atomic_energy"] = data["edge_vectors"].new_zeros(data["atom_types"].shape[0], 1)
            return data

    def __init__(self):
        super().__init__()
        self.func = self.SequentialGraphNetwork()

    def forward(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.func(data)


def test_refuses_an_archive_without_per_atom_features(tmp_path):
    torch.jit.save(torch.jit.script(_NoFeatures()), tmp_path / "nofeat.pth",
                   _extra_files={"r_max": "4.0", "type_names": "Si", "model_dtype": "float64"})
    with pytest.raises(FileFormatError, match="no per-atom features"):
        load_model(tmp_path / "nofeat.pth")


def test_refuses_an_aotinductor_package(tmp_path):
    with zipfile.ZipFile(tmp_path / "model.nequip.pt2", "w") as archive:   # the layout torch._inductor packages use
        archive.writestr("model/data/aotinductor/model/model.so", b"")
    with pytest.raises(FileFormatError, match="AOTInductor package"):
        load_model(tmp_path / "model.nequip.pt2")


def test_refuses_an_unknown_archive(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), tmp_path / "linear.pt")
    with pytest.raises(FileFormatError, match="TorchScript archive of a kind ltau_lmp does not run"):
        load_model(tmp_path / "linear.pt")


# ---- metatomic AtomisticModel (a metatrain PET: NOTES-metatomic.md) -----------------------------

@pytest.mark.parametrize("slab", [False, True])
def test_metatomic_equals_its_own_calculator(slab):
    """Energy, forces and stress of a metatrain PET export through the contract (forces from the
    positions) = metatomic's own ASE calculator: a periodic cell (the offsets give the cell back)
    and a slab periodic in two directions (offsets that fit no cell: unfolded into images)."""
    pytest.importorskip("metatomic.torch")
    from metatomic_ase import MetatomicCalculator

    model = load_model(ARCHIVES / "metatomic_si.pt")
    card = model.card
    assert (card.family, card.species, card.cutoff, card.latent_dim) == ("metatomic", ("Si",), 4.0, 32)
    assert card.receptive_field == 12.0 and "PET with the feedforward featurizer" in card.latent  # not the declared 8 A
    atoms = cell(4)
    if slab:
        atoms.pbc = (True, True, False)
        atoms.cell[2] *= 3
    out = evaluate(model, *inputs(model, atoms), virial=True)
    atoms.calc = MetatomicCalculator(str(ARCHIVES / "metatomic_si.pt"))
    forces = atoms.get_forces()
    stress = None if slab else atoms.get_stress(voigt=False) * atoms.get_volume()
    assert float(out.atom_energy.sum()) == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
    assert np.abs(out.forces.numpy() - forces).max() <= 1e-10 * np.abs(forces).max()
    if not slab:  # ASE's stress needs a 3-D cell
        np.testing.assert_allclose(out.virial.numpy(), -stress, rtol=1e-10, atol=1e-10 * np.abs(stress).max())
    with pytest.raises(Exception, match="per-atom virials"):
        evaluate(model, *inputs(model, atoms), atom_virial=True)


# ---- replay: error logs for an archive from per-epoch checkpoints or per-epoch archives ---------

def _frames_with_reference(model, n=2):
    """Rattled cells labelled with the archive's own forces plus noise (the 'reference')."""
    from ltau_lmp.integrations.replay import REF_FORCES

    frames = []
    for seed in range(n):
        atoms = cell(10 + seed)
        forces = own_forward(model, atoms)[1].detach().double().numpy()
        atoms.arrays[REF_FORCES] = forces + np.random.default_rng(seed).normal(0, 0.05, forces.shape)
        frames.append(atoms)
    return frames


def test_replay_through_an_archive(tmp_path):
    """A MACE archive replays MACE's per-epoch checkpoints ({"model": state dict}) and per-epoch
    TorchScript exports (epoch_N.pt) alike: each epoch's errors are those of that epoch's weights."""
    from ltau_lmp.estimator import ErrorLog
    from ltau_lmp.integrations.replay import force_errors, replay, replay_errors

    model = load_model(ARCHIVES / "mace_si.model-lammps.pt")
    frames = _frames_with_reference(model)
    scaled = {}
    for epoch, factor in ((1, 0.9), (2, 1.05)):
        archive = torch.jit.load(ARCHIVES / "mace_si.model-lammps.pt")
        with torch.no_grad():
            for name, p in archive.model.named_parameters():
                if "readouts" in name:
                    p.mul_(factor)
        torch.save({"model": archive.model.state_dict()}, tmp_path / f"run_epoch-{epoch}.pt")
        torch.jit.save(archive, tmp_path / f"epoch_{epoch + 2}.pt")
        scaled[epoch] = force_errors(load_model(tmp_path / f"epoch_{epoch + 2}.pt"), frames)
    replayed = {epoch: errors for epoch, _, errors in replay_errors(model, [tmp_path], frames)}
    assert sorted(replayed) == [1, 2, 3, 4]
    for epoch in (1, 2):
        np.testing.assert_allclose(replayed[epoch], scaled[epoch], rtol=1e-10)      # checkpoint into the archive
        np.testing.assert_allclose(replayed[epoch + 2], scaled[epoch], rtol=1e-10)  # the exported archive itself
    assert not np.allclose(replayed[1], replayed[2])
    # held-out frames through the same checkpoints and archives: the validation log, epoch for epoch
    n_train = len(frames[0])
    train, validation = ErrorLog.log_spaced(n_train), ErrorLog.log_spaced(len(frames[1]))
    replay(model, [tmp_path], frames[:1], train, reference_frames=frames[1:], validation_log=validation)
    assert train.epoch == validation.epoch == 4
    for row, epoch in zip(validation.epoch_stats, (1, 2, 1, 2)):
        held_out = scaled[epoch][n_train:]
        np.testing.assert_allclose(row, [held_out.size, held_out.sum(), np.square(held_out).sum(), held_out.max()],
                                   rtol=1e-10)
    np.testing.assert_allclose(train.epoch_stats[1, 1], scaled[2][:n_train].sum(), rtol=1e-10)
    np.testing.assert_allclose(force_errors(model, frames), force_errors(load_model(ARCHIVES / "mace_si.model-lammps.pt"),
                                                                         frames))  # the model itself untouched
    (tmp_path / "other").mkdir()
    shutil.copy(ARCHIVES / "nequip_si_compiled.nequip.pth", tmp_path / "other" / "epoch_5.pt")
    with pytest.raises(FileFormatError, match="not one of the model's kind"):
        list(replay_errors(model, [tmp_path / "other"], frames))


def test_build_estimator_for_an_archive(tmp_path, capsys):
    """build-estimator computes the descriptors with the archive itself (--model + --train-set,
    --reference-set): the estimator binds to that file's hash and calibrates from the held-out set."""
    from ase.io import write

    from ltau_lmp.cli import main
    from ltau_lmp.estimator import ErrorLog, LTAUEstimator
    from ltau_lmp.prediction import predict_frames

    frames = [cell(20 + k) for k in range(4)]
    write(tmp_path / "train_set.xyz", frames)
    write(tmp_path / "reference_set.xyz", [cell(30), cell(31)])
    log = ErrorLog.log_spaced(64 * 4, lo=1e-3, hi=10.0, nbins=20)
    log.update(np.arange(64 * 4), np.exp(np.random.default_rng(0).normal(-3.0, 0.5, 64 * 4)))
    log.end_epoch()
    log.save(tmp_path / "errors.npz")
    archive = ARCHIVES / "nequip_si_deployed.pth"
    assert main(["build-estimator", "--error-log", str(tmp_path / "errors.npz"), "--model", str(archive),
                 "--train-set", str(tmp_path / "train_set.xyz"), "--reference-set", str(tmp_path / "reference_set.xyz"),
                 "-o", str(tmp_path / "est")]) == 0
    assert "computing the training descriptors of 256 atoms in 4 structures" in capsys.readouterr().out
    est = LTAUEstimator.load(tmp_path / "est")
    model = load_model(archive)
    assert est.metadata["model_hash"] == model.card.model_hash and est.has_ood_reference
    latent = predict_frames(model, frames[:1], forces=False).latent
    assert est.query(latent, k=1).distance.max() <= 1e-6  # float32 round-off of the centred search
