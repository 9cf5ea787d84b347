"""Built-in trainer: the validation atoms' error log, per-structure loss weights (``config_weight``),
and the same weights read back by MACE's own data loader."""

import math

import numpy as np
import pytest
import torch
from ase.io import write

from ltau_lmp.data.datasets import AtomsDataset, read_frames
from ltau_lmp.errors import FileFormatError
from ltau_lmp.estimator import ErrorLog
from ltau_lmp.estimator.errorlog import epoch_curve
from ltau_lmp.training.config import config_from_dict
from ltau_lmp.training.trainer import batch_loss, read_loss_weights, train
from helpers.training import small_config

def config(train_file, out_dir, **overrides):
    """``small_config`` on ``train_file``, 3 epochs unless overridden."""
    return small_config({"train": train_file}, out_dir, **{"epochs": 3, **overrides})


def with_weights(source, path, weights):
    """``source``'s frames written again by ase, with ``info["config_weight"]`` where a weight is given."""
    frames = read_frames(source)
    for atoms, weight in zip(frames, weights):
        if weight is not None:
            atoms.info["config_weight"] = weight
    write(path, frames, format="extxyz")
    return path


# ---- validation error log ---------------------------------------------------------------------------

def test_validation_log_follows_the_reported_validation_error(data, tmp_path, monkeypatch):
    captured = []  # (ids, errors) of every validation-log update, epoch by epoch
    original_update, original_end = ErrorLog.update, ErrorLog.end_epoch

    def update(self, ids, errors):
        if self.n_samples == 2 * 64:
            captured[-1].append((np.array(ids), np.array(errors)))
        original_update(self, ids, errors)

    def end(self):
        original_end(self)
        if self.n_samples == 2 * 64:
            captured.append([])

    captured.append([])
    monkeypatch.setattr(ErrorLog, "update", update)
    monkeypatch.setattr(ErrorLog, "end_epoch", end)
    result = train(config(data["train"], tmp_path, epochs=4, error_log={"skip_epochs": 1}),
                   show_progress=False)
    train_log, val_log = result.error_log, result.validation_log
    n_val = val_log.n_samples
    frames = read_frames(data["train"])
    reference_frames = [frames[i] for i in result.summary["val_structures"]]  # reference_set.xyz's order
    assert n_val == sum(len(a) for a in reference_frames) == 2 * 64
    assert len(np.load(tmp_path / "reference_descriptors.npy")) == n_val

    # epochs line up with the training log and metrics.csv; the same bins and counted epochs
    assert val_log.epoch == train_log.epoch == len(result.metrics) == 4
    assert val_log.epoch_stats.shape == train_log.epoch_stats.shape == (4, 4)
    np.testing.assert_array_equal(val_log.bin_edges, train_log.bin_edges)
    assert val_log.skip_epochs == train_log.skip_epochs == 1
    assert np.all(val_log.totals() == 3) and val_log.n_counted == 3 * n_val

    # per-epoch mean (and RMS) of the log = the validation force error the trainer reports that epoch
    curve = epoch_curve(val_log.epoch_stats)
    reported = np.array([row["val_force_error_mean"] for row in result.metrics])
    np.testing.assert_allclose(curve["mean"], reported, rtol=1e-12)
    np.testing.assert_allclose(curve["rms"] / math.sqrt(3),
                               [row["val_force_rmse"] for row in result.metrics], rtol=1e-12)
    assert np.all(curve["n"] == n_val)
    train_curve = epoch_curve(train_log.epoch_stats)
    np.testing.assert_allclose(train_curve["mean"], [row["train_force_error_mean"] for row in result.metrics],
                               rtol=1e-12)

    # written next to error_log.npz, recorded in summary.json
    saved = ErrorLog.load(tmp_path / "validation_error_log.npz")
    np.testing.assert_array_equal(saved.epoch_stats, val_log.epoch_stats)
    np.testing.assert_array_equal(saved.counts, val_log.counts)
    assert result.summary["validation_error_log"]["n_samples"] == n_val
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_force_error_mean" in header and "train_force_error_mean" in header

    # ids: every validation atom once per epoch, id = position in the validation frames in order; the
    # final model is the best epoch's, so that epoch's logged errors are the final model's errors
    epochs = [e for e in captured if e]
    assert len(epochs) == 4
    for batches in epochs:
        np.testing.assert_array_equal(np.sort(np.concatenate([b[0] for b in batches])), np.arange(n_val))
    best = epochs[result.summary["best_epoch"]]
    logged = np.empty(n_val)
    logged[np.concatenate([b[0] for b in best])] = np.concatenate([b[1] for b in best])
    from ltau_lmp.prediction import predict_frames

    expected = predict_frames(result.model, reference_frames, [a.get_forces() for a in reference_frames],
                              forces=False).errors
    np.testing.assert_allclose(logged, expected, rtol=1e-8)
    assert np.ptp(expected) > 0.1 * expected.mean()  # atoms differ, so a wrong id would show


