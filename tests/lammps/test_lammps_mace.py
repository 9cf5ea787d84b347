"""A MACE model behind pair_style ltau + fix ltau: exact against MACE's own calculator, exact
across MPI ranks (the default per-layer ghost exchange; exchange vs thick ghost shell in
test_lammps_exchange.py), and clear errors on every rank for bad set-ups.

The model is a randomly initialised two-species MACE (8 channels, 2 interactions, r_max 4 A,
float64): exactness does not need a trained model. Its file is MACE's own format (a pickled
module), so every script opts in with ``pair_style ltau allow_pickle yes``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io.lammpsdata import write_lammps_data

pytest.importorskip("mace")
from mace.calculators import MACECalculator  # noqa: E402
from helpers.adapter_checks import lammps_results  # noqa: E402
from helpers.mpi_run import one_and_two_ranks, per_rank  # noqa: E402
from helpers.mace_models import tiny_mace  # noqa: E402

from ltau_lmp.estimator import ErrorLog, LTAUEstimator  # noqa: E402
from ltau_lmp.model import MACEForceField, evaluate, neighbor_list, species_indices  # noqa: E402


HEADER = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
mass            1 12.011
mass            2 28.0855
pair_style      ltau allow_pickle yes
pair_coeff      * * {model} C Si
"""


def _structure(seed: int = 0):
    """64 atoms of rattled diamond Si with every fifth atom C; orthorhombic (no box rotation)."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.symbols[::5] = "C"
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.08, atoms.positions.shape)
    atoms.wrap()
    return atoms


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mace_lammps")
    model = tiny_mace(seed=3)
    torch.save(model, root / "tiny.model")
    atoms = _structure()
    write_lammps_data(root / "cell.lmp", atoms, specorder=["C", "Si"], masses=False, units="metal")
    adapter = MACEForceField(model)
    # estimator from the adapter's own latents of rattled cells, each entry with its own error scale
    latents = []
    for seed in range(3):
        cell = _structure(seed + 10)
        c, n, s = neighbor_list(cell, adapter.card.cutoff)
        out = evaluate(adapter, torch.tensor(cell.positions), torch.from_numpy(species_indices(cell, list(adapter.card.species))),
                       torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(cell), forces=False)
        latents.append(out.latent.detach().numpy().astype(np.float32))
    latent = np.concatenate(latents)
    rng = np.random.default_rng(0)
    log = ErrorLog.log_spaced(len(latent), lo=1e-3, hi=10.0, nbins=40)
    for _ in range(4):
        log.update(np.arange(len(latent)), np.exp(rng.normal(-3.0, 0.7, len(latent))))
        log.end_epoch()
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": adapter.card.model_hash}).save(root / "est")
    other = MACEForceField(tiny_mace(seed=4))
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": other.card.model_hash}).save(root / "est_other")
    return {"root": root, "model": str(root / "tiny.model"), "data": str(root / "cell.lmp"), "atoms": atoms,
            "est": str(root / "est"), "est_other": str(root / "est_other")}


def test_equals_mace_calculator(files, tmp_path):
    """Energy, forces and virial in LAMMPS = MACE's own ASE calculator (<= 1e-8 relative)."""
    got = lammps_results(HEADER.format(data=files["data"], model=files["model"]) +
                         "compute pe all pe/atom\ncompute s all stress/atom NULL\nrun 0\n", per_atom=True)
    forces, energy, volume = got["forces"], got["energy"], got["volume"]
    # no velocities: the pressure is the virial alone; bar -> eV/A^3 with LAMMPS's own constant
    p = got["pressure"] / got["nktv2p"]
    atom_energy = got["energies"]
    atom_virial = got["stress_atom"].sum(0) / got["nktv2p"]
    atoms = files["atoms"].copy()
    atoms.calc = MACECalculator(model_paths=files["model"], device="cpu", default_dtype="float64")
    ref_f = atoms.get_forces()
    assert energy == pytest.approx(atoms.get_potential_energy(), rel=1e-8)
    assert np.abs(forces - ref_f).max() <= 1e-8 * np.abs(ref_f).max()
    stress = atoms.get_stress(voigt=True)                                    # xx yy zz yz xz xy, eV/A^3
    lmp_stress = -p[[0, 1, 2, 5, 4, 3]]
    np.testing.assert_allclose(lmp_stress, stress, rtol=1e-8, atol=1e-8 * np.abs(stress).max())
    # per-atom energies and virials (compute pe/atom, stress/atom) sum to the global ones
    assert atom_energy.sum() == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(-atom_virial, p * volume, rtol=1e-10, atol=1e-10 * np.abs(p * volume).max())


MD = HEADER + """\
velocity        all create 900 4928459 mom yes rot yes dist gaussian loop geom
timestep        0.001
fix             md all nve
fix             u all ltau {est} every 20 metric distance log u.log
dump            d all custom 100 final.* id fx fy fz f_u[1] f_u[2] f_u[3] f_u[4]
dump_modify     d format float %.17g
run             100
"""


@pytest.mark.mpi
def test_one_rank_equals_two_ranks(files, tmp_path):
    """100 NVE steps: forces <= 1e-10 eV/A and fix ltau's per-atom values equal, by atom ID."""
    runs = one_and_two_ranks(tmp_path, MD.format(data=files["data"], model=files["model"], est=files["est"]), "final.100")
    (one, _), (two, log2) = runs[1], runs[2]
    np.testing.assert_array_equal(one[:, 0], two[:, 0])
    assert np.abs(one[:, 1:4] - two[:, 1:4]).max() <= 1e-10
    assert np.abs(one[:, 1:4]).max() > 0.1                       # a real, moving system
    np.testing.assert_allclose(two[:, 4:], one[:, 4:], rtol=1e-6, atol=1e-9)
    # the default on several ranks: one cutoff of ghosts and a ghost exchange per layer
    assert "ghost exchange after each layer" in log2 and "ghost atoms out to 10 A" not in log2


BAD = {
    "no pickle opt-in": (HEADER.replace(" allow_pickle yes", ""), "allow_pickle"),
    "species the model lacks": (HEADER.replace("C Si", "Ge Si"), "Ge not in model"),
    "ghost cutoff set too short": (HEADER.replace("allow_pickle yes", "allow_pickle yes message_passing shell")
                                   + "comm_modify cutoff 6.0\n", "add `comm_modify cutoff 10`"),
    "unknown message_passing": (HEADER.replace("allow_pickle yes", "allow_pickle yes message_passing thick"),
                                "message_passing must be exchange or shell, got 'thick'"),
    "estimator of another model": (HEADER + "fix u all ltau {est_other}\n", "was built for model"),
    "unknown pair_style keyword": (HEADER.replace("allow_pickle yes", "allow_pickles yes"),
                                   "unknown keyword 'allow_pickles'"),
}

@pytest.mark.mpi
def test_bad_setups_stop_every_rank_with_the_cause(files, tmp_path):
    scripts = {f"in.bad{i}": script.format(data=files["data"], model=files["model"], est_other=files["est_other"])
               + "run 0\n" for i, (script, _) in enumerate(BAD.values())}
    got = per_rank(tmp_path, scripts, timeout=300)
    for (case, (_, message)), name in zip(BAD.items(), scripts):
        for rank in (0, 1):
            assert got[name][rank].startswith("ERROR") and message in got[name][rank], (rank, case, got[name])
