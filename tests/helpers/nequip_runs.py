"""Tiny NequIP and Allegro runs of ``nequip-train`` (the nequip environment's fixtures in
tests/nequip_env/conftest.py, and tests that train once more) on Stillinger-Weber silicon made on
the spot, with the example config examples/nequip_si/nequip_si.yaml. Nothing here imports nequip."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers.paths import ROOT

CONFIG_DIR = ROOT / "examples" / "nequip_si"


def si_frames(n: int, seed: int, repeat=(1, 1, 1)):
    """Rattled, strained diamond Si cells labelled by Stillinger-Weber (LAMMPS), as ``ase.Atoms``."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    from ltau_lmp.data.reference import reference_calculation

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Si", "diamond", a=5.43 * rng.uniform(0.98, 1.02), cubic=True).repeat(repeat)
        atoms.positions += rng.normal(0.0, 0.05 + 0.1 * rng.random(), atoms.positions.shape)
        frames.append(atoms)
    for atoms, (energy, forces, stress) in zip(frames, reference_calculation(frames)):
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    return frames


def nequip_train(si_data: Path, out: Path, *overrides: str) -> Path:
    """``nequip-train`` with the example config, 3 epochs; returns its output folder."""
    cmd = [str(Path(sys.executable).parent / "nequip-train"), "-cp", str(CONFIG_DIR), "-cn", "nequip_si",
           f"train_file={si_data / 'train.xyz'}", f"val_file={si_data / 'val.xyz'}", "epochs=3",
           "skip_epochs=0", f"hydra.run.dir={out}", *overrides]
    res = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def validation_metrics(out: Path) -> list[dict]:
    """The per-epoch validation rows of the run's CSV log."""
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k.startswith("val") and v} for row in csv.DictReader(f)
                if any(k.startswith("val") and v for k, v in row.items())]
