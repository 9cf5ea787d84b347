"""Per-layer ghost exchange for NequIP (pair_style ltau message_passing exchange, its default).

With one cutoff of ghost atoms and pairs centred on local atoms, the adapter sends the node
features after each convolution but the last through ``exchange=``: it must give the same
numbers as the thick ghost shell and as one rank (folded graph): forces, energy, virial,
per-atom energy and virial, and fix ltau's per-atom values, by atom ID, on 2 and 3 ranks (3
ranks on a 10.9 A box make subdomains thinner than the ghost cutoff: ghosts of ghosts are
relayed), through re-neighbouring; also with a rank that owns no atom. In-process, an exchange
that copies owners' rows onto explicit periodic images checks the adapter alone.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io.lammpsdata import write_lammps_data

pytest.importorskip("nequip")
from mpi_run import mpirun  # noqa: E402
from adapter_checks import explicit_images, inputs, si_c_cell  # noqa: E402
from test_nequip_adapter import tiny  # noqa: E402

from ltau_lmp.model import NequIPForceField, evaluate  # noqa: E402

SCRIPT = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
mass            1 28.0855
pair_style      ltau message_passing {mode}
pair_coeff      * * {model} Si
neigh_modify    every 5 delay 0 check no
velocity        all create 1500 4928459 mom yes rot yes dist gaussian loop geom
timestep        0.002
fix             md all nve
fix             u all ltau {est} every 10
compute         pe all pe/atom
compute         s all stress/atom NULL
thermo_style    custom step pe pxx pyy pzz pxy pxz pyz
dump            d all custom 20 final.{mode}.* id fx fy fz f_u[1] f_u[2] f_u[3] f_u[4] &
                c_pe c_s[1] c_s[2] c_s[3] c_s[4] c_s[5] c_s[6]
dump_modify     d format float %.17g
run             20
"""

RUNNER = r"""
import json, sys
from mpi4py import MPI
from ltau_lmp.lammps import driver

for mode in sys.argv[1:]:
    lmp = driver.create_lammps(log=f"log.{mode}", screen=False)
    lmp.file(f"in.{mode}")
    thermo = {k: lmp.get_thermo(k) for k in ("pe", "pxx", "pyy", "pzz", "pxy", "pxz", "pyz")}
    thermo["min_nlocal"] = MPI.COMM_WORLD.allreduce(lmp.extract_global("nlocal"), op=MPI.MIN)
    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(f"thermo.{mode}.json", "w") as out:
            json.dump(thermo, out)
    lmp.close()
"""


def _owner_exchange(owners, n_local, calls):
    """The contract's exchange on one process: ghost rows := their owners' rows (differentiable:
    the backward sums ghost gradients onto the owners), recording each call's width."""
    index = torch.from_numpy(owners)

    def exchange(rows):
        calls.append(rows.shape[1])
        return rows[:n_local].index_select(0, index)
    return exchange


def test_exchange_with_one_cutoff_of_ghosts_is_exact():
    adapter = NequIPForceField(tiny("nequip"))
    assert adapter.card.ghost_exchange and adapter.exchange_widths == (32,)
    atoms = si_c_cell(seed=6)
    periodic = evaluate(adapter, *inputs(adapter, atoms))
    cluster, owners = explicit_images(atoms, adapter.card.cutoff + 0.5)
    positions, species, c, n, _, _ = inputs(adapter, cluster)
    keep = c < len(atoms)                                  # pairs centred on local atoms only
    c, n = c[keep], n[keep]
    positions.requires_grad_()
    calls = []
    energy, latent = adapter(positions, species, c, n, None, len(atoms),
                             exchange=_owner_exchange(owners, len(atoms), calls))
    (grad,) = torch.autograd.grad(energy.sum(), positions)
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, owners, -grad.numpy())
    assert calls == [32]
    assert np.abs(forces - periodic.forces.numpy()).max() <= 1e-10
    np.testing.assert_allclose(energy.detach().numpy(), periodic.atom_energy.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(latent.detach().numpy(), periodic.latent.numpy(), rtol=0, atol=1e-10)
    # the same graph without the exchange is wrong: the ghosts' node features had no messages
    wrong, _ = adapter(positions, species, c, n, None, len(atoms))
    assert (wrong - energy).abs().max() > 1e-7


def test_ranks_without_atoms_or_pairs_make_the_same_exchanges():
    adapter = NequIPForceField(tiny("nequip"))
    positions, species, c, n, s, n_local = inputs(adapter, si_c_cell(seed=9))
    owners = np.arange(n_local)
    for local, pairs in ((0, slice(None)), (n_local, slice(0))):
        calls = []
        offset = torch.zeros_like(s[pairs], requires_grad=True)
        energy, latent = adapter(positions, species, c[pairs], n[pairs], s[pairs] + offset, local,
                                 exchange=_owner_exchange(owners, n_local, calls))
        assert energy.shape == (local,) and latent.shape == (local, adapter.latent_dim)
        torch.autograd.grad(energy.sum(), offset, allow_unused=True)   # the backward runs
        assert calls == list(adapter.exchange_widths)


def test_allegro_declares_no_exchange():
    assert not NequIPForceField(tiny("allegro")).card.ghost_exchange


@pytest.fixture(scope="module")
def files(nequip_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("nequip_exchange")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))  # 64 atoms, 10.9 A box
    atoms.positions += np.random.default_rng(1).normal(0.0, 0.08, atoms.positions.shape)
    atoms.wrap()
    write_lammps_data(root / "cell.lmp", atoms, specorder=["Si"], masses=False, units="metal")
    # the same atoms in a box three times as long along a: a slab in its first third, vacuum beyond
    slab = atoms.copy()
    slab.set_cell(atoms.cell.array * [[3.0], [1.0], [1.0]])
    slab.positions += atoms.cell.array[0] / 3
    write_lammps_data(root / "slab.lmp", slab, specorder=["Si"], masses=False, units="metal")
    return {"model": str(nequip_run / "ltau" / "model.ckpt"), "est": str(nequip_run / "ltau" / "estimator"),
            "data": str(root / "cell.lmp"), "slab": str(root / "slab.lmp")}


