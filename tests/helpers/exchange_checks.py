"""The LAMMPS checks of the per-layer ghost exchange that every message-passing family must pass
(MACE in the main environment, NequIP in .venv-nequip): exchange ≡ ghost shell ≡ one rank, and a
rank without atoms taking part in every exchange.

The two tests at the end are the same for every family: a family's test file imports them next
to its module-scoped ``files`` fixture, and pytest collects them there, with that fixture.
``files``: ``model``, ``est``, ``data`` (a periodic cell), ``slab`` (the same atoms in a third of
a box three times as long), ``elements`` (``pair_coeff`` words), ``masses`` (``mass`` lines),
``pair_options`` and ``fix_options`` (extra keywords of ``pair_style ltau`` and ``fix ltau``).
"""

import json
import sys

import numpy as np
import pytest
from ase.io.lammpsdata import write_lammps_data

from helpers.mpi_run import mpirun, read_dump_rows

SCRIPT = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
{masses}
pair_style      ltau {pair_options} message_passing {mode}
pair_coeff      * * {model} {elements}
neigh_modify    every 5 delay 0 check no
velocity        all create 1500 4928459 mom yes rot yes dist gaussian loop geom
timestep        0.002
fix             md all nve
fix             u all ltau {est} every 10 {fix_options}
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


def write_cell_and_slab(root, atoms, specorder) -> dict:
    """``data`` and ``slab`` data files of ``atoms`` (the slab: the same atoms in the first third
    of a box three times as long along a, vacuum beyond)."""
    write_lammps_data(root / "cell.lmp", atoms, specorder=specorder, masses=False, units="metal")
    slab = atoms.copy()
    slab.set_cell(atoms.cell.array * [[3.0], [1.0], [1.0]])
    slab.positions += atoms.cell.array[0] / 3
    write_lammps_data(root / "slab.lmp", slab, specorder=specorder, masses=False, units="metal")
    return {"data": str(root / "cell.lmp"), "slab": str(root / "slab.lmp")}


def run_modes(files, cwd, nprocs, modes, data="data", extra="", script=SCRIPT):
    """Each mode's final per-atom rows (sorted by ID), thermo values and log, from one mpirun
    (``script``: SCRIPT, or one with the same dump name and steps)."""
    cwd.mkdir()
    for mode in modes:
        (cwd / f"in.{mode}").write_text(extra + script.format(mode=mode, **{**files, "data": files[data]}))
    (cwd / "runner.py").write_text(RUNNER)
    res = mpirun([sys.executable, "runner.py", *modes], cwd, nprocs, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = {}
    for mode in modes:
        thermo = json.loads((cwd / f"thermo.{mode}.json").read_text())
        out[mode] = (read_dump_rows(cwd / f"final.{mode}.20"), thermo, (cwd / f"log.{mode}").read_text())
    return out


def check_exchange_equals_shell_and_one_rank(files, tmp_path, shell_line: str):
    """2 and 3 ranks (3 on a 10.9 A box: ghosts of ghosts are relayed), both modes, against one
    rank: forces, per-atom energy and virial to 1e-10, fix ltau's per-atom values to 1e-6 (the
    estimator searches float32 latents: a last-bit difference may round differently), energy and
    pressure; ``shell_line``: what the shell writes to the log."""
    reference, thermo1, _ = run_modes(files, tmp_path / "np1", 1, ["exchange"])["exchange"]
    assert np.abs(reference[:, 1:4]).max() > 0.1                        # a real, moving system
    for nprocs in (2, 3):
        runs = run_modes(files, tmp_path / f"np{nprocs}", nprocs, ["exchange", "shell"])
        for mode, (rows, thermo, log) in runs.items():
            where = f"{nprocs} ranks, {mode}"
            np.testing.assert_array_equal(rows[:, 0], reference[:, 0])
            assert np.abs(rows[:, 1:4] - reference[:, 1:4]).max() <= 1e-10, where       # forces
            np.testing.assert_allclose(rows[:, 4:8], reference[:, 4:8], rtol=1e-6, atol=1e-9, err_msg=where)  # fix ltau
            np.testing.assert_allclose(rows[:, 8], reference[:, 8], rtol=0, atol=1e-10, err_msg=where)  # eV
            virial = reference[:, 9:]                                                    # bar A^3
            np.testing.assert_allclose(rows[:, 9:], virial, rtol=1e-10, atol=1e-10 * np.abs(virial).max(), err_msg=where)
            assert thermo["pe"] == pytest.approx(thermo1["pe"], rel=1e-12, abs=1e-10), where
            for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz"):
                assert thermo[k] == pytest.approx(thermo1[k], rel=1e-9, abs=1e-6), (where, k)
        assert "ghost exchange after each layer" in runs["exchange"][2]
        assert shell_line not in runs["exchange"][2]
        assert shell_line in runs["shell"][2]


def check_rank_without_atoms(files, tmp_path):
    """A slab in a third of the box: with `processors 2 1 1` rank 1 owns no atom, only ghosts,
    and must still make every exchange (collective) for the run to finish, and to be exact."""
    reference = run_modes(files, tmp_path / "np1", 1, ["exchange"], data="slab")["exchange"][0]
    rows, thermo, log = run_modes(files, tmp_path / "np2", 2, ["exchange"], data="slab",
                                  extra="processors 2 1 1\n")["exchange"]
    assert thermo["min_nlocal"] == 0
    assert np.abs(rows[:, 1:4] - reference[:, 1:4]).max() <= 1e-10
    np.testing.assert_allclose(rows[:, 4:8], reference[:, 4:8], rtol=1e-6, atol=1e-9)
    assert "ghost exchange after each layer" in log



@pytest.mark.mpi
def test_exchange_equals_shell_and_one_rank(files, tmp_path):
    check_exchange_equals_shell_and_one_rank(files, tmp_path, "ghost atoms out to 10 A (receptive field 8 A + skin 2 A)")


@pytest.mark.mpi
def test_rank_without_atoms_takes_part_in_the_exchanges(files, tmp_path):
    check_rank_without_atoms(files, tmp_path)
