"""ltau-lmp diagnose on a real built-in training run: the structures come from the training file
and the split in the estimator's provenance, the validation log gives the gap, and the weighted
file retrains on the same split."""

import json

import numpy as np
from ase.io import read
from helpers.training import small_config

from ltau_lmp.cli import main
from ltau_lmp.training.trainer import train


def test_diagnose_a_built_in_run_and_retrain_on_its_weights(data, tmp_path, capsys):
    run = train(small_config(data, tmp_path / "run", epochs=4), show_progress=False)
    assert main(["diagnose", str(tmp_path / "run"), "--tol", "0.02", "--weights"]) == 0
    out = tmp_path / "run-diagnose"
    report = json.loads((out / "diagnose.json").read_text())
    train_idx = run.summary["train_structures"]
    rows = (out / "structures.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[2]) for r in rows] == train_idx                  # index in the training file
    assert all(r.split(",")[1] == str(data["train"]) for r in rows)
    assert len(report["gap"]["epoch"]) == 4 and all(v is not None for v in report["gap"]["validation_rms"])
    weighted = read(out / "train_set_weighted.xyz", index=":")
    assert len(weighted) == len(read(data["train"], index=":"))                # the whole file
    weights = np.array([a.info["config_weight"] for a in weighted])
    val_idx = run.summary["val_structures"]
    np.testing.assert_allclose(weights[val_idx], 1.0)
    assert abs(np.mean(weights[train_idx]) - 1) < 1e-12
    retrained = train(small_config({"train": out / "train_set_weighted.xyz"}, tmp_path / "again", epochs=1),
                      show_progress=False)
    assert retrained.summary["train_structures"] == train_idx                # same seed, same split
    assert retrained.summary["config_weights"]["n_structures"] == len(train_idx)  # read for the training structures
