"""`ltau-lmp build-estimator / predict / info`: end to end, and one-line errors for bad input."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from ltau_lmp.cli import main
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.model import LocalForceField, save_model


@pytest.fixture()
def inputs(tmp_path, error_log_and_descriptors):
    log_path, desc, rng = error_log_and_descriptors(epochs=4)
    np.save(tmp_path / "query.npy", desc[:25] + 0.05)
    np.save(tmp_path / "held_out.npy", rng.normal(size=(200, 8)).astype(np.float32))
    return tmp_path, log_path


def test_build_predict_info(inputs, capsys):
    tmp, log_path = inputs
    model = LocalForceField(["Si"], hidden=[8], latent_dim=8, seed=0)
    save_model(model, tmp / "model.pt")
    assert main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"),
                 "-o", str(tmp / "est"), "--index", "hnsw", "-k", "7", "--ef-search", "32",
                 "--model", str(tmp / "model.pt"), "--reference-descriptors", str(tmp / "held_out.npy"),
                 "--false-alarm-rate", "0.01"]) == 0
    printed = capsys.readouterr().out
    est = LTAUEstimator.load(tmp / "est")
    assert (est.k, est.index.kind, est.index.options["ef_search"]) == (7, "hnsw", 32)
    thresholds = est.alarm_thresholds
    assert thresholds["n_reference"] == 200 and thresholds["false_alarm_rate"] == 0.01
    assert f"expected > {thresholds['expected']:.4g} eV/Angstrom, ood <= 0.01" in printed
    assert est.metadata["reference_descriptors"] == str(tmp / "held_out.npy")
    assert est.metadata["model_hash"] == model.model_hash and est.metadata["model_card"] == model.card.to_dict()

    assert main(["predict", str(tmp / "est"), "--descriptors", str(tmp / "query.npy"),
                 "-o", str(tmp / "out.npz"), "--ci", "0.1", "0.9", "--tol", "0.05"]) == 0
    out = np.load(tmp / "out.npz")
    res = est.query(np.load(tmp / "query.npy"))
    np.testing.assert_allclose(out["expected"], res.expected)
    np.testing.assert_allclose(out["ci_high"], res.interval(0.1, 0.9)[:, 1])
    np.testing.assert_allclose(out["prob_below_tol"], res.prob_below(0.05))
    np.testing.assert_array_equal(out["ood"], res.ood)

    assert main(["predict", str(tmp / "est"), "--descriptors", str(tmp / "query.npy"), "-o", str(tmp / "o.csv")]) == 0
    with open(tmp / "o.csv") as fh:
        rows = [r for r in csv.reader(fh) if not r[0].startswith("#")]
    assert len(rows) == 25 and len(rows[0]) == 6
    np.testing.assert_allclose([float(r[5]) for r in rows], res.ood, rtol=1e-5)
    assert main(["predict", str(tmp / "est"), "--descriptors", str(tmp / "query.npy"), "-o", str(tmp / "k.npz"),
                 "-k", "3"]) == 0
    assert "ood" not in np.load(tmp / "k.npz") and "no ood column" in capsys.readouterr().out

    assert main(["info", str(tmp / "est")]) == 0
    out = capsys.readouterr().out
    text = out[out.rindex("}") + 1:]          # the JSON summary, then the thresholds in words
    info = json.loads(out[:out.rindex("}") + 1])
    assert "false-alarm rate of 0.01 per evaluation, from 200 held-out atoms" in text
    assert "1,000 watched atoms" in text and "1,000,000 watched atoms" in text
    assert info["n_entries"] == 300 and info["dim"] == 8
    assert info["n_reference"] == 200 and info["alarm_thresholds"] == thresholds
    assert info["model_card"] == model.card.to_dict() and "model_card" not in info["metadata"]
    assert main(["info", str(log_path)]) == 0
    assert json.loads(capsys.readouterr().out)["errors_counted"] == 1200
    assert main(["info", str(tmp / "model.pt")]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "model", "file": "an ltau_lmp built-in model",
                                                   **model.card.to_dict()}


def test_bad_files_give_one_line_errors(inputs, capsys):
    tmp, log_path = inputs
    (tmp / "junk.npz").write_bytes(b"not a zip file")
    assert main(["build-estimator", "--error-log", str(tmp / "junk.npz"), "--descriptors",
                 str(tmp / "train.npy"), "-o", str(tmp / "est"), "--unchecked-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.npz: unreadable error-log file" in err

    np.save(tmp / "short.npy", np.zeros((10, 8), np.float32))
    assert main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "short.npy"),
                 "-o", str(tmp / "est"), "--unchecked-model"]) == 2
    assert "10 descriptors but 300 error distributions" in capsys.readouterr().err

    assert main(["predict", str(tmp / "missing"), "--descriptors", str(tmp / "query.npy"), "-o", str(tmp / "x.npz")]) == 2
    assert "estimator directory not found" in capsys.readouterr().err

    main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"), "-o", str(tmp / "e"),
          "--unchecked-model"])
    np.save(tmp / "wrongdim.npy", np.zeros((3, 5), np.float32))
    assert main(["predict", str(tmp / "e"), "--descriptors", str(tmp / "wrongdim.npy"), "-o", str(tmp / "x.npz")]) == 2
    assert "descriptors must have shape (n, 8), got (3, 5)" in capsys.readouterr().err
    assert main(["predict", str(tmp / "e"), "--descriptors", str(tmp / "query.npy"), "-o", str(tmp / "x.txt")]) == 2
    assert "must end in .npz or .csv" in capsys.readouterr().err
    assert main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"),
                 "-o", str(tmp / "e2"), "--reference-descriptors", str(tmp / "wrongdim.npy"), "--unchecked-model"]) == 2
    assert "reference descriptors: descriptors must have shape (n, 8), got (3, 5)" in capsys.readouterr().err
    assert main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"),
                 "-o", str(tmp / "e2"), "--reference-descriptors", str(tmp / "held_out.npy"),
                 "--false-alarm-rate", "0", "--unchecked-model"]) == 2
    assert "false_alarm_rate must lie strictly between 0 and 1, got 0.0" in capsys.readouterr().err

    save_model(LocalForceField(["Si"], hidden=[8], latent_dim=5, seed=0), tmp / "model5.pt")
    assert main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"),
                 "-o", str(tmp / "e5"), "--model", str(tmp / "model5.pt")]) == 2
    assert "8-dimensional but the model card says latent_dim 5" in capsys.readouterr().err
    assert main(["info", str(tmp / "nothing")]) == 2
    assert "nothing: no such file or directory" in capsys.readouterr().err
    assert main(["info", str(tmp / "train.npy")]) == 2
    assert "train.npy: not a torch model file" in capsys.readouterr().err
    assert main(["info", str(tmp / "model5.pt"), "--family", "schnet"]) == 2
    assert "unknown model family 'schnet'" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "ltau_lmp.cli", "--help"], capture_output=True, text=True, check=True)
    assert "build-estimator" in out.stdout and "predict" in out.stdout


def test_build_defaults_come_from_the_index_module(inputs, capsys):
    """Choices and defaults of the CLI are those declared in estimator/index.py, not copies."""
    from ltau_lmp.estimator.index import KIND_CHOICES, OPTION_DEFAULTS

    tmp, log_path = inputs
    with pytest.raises(SystemExit):
        main(["build-estimator", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(KIND_CHOICES) + "}" in help_text
    assert f"HNSW search effort (default {OPTION_DEFAULTS['hnsw']['ef_search']})" in help_text
    assert main(["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"),
                 "-o", str(tmp / "est"), "--index", "hnsw", "--unchecked-model"]) == 0
    assert LTAUEstimator.load(tmp / "est").index.options == OPTION_DEFAULTS["hnsw"]
    assert "no ood score and no recommended alarm thresholds (give --reference-descriptors)" in capsys.readouterr().out


def test_train_set_gives_the_structures_auto_holds_out(inputs, capsys, monkeypatch):
    """--train-set: whole training structures held out to tune the index (no --reference-descriptors);
    a set whose atoms do not match the descriptors' rows is refused, naming both counts."""
    from ase import Atoms
    from ase.io import write

    from ltau_lmp.estimator import index_tuning

    monkeypatch.setattr(index_tuning, "SMALL_LIMIT", 100)
    monkeypatch.setattr(index_tuning, "MIN_TUNING_QUERIES", 20)
    tmp, log_path = inputs
    frames = [Atoms("Si30", positions=np.zeros((30, 3))) for _ in range(10)]
    write(tmp / "train_set.xyz", frames)
    common = ["build-estimator", "--error-log", str(log_path), "--descriptors", str(tmp / "train.npy"),
              "--unchecked-model"]
    assert main([*common, "-o", str(tmp / "est"), "--train-set", str(tmp / "train_set.xyz")]) == 0
    est = LTAUEstimator.load(tmp / "est")
    assert est.index.options["recall_queries"] == "held-out structures"
    assert "held-out training structure" in capsys.readouterr().out
    write(tmp / "short.xyz", frames[:9])
    assert main([*common, "-o", str(tmp / "est2"), "--train-set", str(tmp / "short.xyz")]) == 2
    assert "holds 270 atoms in 9 structures but the descriptors have 300 rows" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp / "est3")]) == 2
    assert "--train-set" in capsys.readouterr().err
