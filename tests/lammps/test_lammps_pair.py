"""pair_style ltau (and the fix ltau shim) inside LAMMPS: exactness, MPI, error handling.

In-process tests run LAMMPS on one rank in this process; the ``mpi`` ones launch
``mpirun -np 2`` with a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io.lammpsdata import write_lammps_data

from helpers.adapter_checks import lammps_results
from helpers.mpi_run import mpirun

from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.model import LocalForceField, save_model

EV_A3_TO_BAR = 1.602176634e6
SPECIES = ["Si", "C"]

HEADER = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
mass            1 28.0855
mass            2 12.011
"""


@pytest.fixture(scope="module")
def model():
    return LocalForceField(SPECIES, cutoff=4.0, n_basis=6, n_radial=6, max_l=2, hidden=(32,),
                           latent_dim=16, seed=7)


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, path)
    return str(path)


def _lammps_cell(atoms: Atoms) -> Atoms:
    """Rotate the cell into LAMMPS's lower-triangular form so positions need no mapping."""
    atoms = atoms.copy()
    cell, _ = atoms.cell.standard_form()
    atoms.set_cell(cell, scale_atoms=True)
    atoms.wrap()
    return atoms


def _structures() -> dict[str, Atoms]:
    rng = np.random.default_rng(0)
    big = bulk("Si", "diamond", a=5.431, cubic=True) * (3, 3, 3)
    big.positions += rng.normal(0, 0.1, big.positions.shape)
    big.symbols[rng.choice(len(big), 20, replace=False)] = "C"
    small = bulk("Si", "diamond", a=5.431, cubic=True)  # 5.4 A < 2 x cutoff: images of itself
    small.positions += rng.normal(0, 0.1, small.positions.shape)
    small.symbols[[1, 6]] = "C"
    tri = bulk("Si", "diamond", a=5.431) * (2, 1, 1)    # triclinic, 3.8 A edges
    tri.set_cell(tri.cell.array + [[0.0, 0.0, 0.0], [0.3, 0.0, 0.1], [0.0, 0.2, 0.0]], scale_atoms=True)
    tri.positions += rng.normal(0, 0.1, tri.positions.shape)
    tri.symbols[0] = "C"
    return {name: _lammps_cell(a) for name, a in (("bulk216", big), ("cubic8", small), ("triclinic4", tri))}


def _write_data(atoms: Atoms, path: Path) -> str:
    write_lammps_data(str(path), atoms, specorder=SPECIES, atom_style="atomic", units="metal")
    return str(path)


def _reference(model, atoms: Atoms) -> dict:
    """The ASE calculator's numbers (periodic neighbour list with shift vectors)."""
    atoms = atoms.copy()
    atoms.calc = LTAUCalculator(model)
    return {"energy": atoms.get_potential_energy(), "energies": atoms.get_potential_energies(),
            "forces": atoms.get_forces(), "stress": atoms.get_stress(voigt=True)}


def _run_lammps(script: str):
    return lammps_results(script, per_atom=True)


@pytest.mark.parametrize("name", ["bulk216", "cubic8", "triclinic4"])
def test_matches_ase_side(name, model, model_file, tmp_path):
    atoms = _structures()[name]
    data = _write_data(atoms, tmp_path / "data.lmp")
    got = _run_lammps(HEADER.format(data=data) + f"""
pair_style ltau
pair_coeff * * {model_file} Si C
compute pe all pe/atom
compute s all stress/atom NULL
run 0
""")
    ref = _reference(model, atoms)
    assert got["energy"] == pytest.approx(ref["energy"], rel=1e-6)
    scale = np.abs(ref["forces"]).max()
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(got["energies"], ref["energies"], rtol=0, atol=1e-6 * np.abs(ref["energies"]).max())
    xx, yy, zz, yz, xz, xy = ref["stress"]  # ASE Voigt order; pressure = -stress
    ref_p = -np.array([xx, yy, zz, xy, xz, yz]) * EV_A3_TO_BAR
    np.testing.assert_allclose(got["pressure"], ref_p, rtol=0, atol=1e-6 * np.abs(ref_p).max())
    # per-atom virial (compute stress/atom, bar*A^3) sums to the global one: -P V
    np.testing.assert_allclose(-got["stress_atom"].sum(0), ref_p * got["volume"], rtol=0,
                               atol=1e-6 * np.abs(ref_p).max() * got["volume"])


def test_type_mapping_follows_pair_coeff(model, model_file, tmp_path):
    """Types map to species by pair_coeff order: swapping both the data and the map changes nothing."""
    atoms = _structures()["cubic8"]
    write_lammps_data(str(tmp_path / "d.lmp"), atoms, specorder=["C", "Si"], atom_style="atomic", units="metal")
    got = _run_lammps(HEADER.format(data=tmp_path / "d.lmp").replace("mass            1 28.0855\nmass            2 12.011",
                                                                    "mass 1 12.011\nmass 2 28.0855") + f"""
pair_style ltau
pair_coeff * * {model_file} C Si
compute pe all pe/atom
compute s all stress/atom NULL
run 0
""")
    assert got["energy"] == pytest.approx(_reference(model, atoms)["energy"], rel=1e-10)


