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
    atom i of train_set.xyz: each id carries its own atom, whatever the shuffling. ``ltau-lmp
    replay`` of per-epoch nequip checkpoints (here: the final one, twice) gives the same log."""
    run = nequip_train(si_data, tmp_path / "frozen", "epochs=2", "training_module.optimizer.lr=0.0")
    out = run / "ltau"
    log = ErrorLog.load(out / "error_log.npz")
    model = load_model(out / "model.ckpt")
    errors = force_errors(model, read_training_set(out / "train_set.xyz"))
    expected = np.zeros_like(log.counts)
    expected[np.arange(len(errors)), log.bin_index(errors)] = 2
    np.testing.assert_array_equal(log.counts, expected)
    for epoch in (1, 2):
        shutil.copy(out / "model.ckpt", tmp_path / f"si_epoch-{epoch}.ckpt")
    replayed = replay(model, [tmp_path], read_training_set(out / "train_set.xyz"),
                      ErrorLog(log.n_samples, log.bin_edges))
    np.testing.assert_array_equal(replayed.counts, log.counts)


def test_refusals():
    trainer = SimpleNamespace(world_size=2, max_epochs=10)
    with pytest.raises(LTAUError, match="2 processes is not supported"):
        LTAUCallback(out_dir="x").setup(trainer, None, "fit")
    trainer.world_size = 1
    with pytest.raises(LTAUError, match="skip_epochs=10 leaves none of the 10 training epochs"):
        LTAUCallback(out_dir="x", skip_epochs=10).setup(trainer, None, "fit")
