"""ltau-lmp diagnose: scores from known synthetic error trajectories (the reference definition of
the fraction above a tolerance), hard structures, weights, the train-validation gap, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from ltau_lmp.cli import main
from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator import ErrorLog
from ltau_lmp.evaluation.diagnose import atom_scores, diagnose, structure_weights

EPOCHS, SIZES = 12, [4, 3, 5]


def trajectories(seed=0):
    """(epochs, atoms) errors: log-normal around per-atom scales; structure 1 stays at 0.5-0.9 eV/A."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    scale = np.exp(rng.normal(np.log(0.05), 0.8, n))
    errors = scale * np.exp(rng.normal(0, 0.4, (EPOCHS, n)))
    errors[:, 4:7] = rng.uniform(0.5, 0.9, (EPOCHS, 3))
    return errors


def make_run(root, errors, validation=None):
    log = ErrorLog.log_spaced(errors.shape[1], nbins=100)
    for epoch_errors in errors:
        log.update(np.arange(errors.shape[1]), epoch_errors)
        log.end_epoch()
    root.mkdir()
    log.save(root / "error_log.npz")
    frames = []
    for k, size in enumerate(SIZES):
        atoms = Atoms("Si" * size, positions=np.random.default_rng(k).uniform(0, 5, (size, 3)), cell=[6, 6, 6], pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.full((size, 3), 0.5))
        frames.append(atoms)
    write(root / "train_set.xyz", frames)
    if validation is not None:
        val = ErrorLog.log_spaced(validation.shape[1], nbins=100)
        for epoch_errors in validation:
            val.update(np.arange(validation.shape[1]), epoch_errors)
            val.end_epoch()
        val.save(root / "validation_error_log.npz")
        write(root / "reference_set.xyz", frames[:1])
    return log


def test_fraction_above_is_the_reference_definition(tmp_path):
    errors = trajectories()
    log = make_run(tmp_path / "run", errors)
    tol = log.bin_edges[60]                                            # a bin edge: exact
    scores = atom_scores(log, tol)
    np.testing.assert_allclose(scores.fraction_above, 1 - np.mean(errors < tol, axis=0))   # LTAU-FF's definition
    np.testing.assert_allclose(scores.fraction_above, np.mean(errors >= tol, axis=0))
    assert scores.tolerance[0] == tol
    np.testing.assert_allclose(scores.mean, errors.mean(axis=0), rtol=0.05)   # bin centres: within half a bin
    assert np.all(scores.epochs == EPOCHS)
    relative = atom_scores(log, np.full(log.n_samples, log.bin_edges[40]))
    np.testing.assert_allclose(relative.fraction_above, np.mean(errors >= log.bin_edges[40], axis=0))
    with pytest.raises(ConfigError, match="positive"):
        atom_scores(log, 0.0)


def test_persistently_hard_structure_listed_and_up_weighted(tmp_path):
    errors = trajectories()
    make_run(tmp_path / "run", errors)
    report = diagnose(tmp_path / "run", tolerance=0.3, weights_out=tmp_path / "weighted.xyz")
    hard = report["hard_structures"]
    assert [h["structure"] for h in hard] == [1] and hard[0]["persistent_atoms"] == 3
    assert hard[0]["file"].endswith("train_set.xyz") and hard[0]["index"] == 1
    weights = report["structure_weights"]
    assert weights.mean() == pytest.approx(1.0) and weights[1] == weights.max()
    assert weights.max() / weights.min() <= 3.0 + 1e-12
    back = read(tmp_path / "weighted.xyz", index=":")
    np.testing.assert_allclose([a.info["config_weight"] for a in back], weights)
    np.testing.assert_allclose(back[0].get_forces(), 0.5)   # the labels travel with the weights
    relative = diagnose(tmp_path / "run", tolerance=None, relative=0.5)   # 0.5 x |F_ref| = 0.43 eV/A
    assert [h["structure"] for h in relative["hard_structures"]] == [1]


def test_weights_rule():
    np.testing.assert_allclose(structure_weights(np.zeros(4)), 1.0)    # nothing hard: unchanged
    w = structure_weights(np.array([0.0, 1.0]), max_ratio=5.0)
    assert w[1] / w[0] == pytest.approx(5.0) and w.mean() == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        structure_weights(np.array([1.5]))


def test_cli_gap_and_files(tmp_path, capsys):
    errors = trajectories()
    validation = np.linspace(0.3, 0.1, EPOCHS)[:, None] * np.ones((EPOCHS, 4))
    make_run(tmp_path / "run", errors, validation)
    assert main(["diagnose", str(tmp_path / "run"), "--tol", "0.3", "--weights"]) == 0
    out = tmp_path / "run-diagnose"
    text = capsys.readouterr().out
    assert "1 structure(s) hold persistently hard atoms" in text and "validation: 4 atoms" in text
    report = json.loads((out / "diagnose.json").read_text())
    np.testing.assert_allclose(report["gap"]["train_rms"], np.sqrt(np.mean(errors ** 2, axis=1)))
    np.testing.assert_allclose(report["gap"]["validation_rms"], validation[:, 0])
    np.testing.assert_allclose(report["gap"]["gap_rms"], validation[:, 0] - np.sqrt(np.mean(errors ** 2, axis=1)))
    for name in ("atoms.csv", "structures.csv", "cartography.png", "gap.png", "train_set_weighted.xyz"):
        assert (out / name).stat().st_size > 0
    assert len((out / "atoms.csv").read_text().splitlines()) == sum(SIZES) + 1
    assert main(["diagnose", str(tmp_path / "run")]) != 0      # an earlier output is not replaced silently
    assert "ltau-lmp diagnose" in capsys.readouterr().err