def _run(files, cwd, nprocs, modes, data="data", extra=""):
    cwd.mkdir()
    for mode in modes:
        (cwd / f"in.{mode}").write_text(extra + SCRIPT.format(mode=mode, **{**files, "data": files[data]}))
    (cwd / "runner.py").write_text(RUNNER)
    res = mpirun([sys.executable, "runner.py", *modes], cwd, nprocs, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = {}
    for mode in modes:
        lines = (cwd / f"final.{mode}.20").read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
        rows = np.loadtxt(lines[start:], ndmin=2)
        thermo = json.loads((cwd / f"thermo.{mode}.json").read_text())
        out[mode] = (rows[np.argsort(rows[:, 0])], thermo, (cwd / f"log.{mode}").read_text())
    return out


@pytest.mark.mpi
def test_exchange_equals_shell_and_one_rank(files, tmp_path):
    reference, thermo1, _ = _run(files, tmp_path / "np1", 1, ["exchange"])["exchange"]
    assert np.abs(reference[:, 1:4]).max() > 0.1                        # a real, moving system
    for nprocs in (2, 3):
        runs = _run(files, tmp_path / f"np{nprocs}", nprocs, ["exchange", "shell"])
        for mode, (rows, thermo, log) in runs.items():
            where = f"{nprocs} ranks, {mode}"
            np.testing.assert_array_equal(rows[:, 0], reference[:, 0])
            assert np.abs(rows[:, 1:4] - reference[:, 1:4]).max() <= 1e-10, where       # forces
            np.testing.assert_array_equal(rows[:, 4:8], reference[:, 4:8], err_msg=where)  # fix ltau
            np.testing.assert_allclose(rows[:, 8], reference[:, 8], rtol=0, atol=1e-10, err_msg=where)  # eV
            virial = reference[:, 9:]                                                    # bar A^3
            np.testing.assert_allclose(rows[:, 9:], virial, rtol=1e-10, atol=1e-10 * np.abs(virial).max(), err_msg=where)
            assert thermo["pe"] == pytest.approx(thermo1["pe"], rel=1e-12, abs=1e-10), where
            for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz"):
                assert thermo[k] == pytest.approx(thermo1[k], rel=1e-9, abs=1e-6), (where, k)
        assert "ghost exchange after each layer" in runs["exchange"][2]
        assert "ghost atoms out to 10 A" not in runs["exchange"][2]
        assert "ghost atoms out to 10 A (receptive field 8 A + skin 2 A)" in runs["shell"][2]


@pytest.mark.mpi
def test_rank_without_atoms_takes_part_in_the_exchanges(files, tmp_path):
    """A slab in a third of the box: with `processors 2 1 1` rank 1 owns no atom, only ghosts,
    and must still make every exchange (collective) for the run to finish, and to be exact."""
    reference = _run(files, tmp_path / "np1", 1, ["exchange"], data="slab")["exchange"][0]
    rows, thermo, log = _run(files, tmp_path / "np2", 2, ["exchange"], data="slab",
                             extra="processors 2 1 1\n")["exchange"]
    assert thermo["min_nlocal"] == 0
    assert np.abs(rows[:, 1:4] - reference[:, 1:4]).max() <= 1e-10
    np.testing.assert_array_equal(rows[:, 4:8], reference[:, 4:8])
    assert "ghost exchange after each layer" in log