def test_no_validation_no_validation_log(data, tmp_path):
    result = train(config(data["train"], tmp_path, epochs=1, data={"val_fraction": 0.0}),
                   show_progress=False)
    assert result.validation_log is None and not (tmp_path / "validation_error_log.npz").exists()
    assert result.summary["validation_error_log"] is None
    assert all(row["val_force_error_mean"] == "" for row in result.metrics)


# ---- per-structure loss weights ---------------------------------------------------------------------

def test_all_one_weights_reproduce_the_unweighted_training_exactly(data, tmp_path):
    ones = with_weights(data["train"], tmp_path / "ones.xyz", [1.0] * 8)
    # the same file both times: weights ignored ("" key: the unweighted loss) and weights read (all 1)
    plain = train(config(ones, tmp_path / "plain", data={"config_weight_key": ""}), show_progress=False)
    weighted = train(config(ones, tmp_path / "weighted"), show_progress=False)
    assert plain.summary["config_weights"] is None
    assert weighted.summary["config_weights"] == {"key": "config_weight", "n_structures": 6, "n_not_one": 0,
                                                  "min": 1.0, "max": 1.0, "mean": 1.0}
    for a, b in zip(plain.metrics, weighted.metrics):
        for key in ("train_loss", "train_energy_rmse", "train_force_rmse", "val_loss", "val_force_rmse"):
            assert a[key] == b[key], key  # bit for bit
    assert plain.model.model_hash == weighted.model.model_hash
    np.testing.assert_array_equal(plain.error_log.counts, weighted.error_log.counts)
    np.testing.assert_array_equal(plain.error_log.epoch_stats, weighted.error_log.epoch_stats)


def test_batch_loss_by_hand():
    cfg = config_from_dict({"energy_weight": 2.0, "force_weight": 0.5})
    energy_err = torch.tensor([0.1, -0.2], dtype=torch.float64)  # per atom, structures 0 and 1
    force_err = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    structure = torch.tensor([0, 0, 1])
    weights = torch.tensor([1.0, 4.0], dtype=torch.float64)
    unweighted = 2.0 * (0.01 + 0.04) / 2 + 0.5 * (1 + 4 + 9) / 9
    weighted = 2.0 * (1 * 0.01 + 4 * 0.04) / 2 + 0.5 * (1 * (1 + 4) + 4 * 9) / 9
    assert float(batch_loss(cfg, energy_err, force_err)) == pytest.approx(unweighted, rel=1e-14)
    assert float(batch_loss(cfg, energy_err, force_err, weights, structure)) == pytest.approx(weighted, rel=1e-14)
    ones = torch.ones(2, dtype=torch.float64)
    assert float(batch_loss(cfg, energy_err, force_err, ones, structure)) == float(batch_loss(cfg, energy_err, force_err))


def test_a_weight_changes_the_epoch_loss_as_computed_by_hand(data, tmp_path):
    """train_epoch on two structures (one batch, no update): its loss with weights (1, 2.5) is the
    hand-made combination of the two structures' squared errors."""
    from ltau_lmp.prediction import predict_batch
    from ltau_lmp.training.trainer import build_model, initialize_model, load_data, train_epoch

    path = with_weights(data["train"], tmp_path / "w.xyz", [None, 2.5] + [None] * 6)
    cfg = config(path, tmp_path / "run", batch_size=2, energy_weight=3.0, force_weight=0.7)
    loaded = load_data(cfg, tmp_path, np.random.default_rng(0))
    np.testing.assert_array_equal(loaded.weights, [1.0, 2.5] + [1.0] * 6)
    np.testing.assert_array_equal(loaded.train_weights, loaded.weights[loaded.train_idx])
    frames = read_frames(path)[:2]
    model = build_model(cfg, frames)
    ds = AtomsDataset(frames, model.species, model.cutoff)
    initialize_model(model, ds)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)

    e2, f2, n = [], [], []
    for s in range(2):  # each structure alone: its squared energy error per atom and force-error sum
        b = ds.batch([s])
        energy, forces, _ = predict_batch(model, b)
        e2.append(float(((energy - b.energy) / b.n_atoms) ** 2))
        f2.append(float(((forces - b.forces) ** 2).sum()))
        n.append(len(forces))
    w = [1.0, 2.5]
    by_hand = (3.0 * (w[0] * e2[0] + w[1] * e2[1]) / 2
               + 0.7 * (w[0] * f2[0] + w[1] * f2[1]) / (3 * (n[0] + n[1])))
    unweighted = 3.0 * (e2[0] + e2[1]) / 2 + 0.7 * (f2[0] + f2[1]) / (3 * (n[0] + n[1]))
    loss, *_ = train_epoch(model, sgd, ds, [0, 1], cfg, None, np.array(w))
    assert loss == pytest.approx(by_hand, rel=1e-10)
    loss_plain, *_ = train_epoch(model, sgd, ds, [1, 0], cfg, None)
    assert loss_plain == pytest.approx(unweighted, rel=1e-10)
    assert abs(by_hand - unweighted) > 1e-3 * unweighted


