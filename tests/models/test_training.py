"""Trainer: per-atom error logging with stable ids, loss goes down, outputs, config errors."""

import json

import numpy as np
import pytest

from ltau_lmp.cli import main
from ltau_lmp.data.datasets import AtomsDataset, read_frames
from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator import ErrorLog, LTAUEstimator
from ltau_lmp.training.config import config_from_dict, load_train_config
from ltau_lmp.pipeline import ErrorLogger
from ltau_lmp.training.trainer import train
from helpers.training import SMALL_MODEL, small_config

def test_error_log_gets_every_training_atom_once_per_epoch(data, tmp_path, monkeypatch):
    seen = []
    original = ErrorLog.update

    def spy(self, ids, errors):
        if self.n_samples == 6 * 64:  # the training log (the validation log has its own atoms)
            seen[-1].append((np.array(ids), np.array(errors)))
        original(self, ids, errors)

    original_end = ErrorLog.end_epoch

    def end(self):
        original_end(self)
        if self.n_samples == 6 * 64:
            seen.append([])

    seen.append([])
    monkeypatch.setattr(ErrorLog, "update", spy)
    monkeypatch.setattr(ErrorLog, "end_epoch", end)
    result = train(small_config(data, tmp_path, epochs=3), show_progress=False)
    epochs = [e for e in seen if e]
    n = result.summary["n_train_atoms"]
    assert n == 6 * 64 and len(epochs) == 3
    orders = []
    for batches in epochs:
        ids = np.concatenate([b[0] for b in batches])
        errors = np.concatenate([b[1] for b in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # a permutation of range(n)
        assert np.all(errors >= 0) and np.all(np.isfinite(errors))
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])  # batches were shuffled
    assert result.error_log.n_counted == 3 * n
    assert np.all(result.error_log.totals() == 3)


def test_logged_errors_match_the_atoms(data, tmp_path):
    """The error logged for id i is the force error of that very atom (first epoch, no update yet)."""
    import torch

    from ltau_lmp.data.datasets import AtomsDataset, read_frames
    from ltau_lmp.model import evaluate
    from ltau_lmp.training.trainer import build_model, initialize_model, train_epoch

    cfg = small_config(data, tmp_path, batch_size=2, lr=1e-12)
    frames = read_frames(data["train"])
    model = build_model(cfg, frames)
    ds = AtomsDataset(frames, model.species, model.cutoff)
    initialize_model(model, ds)
    captured = {}

    class Recorder:
        def update(self, ids, errors):
            captured.update(zip(ids.tolist(), errors.tolist()))

    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), ds, np.random.default_rng(0).permutation(len(ds)),
                cfg, ErrorLogger(Recorder()))
    b = ds.batch([5])
    out = evaluate(model, b.positions, b.species, b.centers, b.neighbors, b.shifts, b.n_local)
    expected = torch.linalg.vector_norm(out.forces - b.forces, dim=1).numpy()
    np.testing.assert_allclose([captured[i] for i in b.atom_ids], expected, rtol=1e-10)


def test_training_lowers_loss_and_writes_outputs(data, tmp_path):
    result = train(small_config(data, tmp_path, epochs=6, error_log={"skip_epochs": 2}), show_progress=False)
    losses = [row["train_loss"] for row in result.metrics]
    assert losses[-1] < 0.5 * losses[0]
    for name in ("model.pt", "error_log.npz", "descriptors.npy", "metrics.csv", "summary.json", "estimator"):
        assert (tmp_path / name).exists(), name
    assert len((tmp_path / "metrics.csv").read_text().strip().splitlines()) == 1 + 6
    log = ErrorLog.load(tmp_path / "error_log.npz")
    assert np.all(log.totals() == 4)  # 6 epochs, first 2 skipped
    est = LTAUEstimator.load(tmp_path / "estimator")
    from ltau_lmp.model import load_model

    model = load_model(tmp_path / "model.pt")
    assert est.metadata["model_hash"] == model.model_hash
    assert est.n_entries == log.n_samples and est.dim == SMALL_MODEL["latent_dim"]
    descriptors = np.load(tmp_path / "descriptors.npy")
    res = est.query(descriptors[:5])
    assert np.all(res.expected > 0) and np.all(np.isfinite(res.distance))
    assert set(result.summary["test"]) == {"test"}
    assert result.summary["test"]["test"]["force_rmse"] > 0


