"""NequIP and Allegro models (checkpoints written by LTAUCallback) behind pair_style ltau + fix ltau:
equal to nequip's own ASE calculator, and 1 rank = 2 ranks (NequIP with one cutoff of ghosts and
the per-layer ghost exchange, its default; Allegro with one cutoff of ghosts), with the callback's
estimator. The exchange against the ghost shell, on 2 and 3 ranks: test_nequip_exchange.py."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.io.lammpsdata import write_lammps_data

pytest.importorskip("nequip")
from helpers.adapter_checks import lammps_results  # noqa: E402
from helpers.archives import SI_HEADER  # noqa: E402
from helpers.mpi_run import one_and_two_ranks  # noqa: E402
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform  # noqa: E402
from nequip.integrations.ase import NequIPCalculator  # noqa: E402

from ltau_lmp.model import load_model  # noqa: E402

HEADER = SI_HEADER

MD = HEADER + """\
velocity        all create 900 4928459 mom yes rot yes dist gaussian loop geom
timestep        0.001
fix             md all nve
fix             u all ltau {est} every 10 log u.log
dump            d all custom 40 final.* id fx fy fz f_u[1] f_u[2] f_u[3] f_u[4]
dump_modify     d format float %.17g
run             40
"""


@pytest.fixture(scope="module", params=["nequip", "allegro"])
def setup(request, tmp_path_factory):
    run = request.getfixturevalue(f"{request.param}_run")
    root = tmp_path_factory.mktemp(f"lammps_{request.param}")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))  # 64 atoms, 10.9 A box
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.08, atoms.positions.shape)
    atoms.wrap()
    write_lammps_data(root / "cell.lmp", atoms, specorder=["Si"], masses=False, units="metal")
    return {"kind": request.param, "root": root, "atoms": atoms, "data": str(root / "cell.lmp"),
            "model": str(run / "ltau" / "model.ckpt"), "est": str(run / "ltau" / "estimator")}


def test_equals_nequip_calculator(setup):
    got = lammps_results(HEADER.format(**setup) + "run 0\n")
    forces, energy, p = got["forces"], got["energy"], got["pressure"] / got["nktv2p"]
    model = load_model(setup["model"])  # a checkpoint of known parts: no unpickling, no opt-in
    assert model.card.family == setup["kind"]
    atoms = setup["atoms"].copy()
    atoms.calc = NequIPCalculator(model.graph_model, "cpu", transforms=[
        ChemicalSpeciesToAtomTypeMapper(model_type_names=["Si"], chemical_species_to_atom_type_map={"Si": "Si"}),
        NeighborListTransform(r_max=model.card.cutoff)])
    ref_f = atoms.get_forces()
    assert energy == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
    assert np.abs(forces - ref_f).max() <= 1e-10 * np.abs(ref_f).max()
    stress = atoms.get_stress(voigt=True)                                    # xx yy zz yz xz xy
    np.testing.assert_allclose(-p[[0, 1, 2, 5, 4, 3]], stress, rtol=1e-8, atol=1e-8 * np.abs(stress).max())


@pytest.mark.mpi
def test_one_rank_equals_two_ranks(setup, tmp_path):
    """40 NVE steps with fix ltau: forces <= 1e-10 eV/A and the per-atom uncertainties equal, by atom ID."""
    runs = one_and_two_ranks(tmp_path, MD.format(**setup), "final.40", timeout=300)
    (one, _), (two, log2) = runs[1], runs[2]
    np.testing.assert_array_equal(one[:, 0], two[:, 0])
    assert np.abs(one[:, 1:4] - two[:, 1:4]).max() <= 1e-10
    assert np.abs(one[:, 1:4]).max() > 0.1
    assert np.isfinite(one[:, 4:]).all() and (one[:, 4] > 0).all()
    np.testing.assert_allclose(two[:, 4:], one[:, 4:], rtol=1e-6, atol=1e-9)
    if setup["kind"] == "nequip":  # message passing: one cutoff of ghosts, exchanged after each layer
        assert "ghost exchange after each layer" in log2
