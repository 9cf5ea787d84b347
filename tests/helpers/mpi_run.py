"""Running LAMMPS scripts under ``mpirun`` from the tests, with a timeout so a hang fails the test.

Shared by tests/lammps and tests/nequip_env.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}

PER_RANK = r"""
import sys
from mpi4py import MPI
from ltau_lmp.lammps import driver

rank = MPI.COMM_WORLD.Get_rank()
with open(f"results.{rank}", "w") as out:   # one file per rank: mpirun may interleave stdout lines
    for path in sys.argv[1:]:
        lmp = driver.create_lammps(log="none", screen=False)
        try:
            lmp.file(path)
            out.write(f"{path} OK\n")
        except Exception as exc:
            out.write(f"{path} ERROR " + " ".join(str(exc).split()) + "\n")
        out.flush()
        lmp.close()
"""


def mpirun(args, cwd: Path, np_: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "mpirun"), "-np", str(np_), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def per_rank(tmp_path: Path, scripts: dict[str, str], timeout: float = 120) -> dict[str, list[str]]:
    """Run each script on 2 ranks in one mpirun; returns {name: [rank 0 result, rank 1 result]},
    a result being "OK" or "ERROR <message>"."""
    for name, script in scripts.items():
        (tmp_path / name).write_text(script)
    (tmp_path / "per_rank.py").write_text(PER_RANK)
    res = mpirun([sys.executable, "per_rank.py", *scripts], tmp_path, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out: dict[str, list[str]] = {name: ["", ""] for name in scripts}
    for rank in (0, 1):
        for line in (tmp_path / f"results.{rank}").read_text().splitlines():
            name, rest = line.split(" ", 1)
            out[name][rank] = rest
    return out


def read_dump_rows(path: Path) -> np.ndarray:
    """The atom rows of a one-snapshot `dump custom` file, sorted by its first column (the ID)."""
    lines = Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    rows = np.loadtxt(lines[start:], ndmin=2)
    return rows[np.argsort(rows[:, 0])]


def one_and_two_ranks(tmp_path: Path, script: str, dump: str, timeout: float = 120) -> dict:
    """Run ``script`` with `ltau-lmp run` on 1 and on 2 ranks; {nprocs: (rows of ``dump``, log text)}."""
    runs = {}
    for nprocs in (1, 2):
        cwd = tmp_path / f"np{nprocs}"
        cwd.mkdir()
        (cwd / "in.md").write_text(script)
        res = mpirun(["ltau-lmp", "run", "in.md", "-log", "log.lammps"], cwd, nprocs, timeout=timeout)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        runs[nprocs] = (read_dump_rows(cwd / dump), (cwd / "log.lammps").read_text())
    return runs
