"""LTAU logging from nequip's own trainer (LTAUCallback): training unchanged, every training atom
logged once per epoch under its own id, and an estimator that belongs to the saved model."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("nequip")
from helpers.nequip_runs import nequip_train, validation_metrics  # noqa: E402

from ltau_lmp.errors import LTAUError  # noqa: E402
from ltau_lmp.estimator import ErrorLog, LTAUEstimator  # noqa: E402
from ltau_lmp.estimator.errorlog import epoch_curve  # noqa: E402
from ltau_lmp.integrations.nequip import LTAUCallback  # noqa: E402
from ltau_lmp.integrations.replay import force_errors, read_training_set, replay  # noqa: E402
from ltau_lmp.prediction import predict_frames  # noqa: E402
from ltau_lmp.model import load_model  # noqa: E402


def test_callback_leaves_training_unchanged(nequip_run, si_data, tmp_path):
    plain = nequip_train(si_data, tmp_path / "plain", "trainer.callbacks=[]")
    with_ltau = validation_metrics(nequip_run)
    assert len(with_ltau) == 3 and with_ltau == validation_metrics(plain)
    assert not (plain / "ltau").exists()


def test_every_training_atom_once_per_epoch(nequip_run):
    log = ErrorLog.load(nequip_run / "ltau" / "error_log.npz")
    frames = read_training_set(nequip_run / "ltau" / "train_set.xyz")
    assert log.epoch == 3 and log.n_samples == sum(len(a) for a in frames) == 160
    assert (log.totals() == 3).all()


def test_validation_log_is_nequips_own_validation(nequip_run):
    """One row per training epoch over the 32 atoms of reference_set.xyz; each epoch's RMS of
    ‖F_pred − F_ref‖ is sqrt(3) x the force RMSE nequip itself logs for that epoch's validation."""
    out = nequip_run / "ltau"
    log, train = ErrorLog.load(out / "validation_error_log.npz"), ErrorLog.load(out / "error_log.npz")
    reference = read_training_set(out / "reference_set.xyz")
    assert log.n_samples == sum(len(a) for a in reference) == 32
    assert log.epoch == train.epoch == 3 and np.array_equal(log.bin_edges, train.bin_edges)
    assert (log.totals() == 3).all()
    curve = epoch_curve(log.epoch_stats)
    np.testing.assert_array_equal(curve["n"], 32)
    reported = [float(row["val0_epoch/forces_rmse"]) for row in validation_metrics(nequip_run)]
    assert len(reported) == 3 and len(set(reported)) == 3
    np.testing.assert_allclose(curve["rms"], np.sqrt(3) * np.array(reported), rtol=1e-10)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation_error_log"]["n_samples"] == 32


def test_estimator_belongs_to_the_saved_model(nequip_run):
    out = nequip_run / "ltau"
    model = load_model(out / "model.ckpt")
    estimator = LTAUEstimator.load(out / "estimator")
    assert estimator.metadata["model_hash"] == model.card.model_hash
    frames = read_training_set(out / "train_set.xyz")
    np.testing.assert_array_equal(np.load(out / "descriptors.npy"), predict_frames(model, frames, forces=False).latent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_structures"] == 4 and summary["epochs"] == 3


def test_ids_follow_their_atoms_and_replay_agrees(si_data, tmp_path):
    """With a zero learning rate every epoch's logged error of atom i is the final model's error on
    atom i of train_set.xyz: each id carries its own atom, whatever the shuffling; the same for the
    validation atoms and reference_set.xyz, validated every second epoch only (epoch 0: a row with
    n = 0). ``ltau-lmp replay`` of per-epoch nequip checkpoints (here: the final one, twice) gives
    the same logs."""
    run = nequip_train(si_data, tmp_path / "frozen", "epochs=2", "training_module.optimizer.lr=0.0",
                       "trainer.check_val_every_n_epoch=2")
    out = run / "ltau"
    log = ErrorLog.load(out / "error_log.npz")
    model = load_model(out / "model.ckpt")
    errors = force_errors(model, read_training_set(out / "train_set.xyz"))
    expected = np.zeros_like(log.counts)
    expected[np.arange(len(errors)), log.bin_index(errors)] = 2
    np.testing.assert_array_equal(log.counts, expected)
    validation = ErrorLog.load(out / "validation_error_log.npz")
    reference = read_training_set(out / "reference_set.xyz")
    held_out = force_errors(model, reference)
    assert validation.epoch == 2
    np.testing.assert_array_equal(epoch_curve(validation.epoch_stats)["n"], [0, held_out.size])
    np.testing.assert_allclose(validation.epoch_stats[1], [held_out.size, held_out.sum(), np.square(held_out).sum(),
                                                           held_out.max()], rtol=1e-10)
    expected = np.zeros_like(validation.counts)
    expected[np.arange(held_out.size), validation.bin_index(held_out)] = 1
    np.testing.assert_array_equal(validation.counts, expected)
    assert len(np.unique(validation.bin_index(held_out))) > 1  # a permutation of the ids would show
    for epoch in (1, 2):
        shutil.copy(out / "model.ckpt", tmp_path / f"si_epoch-{epoch}.ckpt")
    replayed_validation = ErrorLog(validation.n_samples, validation.bin_edges)
    replayed = replay(model, [tmp_path], read_training_set(out / "train_set.xyz"),
                      ErrorLog(log.n_samples, log.bin_edges), reference_frames=reference,
                      validation_log=replayed_validation)
    np.testing.assert_array_equal(replayed.counts, log.counts)
    np.testing.assert_array_equal(replayed_validation.counts, 2 * validation.counts)


def test_refusals():
    trainer = SimpleNamespace(world_size=2, max_epochs=10)
    with pytest.raises(LTAUError, match="2 processes is not supported"):
        LTAUCallback(out_dir="x").setup(trainer, None, "fit")
    trainer.world_size = 1
    with pytest.raises(LTAUError, match="skip_epochs=10 leaves none of the 10 training epochs"):
        LTAUCallback(out_dir="x", skip_epochs=10).setup(trainer, None, "fit")
