# ltau_lmp: the README's commands call these targets.
#   make demo   set up (once) and run the end-to-end silicon story (data -> train -> LAMMPS + fix ltau -> evaluate)
#   make test   set up (once) and run the whole test suite: test-main, then test-nequip
#   make test-main     the main suite (.venv: built-in model, MACE, LAMMPS, estimator)
#   make test-nequip   the NequIP/Allegro tests in their own environment (.venv-nequip)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

# nequip needs e3nn >= 0.6, mace-torch pins e3nn 0.4.4: NequIP/Allegro get a second environment
NEQUIP_VENV ?= .venv-nequip
NEQUIP_PY   := $(NEQUIP_VENV)/bin/python

.PHONY: setup setup-nequip nequip-install demo demo-learn demo-mace demo-nequip test test-main test-nequip test-slow bench clean

setup: $(VENV)/.installed

# The tested set-up: torch first and pinned (its CPU wheel, so that nothing pulls a CUDA build), then
# faiss-cpu pinned; pyproject.toml itself only asks for ranges (README "GPU" for the CUDA set-up).
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet faiss-cpu==1.15.1
	$(PY) -m pip install --quiet -e ".[cpu,test,mace,metatomic,dask]"
	touch $@

# The nequip environment gets ltau_lmp as a regular (non-editable) install built from a copy of
# the tree: an editable one would rebuild ltau_lmp/lammps/ltauplugin.so in place for this venv's
# Python, under the main environment's feet. `make test-nequip` and `demo-nequip` refresh it.
setup-nequip: $(NEQUIP_VENV)/.installed

$(NEQUIP_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(NEQUIP_VENV)
	$(NEQUIP_PY) -m pip install --quiet --upgrade pip
	$(NEQUIP_PY) -m pip install --quiet torch==2.13.0
	$(NEQUIP_PY) -m pip install --quiet faiss-cpu==1.15.1
	$(MAKE) --no-print-directory nequip-install EXTRAS="[cpu,test,nequip]" PIP_FLAGS=
	touch $@

# internal: (re)install the current tree into the nequip environment
nequip-install:
	rm -rf $(NEQUIP_VENV)/src && mkdir -p $(NEQUIP_VENV)/src
	cp -r pyproject.toml setup.py README.md ltau_lmp $(NEQUIP_VENV)/src/
	rm -f $(NEQUIP_VENV)/src/ltau_lmp/lammps/ltauplugin.so
	$(NEQUIP_PY) -m pip install --quiet $(PIP_FLAGS) "$(abspath $(NEQUIP_VENV))/src$(EXTRAS)"

demo: setup
	$(PY) examples/si/demo.py --out runs/demo

# the learning loop on silicon: cold-crystal data, protocols that leave it, labels from SW (ltau-lmp learn),
# then its evidence: fresh validation runs, the random baseline, warm vs scratch (doc/validation/learn.json)
demo-learn: setup
	$(PY) examples/si_learn/demo.py
	$(PY) examples/si_learn/validate.py

# the same story with a MACE model trained by MACE's own trainer (~15 min on 2 cores)
demo-mace: setup
	$(PY) examples/mace_si/demo.py --out runs/mace_demo

# a tiny NequIP trained by nequip-train with LTAU logging, then LAMMPS with fix ltau
demo-nequip: setup-nequip
	$(MAKE) --no-print-directory nequip-install PIP_FLAGS="--no-deps --force-reinstall"
	$(NEQUIP_PY) examples/nequip_si/demo.py --out runs/nequip_demo

test: test-main test-nequip

test-main: setup
	$(PY) -m pytest

# not `python -m pytest`: that would import ltau_lmp from the tree instead of the nequip venv's install
test-nequip: setup-nequip
	$(MAKE) --no-print-directory nequip-install PIP_FLAGS="--no-deps --force-reinstall"
	PATH="$(abspath $(NEQUIP_VENV))/bin:$$PATH" $(NEQUIP_VENV)/bin/pytest tests/nequip_env

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(PY) benchmarks/estimator.py
	$(PY) benchmarks/lammps_pair.py
	$(PY) benchmarks/lammps_fix.py
	$(PY) benchmarks/lammps_mace.py

clean:
	rm -rf build *.egg-info runs .pytest_cache $(NEQUIP_VENV)/src
