"""Shared set-up of the nequip tests (run in the nequip environment: `make test-nequip`).

(This folder is not called `nequip`: with tests/ on sys.path it would shadow the package.)

Tiny NequIP and Allegro models are trained here, once per session, by ``nequip-train`` itself
(helpers/nequip_runs.py: the example config examples/nequip_si/nequip_si.yaml, on
Stillinger-Weber silicon made on the spot). Nothing here imports nequip, so the main environment
collects these files and skips them.
"""

from __future__ import annotations

import pytest

from helpers.nequip_runs import nequip_train, si_frames


@pytest.fixture(scope="session")
def si_data(tmp_path_factory):
    from ase.io import write

    root = tmp_path_factory.mktemp("si_data")
    frames = si_frames(24, seed=0)
    write(root / "train.xyz", frames[:20])
    write(root / "val.xyz", frames[20:])
    return root


@pytest.fixture(scope="session")
def nequip_run(si_data, tmp_path_factory):
    return nequip_train(si_data, tmp_path_factory.mktemp("nequip") / "run")


@pytest.fixture(scope="session")
def allegro_run(si_data, tmp_path_factory):
    return nequip_train(si_data, tmp_path_factory.mktemp("allegro") / "run", "model=allegro")
