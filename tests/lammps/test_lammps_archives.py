"""TorchScript archives (tests/data/archives) behind pair_style ltau and fix ltau on several MPI
ranks: `pair_coeff * * THAT_FILE Si`, the file a user gives pair_nequip, pair_allegro or
pair_style mace. Exact on 1, 2 and 3 ranks, by atom ID (forces, per-atom energies and virials,
fix ltau's values), both ways for the message-passing archives (per-layer ghost exchange through
the archive's own layers, and the ghost shell), with a rank that owns no atom; and fix ltau's
latent for each atom equal to the per-atom features of the archive's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from helpers.archives import ARCHIVES, SI_HEADER, own_forward
from helpers.exchange_checks import run_modes, write_cell_and_slab
from helpers.exchange_checks import (test_exchange_equals_shell_and_one_rank,  # noqa: F401 (collected here)
                                     test_rank_without_atoms_takes_part_in_the_exchanges)
from helpers.fix_ltau import in_process

from ltau_lmp.estimator import ErrorLog, LTAUEstimator
from ltau_lmp.model import evaluate, load_model, neighbor_list, species_indices

# nequip 0.19 nequip-compile, nequip 0.6 nequip-deploy, mace_create_lammps_model
MESSAGE_PASSING = ["nequip_si_compiled.nequip.pth", "nequip_si_deployed.pth", "mace_si.model-lammps.pt"]


def rattled(seed: int):
    """64 atoms of rattled diamond Si in a 10.9 A orthorhombic box."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.08, atoms.positions.shape)
    atoms.wrap()
    return atoms


def write_estimator(model, latent: np.ndarray, path, k: int = 5) -> np.ndarray:
    """An estimator over ``latent``, every entry with its own error scale; returns those scales."""
    rng = np.random.default_rng(0)
    scales = np.exp(rng.normal(-3.0, 0.7, len(latent)))
    log = ErrorLog.log_spaced(len(latent), lo=1e-3, hi=10.0, nbins=40)
    for _ in range(3):
        log.update(np.arange(len(latent)), scales * np.exp(rng.normal(0.0, 0.1, len(latent))))
        log.end_epoch()
    LTAUEstimator.build(latent.astype(np.float32), log, k=k, index="flat",
                        metadata={"model_hash": model.card.model_hash}).save(path)
    return LTAUEstimator.load(path).entry_expected


def archive_files(name: str, root) -> dict:
    model = load_model(ARCHIVES / name)
    latents = []
    for seed in (10, 11, 12):
        cell = rattled(seed)
        c, n, s = neighbor_list(cell, model.card.cutoff)
        latents.append(evaluate(model, torch.tensor(cell.positions), torch.from_numpy(species_indices(cell, ["Si"])),
                                torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(cell),
                                forces=False).latent.double().numpy())
    write_estimator(model, np.concatenate(latents), root / "est")
    return {"model": str(ARCHIVES / name), "est": str(root / "est"), "elements": "Si", "masses": "mass 1 28.0855",
            "pair_options": "", "fix_options": "metric distance", **write_cell_and_slab(root, rattled(0), ["Si"])}


@pytest.fixture(scope="module", params=MESSAGE_PASSING)
def files(request, tmp_path_factory):
    return archive_files(request.param, tmp_path_factory.mktemp("archive"))


