# ltau_lmp: the README's commands call these targets.
#   make demo   set up (once) and run the end-to-end silicon story (data -> train -> LAMMPS + fix ltau -> evaluate)
#   make test   set up (once) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo demo-mace test test-slow bench clean

setup: $(VENV)/.installed

# The tested set-up: torch first and pinned (its CPU wheel, so that nothing pulls a CUDA build), then
# faiss-cpu pinned; pyproject.toml itself only asks for ranges (README "GPU" for the CUDA set-up).
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet faiss-cpu==1.15.1
	$(PY) -m pip install --quiet -e ".[cpu,test,mace]"
	touch $@

demo: setup
	$(PY) examples/si/demo.py --out runs/demo

# the same story with a MACE model trained by MACE's own trainer (~15 min on 2 cores)
demo-mace: setup
	$(PY) examples/mace_si/demo.py --out runs/mace_demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(PY) benchmarks/estimator.py
	$(PY) benchmarks/lammps_pair.py
	$(PY) benchmarks/lammps_fix.py
	$(PY) benchmarks/lammps_mace.py

clean:
	rm -rf build *.egg-info runs .pytest_cache
