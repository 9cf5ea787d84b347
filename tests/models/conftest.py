"""Fixtures of the model tests."""

import pytest

from ltau_lmp.data.generate import GenerateConfig, SetSpec, generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 training and 2 test frames of 64-atom SW silicon: {"train": path, "test": path}."""
    cfg = GenerateConfig(sets={
        "train": SetSpec(supercells=[2], temperatures=[600, 1200], strain=0.02, n_frames=8,
                         equil_steps=20, stride=10, seed=1),
        "test": SetSpec(supercells=[2], temperatures=[900], n_frames=2, equil_steps=20, stride=10, seed=2),
    })
    return generate(cfg, tmp_path_factory.mktemp("data"), show_progress=False)