# --------------------------------------------------------------------------------------------
# MPI: two ranks
# --------------------------------------------------------------------------------------------

def _read_dump(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    return np.loadtxt(lines[start:])


MD_SCRIPT = HEADER + """\
pair_style      ltau
pair_coeff      * * {model} Si C
compute         pe all pe/atom
run             0
write_dump      all custom f0.dump id fx fy fz c_pe modify sort id format float %.17g
velocity        all create 600 87287 mom yes rot yes dist gaussian
timestep        0.0005
fix             md all nve
fix             pr all print 10 "$(step) $(pe:%.17g) $(etotal:%.17g)" file energy.txt screen no
run             {steps}
write_dump      all custom x.dump id x y z vx vy vz modify sort id format float %.17g
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _write_data(_structures()["bulk216"], tmp_path_factory.mktemp("data") / "bulk216.lmp")


def _md(tmp_path: Path, nprocs: int, model_file: str, data_file: str, launcher: list[str], steps: int):
    run_dir = tmp_path / f"{launcher[0]}{nprocs}"
    run_dir.mkdir()
    (run_dir / "in.md").write_text(MD_SCRIPT.format(data=data_file, model=model_file, steps=steps))
    res = mpirun([*launcher, "in.md", "-log", "none"] if launcher[0] == "ltau-lmp"
                  else [*launcher, "-in", "in.md", "-log", "none"], run_dir, nprocs, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return (_read_dump(run_dir / "f0.dump"), _read_dump(run_dir / "x.dump"),
            np.loadtxt(run_dir / "energy.txt"))


@pytest.mark.mpi
def test_one_vs_two_ranks_and_nve(model_file, data_file, tmp_path):
    f1, x1, e1 = _md(tmp_path, 1, model_file, data_file, ["ltau-lmp", "run"], 200)
    f2, x2, e2 = _md(tmp_path, 2, model_file, data_file, ["ltau-lmp", "run"], 200)
    np.testing.assert_array_equal(f1[:, 0], f2[:, 0])
    assert np.abs(f1[:, 1:4] - f2[:, 1:4]).max() <= 1e-10        # forces, eV/A
    assert np.abs(f1[:, 4] - f2[:, 4]).max() <= 1e-10            # per-atom energies, eV
    assert np.abs(x1[:, 1:4] - x2[:, 1:4]).max() <= 1e-8         # 200 NVE steps, A
    assert np.abs(e1[:, 2] - e2[:, 2]).max() <= 1e-8
    # NVE with dt = 0.5 fs at 600 K: total energy stays within 1e-4 eV/atom of its start
    assert np.abs(e1[:, 2] - e1[0, 2]).max() / 216 < 1e-4


@pytest.mark.mpi
def test_lmp_binary_matches_ltau_lmp_run(model_file, data_file, tmp_path):
    """The wheel's own lmp (auto-loaded plugin + embedded Python) gives the same numbers."""
    f_run, x_run, _ = _md(tmp_path, 2, model_file, data_file, ["ltau-lmp", "run"], 20)
    f_lmp, x_lmp, _ = _md(tmp_path, 2, model_file, data_file, ["lmp"], 20)
    assert np.abs(f_run - f_lmp).max() <= 1e-10
    assert np.abs(x_run - x_lmp).max() <= 1e-10


BAD_INPUTS = {
    "missing model file": ("pair_style ltau\npair_coeff * * /nonexistent/m.pt Si C\nrun 0", "no such file"),
    "element not in model": ("pair_style ltau\npair_coeff * * {model} Si Ge\nrun 0", "Ge not in model"),
    "wrong number of types": ("pair_style ltau\npair_coeff * * {model} Si\nrun 0", "one element per atom type"),
    "not a model file": ("pair_style ltau\npair_coeff * * {data} Si C\nrun 0", "not a torch model file"),
    "newton pair off": ("newton off\npair_style ltau\npair_coeff * * {model} Si C\nrun 0", "requires newton pair on"),
    "units real": ("units real\npair_style ltau\npair_coeff * * {model} Si C\nrun 0", "requires units metal"),
    "fix without pair_style ltau": ("pair_style zero 4.0\npair_coeff * *\nfix u all ltau est", "requires pair_style ltau"),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_both_ranks(case, model_file, data_file, tmp_path):
    body, expected = BAD_INPUTS[case]
    first, rest = body.split("\n", 1)
    if first.startswith("units"):
        script = HEADER.replace("units           metal", first) + rest
    elif first.startswith("newton"):  # must come before the box exists
        script = first + "\n" + HEADER.format(data=data_file) + rest
    else:
        script = HEADER.format(data=data_file) + body
    (tmp_path / "in.bad").write_text(script.format(model=model_file, data=data_file) + "\n")
    res = mpirun(["ltau-lmp", "run", "in.bad", "-log", "none"], tmp_path, timeout=90)
    assert res.returncode != 0
    assert expected in res.stdout + res.stderr, res.stdout[-1500:] + res.stderr[-1500:]


RANK1_FAILS = """
import sys
from mpi4py import MPI
from ltau_lmp.lammps import driver, pair

rank = MPI.COMM_WORLD.Get_rank()
if rank == 1:
    compute = pair.PairRuntime.compute
    def failing(self, args):
        if args.step >= 5:
            raise RuntimeError("injected failure on rank 1")
        return compute(self, args)
    pair.PairRuntime.compute = failing
lmp = driver.create_lammps(log="none")
try:
    lmp.file("in.md")
    print(f"rank {rank} finished", flush=True)
except Exception as exc:
    print(f"rank {rank} stopped: {exc}", flush=True)
"""


@pytest.mark.mpi
def test_exception_on_one_rank_stops_all(model_file, data_file, tmp_path):
    (tmp_path / "in.md").write_text(MD_SCRIPT.format(data=data_file, model=model_file, steps=20))
    (tmp_path / "rank1.py").write_text(RANK1_FAILS)
    res = mpirun([sys.executable, "rank1.py"], tmp_path, timeout=90)
    out = res.stdout
    assert "rank 0 stopped" in out and "rank 1 stopped" in out, out + res.stderr[-2000:]
    assert "injected failure on rank 1" in out.split("rank 0 stopped")[1].splitlines()[0]


FIX_STANDIN = '''
import numpy as np
from mpi4py import MPI
from ltau_lmp.collective import HaltCondition
from ltau_lmp.lammps import bridge, driver
from ltau_lmp.lammps.fix_options import FixOptions

class StandIn:
    """Stand-in for FixLtau (no estimator): column 1 = tag, halt once at 25, error at 45."""
    n_peratom, n_vector = 4, 5
    def __init__(self, fix_id, args, comm, features):
        self.comm, self.features, self.args, self.halted = comm, features, args, False
        self.opts = FixOptions.parse(args)
    def bind(self, features):
        self.features = features
    def start(self, step, n_watched):
        return f"stand-in watching {n_watched} atoms from step {step}"
    def end_of_step(self, v):
        step, nlocal = v.step, len(v.tag)
        assert np.allclose(v.box, [0, 0, 0, 16.293, 16.293, 16.293, 0, 0, 0]) and v.periodic == (True,) * 3
        assert self.features.step == step and self.features.latent.shape == (nlocal, 16)
        assert np.array_equal(np.sort(self.features.tags), np.sort(v.tag))
        # the fix's own arrays: its group, the forces and the types (as the pair's elements)
        assert v.in_group.all() and v.f.shape == (nlocal, 3) and np.isfinite(v.f).all()
        assert set(self.features.symbols(v.type)) <= {"Si", "C"}
        v.peratom[:, 0] = v.tag
        v.peratom[:, 1:] = self.features.latent[:, :3]
        v.global_out[0] = self.comm.allreduce(float(v.tag.max(initial=0)), op=MPI.MAX)
        v.global_out[1:] = [step, len(self.args), self.comm.allreduce(nlocal), 0, 0]
        if step == 45:
            raise ValueError("estimator exploded at step 45")
        if step == 25 and v.check_halt and not self.halted:
            self.halted = True
            raise HaltCondition("stand-in halt at step 25")

bridge.FixLtau = StandIn
lmp = driver.create_lammps(log="none")
try:
    lmp.file("in.fix")
except Exception as exc:
    print(f"rank {MPI.COMM_WORLD.Get_rank()} stopped: {exc}", flush=True)
'''


@pytest.mark.mpi
def test_fix_shim(model_file, data_file, tmp_path):
    """fix ltau C++ side: every N, per-atom array, scalar/vector, soft halt, error on all ranks."""
    (tmp_path / "in.fix").write_text(HEADER.format(data=data_file) + textwrap.dedent(f"""\
        pair_style ltau
        pair_coeff * * {model_file} Si C
        fix u all ltau est.npz every 5 dump out.xyz 1.0 halt 1e9 error continue
        compute c all reduce max f_u[1]
        velocity all create 300 1 loop geom
        fix md all nve
        thermo_style custom step c_c f_u f_u[1] f_u[2] f_u[3]
        thermo 5
        dump d all custom 10 d.* id f_u[1]
        run 40
        print "AFTER_RUN1 $(step)"
        run 30
        """))
    (tmp_path / "fix.py").write_text(FIX_STANDIN)
    res = mpirun([sys.executable, "fix.py"], tmp_path, timeout=90)
    out = res.stdout
    assert "AFTER_RUN1 25" in out, out + res.stderr[-2000:]          # halt at 25 of 40
    assert "Fix ltau stand-in halt at step 25" in out                # error continue: run 2 goes on
    assert out.count("Fix ltau stand-in watching 216 atoms from step 0") == 1   # rank 0's init report
    assert "rank 0 stopped" in out and "rank 1 stopped" in out
    assert "estimator exploded at step 45" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split()[:1] == ["25"]]
    assert [float(v) for v in rows[0][1:]] == [216, 216, 25, 10, 216]
    d = _read_dump(tmp_path / "d.20")
    np.testing.assert_array_equal(d[:, 0], d[:, 1])