@pytest.mark.mpi
def test_strictly_local_archive_on_one_two_three_ranks(tmp_path):
    """A deployed Allegro (strictly local: one cutoff of ghosts, no exchange) on 1, 2, 3 ranks."""
    files = archive_files("allegro_si_deployed.pth", tmp_path / "files")
    reference = run_modes(files, tmp_path / "np1", 1, ["exchange"])["exchange"][0]
    assert np.abs(reference[:, 1:4]).max() > 0.1
    for nprocs in (2, 3):
        rows, _, log = run_modes(files, tmp_path / f"np{nprocs}", nprocs, ["exchange"])["exchange"]
        np.testing.assert_array_equal(rows[:, 0], reference[:, 0])
        assert np.abs(rows[:, 1:4] - reference[:, 1:4]).max() <= 1e-10
        np.testing.assert_allclose(rows[:, 4:8], reference[:, 4:8], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(rows[:, 8:], reference[:, 8:], rtol=1e-10, atol=1e-10 * np.abs(reference[:, 8:]).max())
        assert "ghost exchange after each layer" not in log


METATOMIC = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
{masses}
pair_style      ltau message_passing {mode}
pair_coeff      * * {model} {elements}
velocity        all create 1500 4928459 mom yes rot yes dist gaussian loop geom
timestep        0.002
fix             md all nve
fix             u all ltau {est} every 2 {fix_options}
compute         pe all pe/atom
thermo_style    custom step pe pxx pyy pzz pxy pxz pyz
dump            d all custom 20 final.{mode}.* id fx fy fz f_u[1] f_u[2] f_u[3] f_u[4] c_pe
dump_modify     d format float %.17g
run             4
write_dump      all custom final.{mode}.20 id fx fy fz f_u[1] f_u[2] f_u[3] f_u[4] c_pe modify format float %.17g
"""


@pytest.mark.mpi
def test_metatomic_archive_on_one_two_three_ranks(tmp_path):
    """A metatrain PET export: 1 rank (periodic graph unfolded into images) = 2 = 3 ranks (ghost
    shell out to its 12 A reach), forces, per-atom energies and fix ltau's values by atom ID."""
    pytest.importorskip("metatomic.torch")
    files = archive_files("metatomic_si.pt", tmp_path / "files")
    reference, thermo1, _ = run_modes(files, tmp_path / "np1", 1, ["shell"], script=METATOMIC)["shell"]
    assert np.abs(reference[:, 1:4]).max() > 0.1
    for nprocs in (2, 3):
        rows, thermo, log = run_modes(files, tmp_path / f"np{nprocs}", nprocs, ["shell"], script=METATOMIC)["shell"]
        np.testing.assert_array_equal(rows[:, 0], reference[:, 0])
        assert np.abs(rows[:, 1:4] - reference[:, 1:4]).max() <= 1e-10
        np.testing.assert_allclose(rows[:, 4:8], reference[:, 4:8], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(rows[:, 8], reference[:, 8], rtol=0, atol=1e-10)
        for k in ("pe", "pxx", "pyy", "pzz", "pxy", "pxz", "pyz"):
            assert thermo[k] == pytest.approx(thermo1[k], rel=1e-9, abs=1e-6), (nprocs, k)
        assert "ghost atoms out to 14 A (receptive field 12 A + skin 2 A)" in log


FIX = SI_HEADER + """\
fix             u all ltau {est} k 1 metric distance
run             0
"""


@pytest.mark.parametrize("name", ["nequip_si_compiled.nequip.pth", "nequip_si_deployed.pth",
                                  "allegro_si_deployed.pth", "mace_si.model-lammps.pt", "metatomic_si.pt"])
def test_fix_latent_is_the_archives_own_features(name, tmp_path):
    """An estimator of the archive's own per-atom features of the very cell LAMMPS runs (k = 1):
    every atom finds itself at distance 0 and gets its own entry's expected error."""
    atoms = rattled(3)
    files = write_cell_and_slab(tmp_path, atoms, ["Si"])
    model = load_model(ARCHIVES / name)
    if name == "metatomic_si.pt":
        pytest.importorskip("metatomic.torch")
        from metatomic.torch import ModelOutput
        from metatomic_ase import MetatomicCalculator

        features = MetatomicCalculator(str(ARCHIVES / name)).run_model(atoms, {"feature": ModelOutput(
            sample_kind="atom")})["feature"].block().values.detach().double().numpy()
    else:
        features = own_forward(model, atoms)[3].detach().double().numpy()
    expected = write_estimator(model, features, tmp_path / "est", k=1)
    state, error = in_process(FIX.format(data=files["data"], model=ARCHIVES / name, est=tmp_path / "est"))
    assert error == ""
    values = state["peratom"]                               # expected, lower, upper, distance by atom ID
    assert values[:, 3].max() <= 1e-5 * np.abs(features).max()
    np.testing.assert_allclose(values[:, 0], expected, rtol=1e-6)


def test_metatomic_refuses_per_atom_virials(tmp_path):
    """compute stress/atom asks per-atom virials, which a model reading positions does not have:
    the run stops with that reason, not with wrong numbers."""
    pytest.importorskip("metatomic.torch")
    files = write_cell_and_slab(tmp_path, rattled(5), ["Si"])
    script = FIX.replace("fix             u all ltau {est} k 1 metric distance\n", "compute s all stress/atom NULL\n"
                         "compute p all reduce sum c_s[1]\nthermo_style custom step c_p\n")
    _, error = in_process(script.format(data=files["data"], model=ARCHIVES / "metatomic_si.pt", est=""))
    assert "per-atom virials" in error and "metatomic" in error