def test_weights_change_training_and_are_summarised(data, tmp_path):
    plain = train(config(data["train"], tmp_path / "plain", epochs=1), show_progress=False)
    heavy = plain.summary["train_structures"][0]
    weights = [None] * 8
    weights[heavy] = 3.0
    path = with_weights(data["train"], tmp_path / "w.xyz", weights)
    ones = train(config(path, tmp_path / "ignored", epochs=1, data={"config_weight_key": ""}),
                 show_progress=False)
    weighted = train(config(path, tmp_path / "weighted", epochs=1), show_progress=False)
    assert weighted.summary["config_weights"]["n_not_one"] == 1
    assert weighted.summary["config_weights"]["max"] == 3.0
    assert weighted.metrics[0]["train_loss"] > ones.metrics[0]["train_loss"]
    assert weighted.model.model_hash != ones.model.model_hash


def test_custom_key_and_bad_weights_are_clear_errors(data, tmp_path, capsys):
    frames = read_frames(data["train"])[:3]
    frames[1].info["w"] = 2
    np.testing.assert_array_equal(read_loss_weights(frames, "w", "f.xyz"), [1.0, 2.0, 1.0])
    assert read_loss_weights(frames, "config_weight", "f.xyz") is None  # no frame has it: unweighted
    assert read_loss_weights(frames, "", "f.xyz") is None
    for bad in (0.0, -1.0, math.nan, math.inf, "heavy", True, [1.0, 2.0]):
        frames[2].info["w"] = bad
        with pytest.raises(FileFormatError, match=r"f\.xyz: frame 2 has w=.*finite number > 0"):
            read_loss_weights(frames, "w", "f.xyz")

    path = with_weights(data["train"], tmp_path / "zero.xyz", [None] * 5 + [0.0, None, None])
    from ltau_lmp.cli import main

    cfg = config(path, tmp_path / "run")
    with pytest.raises(FileFormatError, match=r"zero\.xyz: frame 5 has config_weight=0\.0"):
        train(cfg, show_progress=False)
    (tmp_path / "c.yaml").write_text(f"train:\n  out_dir: {tmp_path / 'run'}\n  data:\n    train: {path}\n")
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "frame 5 has config_weight=0.0" in err


# ---- MACE reads the same weights ---------------------------------------------------------------------

def test_mace_reads_config_weight_written_by_ase(data, tmp_path):
    pytest.importorskip("mace")
    from mace.data.utils import KeySpecification, config_from_atoms, load_from_xyz

    frames = read_frames(data["train"])[:4]
    weights = [0.5, 1.0, 2.0, 3.25]
    for atoms, weight in zip(frames, weights):
        atoms.info["config_weight"] = weight
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
    path = tmp_path / "weighted.xyz"
    write(path, frames, format="extxyz")

    keys = KeySpecification.from_defaults()  # mace_run_train's --energy_key/--forces_key defaults
    assert keys.info_keys["energy"] == "REF_energy" and keys.arrays_keys["forces"] == "REF_forces"
    _, configs = load_from_xyz(str(path), keys)
    assert [c.weight for c in configs] == weights
    np.testing.assert_allclose(configs[2].properties["forces"], frames[2].arrays["REF_forces"])
    from ase.io import read

    assert [config_from_atoms(a, keys).weight for a in read(path, ":")] == weights
    # ltau_lmp's trainer reads the same file to the same weights
    np.testing.assert_array_equal(read_loss_weights(read(path, ":"), "config_weight", path), weights)
