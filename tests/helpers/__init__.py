"""Code shared by the test layers (tests/unit, tests/models, tests/lammps, tests/nequip_env).

Importable as ``helpers`` because pyproject.toml's ``[tool.pytest.ini_options] pythonpath``
puts tests/ on the path, for the main and the nequip environment alike; tests/conftest.py has
pytest rewrite the asserts in here as it does in the test files. Modules that need an optional
model family import it at the top (mace_models: mace-torch; nequip_models: nequip, allegro):
import them only after ``pytest.importorskip``.
"""
