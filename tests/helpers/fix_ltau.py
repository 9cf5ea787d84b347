"""fix ltau inside LAMMPS, shared by tests/lammps/fix: the input script, the readers of what the fix
writes, and the ways the tests run LAMMPS (in this process on one rank, or under mpirun).

A small random model and an estimator built from its own latent features of rattled Si cells
(training errors that differ between atoms) stand in for a trained one (tests/lammps/fix/conftest.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk

from helpers.mpi_run import mpirun

from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.estimator import LTAUEstimator

EVERY, STEPS = 5, 60


# 64 rattled Si atoms at 1500 K under the random model: the uncertainty drifts upwards.
# displace_atoms random and velocity create (loop all) do not depend on the number of ranks.
BASE = """\
units           metal
atom_style      atomic
boundary        p p p
lattice         diamond 5.431
region          box block 0 2 0 2 0 2
create_box      1 box
create_atoms    1 box
mass            1 28.0855
displace_atoms  all random 0.05 0.05 0.05 1234
pair_style      ltau
pair_coeff      * * {model} Si
velocity        all create 1500 4928459 mom yes rot yes dist gaussian
timestep        0.001
fix             md all nve
"""


REF_SCRIPT = BASE + """\
fix             u all ltau {est} every {every} metric distance log {dir}/ref.log
dump            d all custom {every} {dir}/ref.* id f_u[1] f_u[2] f_u[3] f_u[4]
dump_modify     d format float %.17g
run             {steps}
"""


# --------------------------------------------------------------------------------------------
# reading what the fix writes
# --------------------------------------------------------------------------------------------

def rattled_latents(model, n_cells: int, seed: int) -> np.ndarray:
    """The model's float32 latents of ``n_cells`` 64-atom diamond Si cells rattled by 0.05 A."""
    calc = LTAUCalculator(model)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_cells):
        atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = calc
        atoms.get_potential_energy()
        out.append(np.array(calc.results["latent"], dtype=np.float32))
    return np.concatenate(out)


def read_log(path: Path) -> np.ndarray:
    """The rows of a fix ltau log, after checking its header (the fix, then the column names)."""
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("# fix ltau "), lines[0]
    assert "# step worst mean quantile n_over_dump n_over_halt max_distance worst_tag" in lines
    rows = [line for line in lines if not line.startswith("#")]
    return np.array([[float(v) for v in line.split()] for line in rows]).reshape(-1, 8)


def read_custom(path: Path) -> tuple[int, np.ndarray]:
    """(timestep, rows sorted by id) of one `dump custom` snapshot."""
    lines = Path(path).read_text().splitlines()
    step = int(lines[lines.index("ITEM: TIMESTEP") + 1])
    start = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    rows = np.loadtxt(lines[start:], ndmin=2)
    return step, rows[np.argsort(rows[:, 0])]


def custom_dumps(directory: Path, prefix: str) -> dict[int, np.ndarray]:
    return dict(read_custom(p) for p in directory.glob(prefix + ".*") if p.suffix[1:].isdigit())


# --------------------------------------------------------------------------------------------
# running LAMMPS: under mpirun, or on one rank in this process
# --------------------------------------------------------------------------------------------

def run_script(tmp_path: Path, script: str, launcher: str = "ltau-lmp", np_: int = 2,
                timeout: float = 90) -> subprocess.CompletedProcess:
    (tmp_path / "in.test").write_text(script)
    args = ["ltau-lmp", "run", "in.test", "-log", "none"] if launcher == "ltau-lmp" else \
        ["lmp", "-in", "in.test", "-log", "none"]
    return mpirun(args, tmp_path, np_, timeout)


def final_state(lmp) -> dict:
    """Positions, per-atom fix values and box of a 1-rank instance, sorted by atom ID."""
    from lammps import LMP_STYLE_ATOM, LMP_TYPE_ARRAY

    n = lmp.extract_global("nlocal")
    tags = lmp.numpy.extract_atom("id")[:n]
    order = np.argsort(tags)
    boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
    cell = np.array([[boxhi[0] - boxlo[0], 0, 0], [xy, boxhi[1] - boxlo[1], 0], [xz, yz, boxhi[2] - boxlo[2]]])
    state = {"step": lmp.extract_global("ntimestep"), "x": lmp.numpy.extract_atom("x")[:n][order] - boxlo,
             "cell": cell}
    if lmp.has_id("fix", "u"):
        state["peratom"] = lmp.numpy.extract_fix("u", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:n][order].copy()
    return state


def assert_values_describe(files, state) -> None:
    """fix ltau's per-atom values are those of the current configuration (a fresh query)."""
    atoms = Atoms("Si" * len(state["x"]), positions=state["x"], cell=state["cell"], pbc=True)
    atoms.calc = LTAUCalculator(files["model"])
    atoms.get_potential_energy()
    res = LTAUEstimator.load(files["est"]).query(atoms.calc.results["latent"])
    want = np.column_stack([res.expected, res.interval(0.05, 0.95), res.distance])
    np.testing.assert_allclose(state["peratom"], want, rtol=1e-5, atol=1e-7)


def in_process(script: str, log: Path | None = None) -> tuple[dict, str]:
    """Run ``script`` on one rank here; returns the final state and the error text ('' if none)."""
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log=str(log) if log else "none", screen=False)
    try:
        try:
            lmp.commands_string(script)
            error = ""
        except Exception as exc:
            error = " ".join(str(exc).split())
        return final_state(lmp), error
    finally:
        lmp.close()


# --------------------------------------------------------------------------------------------
# halt ... over N: when the condition has held k of the last n times
# --------------------------------------------------------------------------------------------

def first_run_of(flags: list[bool], steps: list[int], k: int, n: int | None = None) -> int | None:
    """Step where the flag has been set in k of the last n evaluations (n = k: k in a row)."""
    recent: list[bool] = []
    for flag, step in zip(flags, steps):
        recent = (recent + [flag])[-(n or k):]
        if sum(recent) >= k:
            return step
    return None
