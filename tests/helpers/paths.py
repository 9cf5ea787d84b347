"""Folders of the repository, for tests that read its files (pyproject.toml, examples, inputs, data)."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
DATA = TESTS / "data"                   # stored descriptors (tests/data/README.md)
INPUTS = ROOT / "lammps_inputs"         # the shipped LAMMPS input scripts