def test_validation_atoms_calibrate_the_ood_score(data, tmp_path, capsys):
    """The held-out validation atoms, under the final model, are the estimator's reference set."""
    from ltau_lmp.model import load_model
    from ltau_lmp.prediction import predict_frames

    result = train(small_config(data, tmp_path, epochs=2, estimator={"false_alarm_rate": 0.05}),
                   show_progress=False)
    val_idx = result.summary["val_structures"]
    model = load_model(tmp_path / "model.pt")
    frames = read_frames(data["train"])
    val_set = AtomsDataset([frames[i] for i in val_idx], model.species, model.cutoff, model.dtype)
    reference = np.load(tmp_path / "reference_descriptors.npy")
    np.testing.assert_array_equal(reference, predict_frames(model, val_set.frames, forces=False, batch_size=3).latent)
    est = LTAUEstimator.load(tmp_path / "estimator")
    np.testing.assert_array_equal(est.reference_distances, np.sort(est.query(reference).distance))
    thresholds = est.alarm_thresholds
    assert thresholds == result.summary["alarm_thresholds"]
    assert thresholds["n_reference"] == val_set.total_atoms and thresholds["false_alarm_rate"] == 0.05
    assert est.metadata["reference_structures"] == val_idx

    config = {"out_dir": str(tmp_path / "noval"), "epochs": 2, "model": SMALL_MODEL,
              "data": {"train": str(data["train"]), "val_fraction": 0.0}}
    (tmp_path / "noval.yaml").write_text(json.dumps({"train": config}))  # JSON is YAML
    capsys.readouterr()
    assert main(["train", str(tmp_path / "noval.yaml"), "--no-progress"]) == 0
    assert "no ood score and no recommended alarm thresholds (set train.data.val_fraction > 0)" in capsys.readouterr().out
    assert LTAUEstimator.load(tmp_path / "noval" / "estimator").alarm_thresholds is None
    assert not (tmp_path / "noval" / "reference_descriptors.npy").exists()


def test_train_is_reproducible(data, tmp_path):
    a = train(small_config(data, tmp_path / "a", epochs=2), show_progress=False)
    b = train(small_config(data, tmp_path / "b", epochs=2), show_progress=False)
    assert a.model.model_hash == b.model.model_hash
    np.testing.assert_array_equal(a.error_log.counts, b.error_log.counts)


def test_config_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['learning_rate'\]"):
        config_from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="schedule"):
        config_from_dict({"schedule": "step"})
    with pytest.raises(ConfigError, match="skip_epochs"):
        config_from_dict({"epochs": 3, "error_log": {"skip_epochs": 3}})
    with pytest.raises(ConfigError, match=r"train.model: unknown option"):
        config_from_dict({"model": {"width": 3}})
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict({"epochs": 2.5})
    with pytest.raises(ConfigError, match=r"train.estimator.index: 'kdtree' is not one of \['auto', 'flat'"):
        config_from_dict({"estimator": {"index": "kdtree"}})
    with pytest.raises(ConfigError, match=r"train.estimator.false_alarm_rate must lie strictly between 0 and 1"):
        config_from_dict({"estimator": {"false_alarm_rate": 0.0}})
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n  optimizer: sgd\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_train_config(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltau-lmp train: error:") and "optimizer" in err and len(err.splitlines()) == 1


def test_warm_start_continues_from_a_model(data, tmp_path):
    """init_model: training starts from that model's weights (a zero learning rate keeps them, so
    the result is the same model), and a model without the data's species is refused."""
    first = train(small_config(data, tmp_path / "first", epochs=2), show_progress=False)
    again = train(small_config(data, tmp_path / "again", epochs=1, lr=1e-30, min_lr=0.0,
                               init_model=str(tmp_path / "first" / "model.pt")), show_progress=False)
    assert again.model.model_hash == first.model.model_hash
    fresh = train(small_config(data, tmp_path / "fresh", epochs=1, lr=1e-30, min_lr=0.0), show_progress=False)
    assert fresh.model.model_hash != first.model.model_hash
    with pytest.raises(ConfigError, match="init_model"):
        train(small_config(data, tmp_path / "bad", epochs=1, init_model=str(data["train"])), show_progress=False)


def test_explicit_validation_file(data, tmp_path):
    """data.val: its structures validate and calibrate, every structure of data.train trains."""
    result = train(small_config(data, tmp_path / "run", epochs=2, data={"val": str(data["test"])}), show_progress=False)
    assert result.summary["n_val_structures"] == 2 and result.summary["train_structures"] == list(range(8))
    est = LTAUEstimator.load(tmp_path / "run" / "estimator")
    assert est.metadata["val_file"] == str(data["test"]) and est.metadata["reference_structures"] == [0, 1]
    assert est.has_ood_reference
