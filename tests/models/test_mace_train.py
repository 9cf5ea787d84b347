"""LTAU logging from MACE's unchanged trainer, and replay from its per-epoch checkpoints.

Tiny MACE runs with the same seed: a plain ``mace_run_train`` and ``ltau-lmp mace-train``, each in
a fresh process, must give identical validation losses (MACE's own float results differ in the
last bits between the first and later runs inside one process, logging or not, so the two
are compared in equal conditions); a logged run through the Python API checks each logged error
against the trainer's own weights at that step, and replay against the live log.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk

from ltau_lmp.errors import ConfigError, FileFormatError, LTAUError
from ltau_lmp.estimator import ErrorLog, LTAUEstimator
from ltau_lmp.estimator.errorlog import epoch_curve
from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions

pytest.importorskip("mace")
from ltau_lmp.cli import integrations as cli  # noqa: E402
from ltau_lmp.integrations.mace import ID_KEY, parse_mace_args, train_with_ltau  # noqa: E402
from ltau_lmp.integrations.replay import (checkpoint_files, force_errors, read_training_set,  # noqa: E402
                                          replay, replay_errors)
from ltau_lmp.model import PickleRefusedError, load_model  # noqa: E402

EPOCHS, N_FRAMES, BATCH = 3, 20, 4  # 16 training + 4 validation structures: 4 full steps per epoch


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from ase.io import write

    from ltau_lmp.data.reference import reference_calculation

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(N_FRAMES):
        atoms = bulk("Si", "diamond", a=5.431, cubic=True)
        atoms.set_cell(atoms.cell @ (np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
        frames.append(atoms)
    for atoms, (energy, forces, _) in zip(frames, reference_calculation(frames)):
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = forces
    path = tmp_path_factory.mktemp("data") / "train.xyz"
    write(path, frames, format="extxyz")
    return path


def mace_args(train_file, work_dir):
    return ["--name", "tiny", "--train_file", str(train_file), "--valid_fraction", "0.2",
            "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--model", "MACE",
            "--num_channels", "8", "--max_L", "0", "--r_max", "4.0", "--num_interactions", "2",
            "--correlation", "2", "--max_num_epochs", str(EPOCHS), "--batch_size", str(BATCH),
            "--default_dtype", "float64", "--device", "cpu", "--seed", "1", "--E0s", "average",
            "--save_all_checkpoints", "--keep_checkpoints", "--work_dir", str(work_dir)]


def validation_losses(work_dir):
    lines = (work_dir / "results" / "tiny_run-1_train.txt").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["mode"] == "eval"]


def validation_rmse_f(work_dir):
    """{epoch: MACE's own validation force RMSE (per component, eV/A)} of each epoch it validated."""
    lines = [json.loads(line) for line in (work_dir / "results" / "tiny_run-1_train.txt").read_text().splitlines()]
    return {row["epoch"]: row["rmse_f"] for row in lines if row["mode"] == "eval" and row["epoch"] is not None}


CLI = ("import argparse, sys; from ltau_lmp.cli.integrations import register; "
       "p = argparse.ArgumentParser(); register(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))")


@pytest.fixture(scope="module")
def runs(train_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("mace")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both alike; one core each while this process trains
    fresh = [
        subprocess.Popen([sys.executable, "-m", "mace.cli.run_train", *mace_args(train_file, root / "plain")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env),
        subprocess.Popen([sys.executable, "-c", CLI, "mace-train", "--nbins", "50", "--index", "flat",
                          "-o", str(root / "cli_out"), "--", *mace_args(train_file, root / "cli")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)]

    # The trainer's own weights before every step (the test's hook, not part of the logging).
    train_module = importlib.import_module("mace.tools.train")
    take_step, snapshots = train_module.take_step, []

    def recording_take_step(**kwargs):
        snapshots.append((kwargs["batch"][ID_KEY].reshape(-1).numpy().copy(),
                          {k: v.detach().clone() for k, v in kwargs["model"].state_dict().items()}))
        return take_step(**kwargs)

    steps = []

    def on_step(epoch, ids, errors):
        steps.append((epoch, ids.copy(), errors.copy()))

    train_module.take_step = recording_take_step
    try:
        logged = train_with_ltau(mace_args(train_file, root / "logged"), on_step=on_step)
    finally:
        train_module.take_step = take_step
    for process in fresh:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return {"logged": logged, "steps": steps, "snapshots": snapshots, "root": root, "parser": parser}


def test_logging_leaves_training_unchanged(runs):
    plain = validation_losses(runs["root"] / "plain")
    assert len(plain) == EPOCHS + 1  # the initial evaluation and one per epoch
    assert validation_losses(runs["root"] / "cli") == plain  # bit for bit
    np.testing.assert_allclose(validation_losses(runs["root"] / "logged"), plain, rtol=1e-12)
    assert torch.get_default_dtype() == torch.float32  # MACE's float64 default did not leak


def test_every_training_atom_logged_every_epoch(runs):
    n_atoms = runs["logged"].error_log.n_samples
    assert n_atoms == 16 * 8
    for epoch in range(EPOCHS):
        ids = np.concatenate([ids for e, ids, _ in runs["steps"] if e == epoch])
        assert np.array_equal(np.sort(ids), np.arange(n_atoms))
    assert np.all(runs["logged"].error_log.totals() == EPOCHS)


def test_logged_errors_equal_errors_of_the_trainers_weights_at_that_step(runs):
    """Errors come from the step's forward pass, before the optimizer step: recompute them from
    the weights the trainer held when the step began (last epoch: after many updates)."""
    steps, snapshots = runs["steps"], runs["snapshots"]
    assert len(steps) == len(snapshots) == EPOCHS * 4
    model = load_model(runs["logged"].model_path, allow_pickle=True)
    frames = runs["logged"].frames
    last = [k for k, (epoch, _, _) in enumerate(steps) if epoch == EPOCHS - 1]
    for k in last:
        _, ids, logged = steps[k]
        snapshot_ids, state = snapshots[k]
        assert np.array_equal(ids, snapshot_ids)
        model.mace.load_state_dict(state)
        np.testing.assert_allclose(logged, force_errors(model, frames)[ids], rtol=1e-10, atol=1e-12)
    model.mace.load_state_dict(snapshots[last[0] - 1][1])  # weights one step earlier differ
    assert not np.allclose(steps[last[0]][2], force_errors(model, frames)[steps[last[0]][1]], rtol=1e-6)


def test_estimator_and_files(runs):
    result = runs["logged"]
    model = load_model(result.model_path, allow_pickle=True)
    assert result.model_hash == model.card.model_hash
    est = LTAUEstimator.load(result.out_dir / "estimator")
    assert est.metadata["model_hash"] == model.card.model_hash and est.metadata["model_card"]["family"] == "mace"
    assert (est.dim, est.n_entries) == (model.card.latent_dim, 16 * 8) == (16, 128)
    assert np.load(result.out_dir / "descriptors.npy").shape == (128, 16)
    assert ErrorLog.load(result.out_dir / "error_log.npz").n_counted == EPOCHS * 128
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["model_card"]["receptive_field"] == 8.0 and summary["epochs"] == EPOCHS
    frames = read_training_set(result.out_dir / "train_set.xyz")
    assert len(frames) == 16
    for a, b in zip(frames, result.frames):
        assert np.array_equal(a.positions, b.positions)
        assert np.array_equal(a.arrays["REF_forces"], b.arrays["REF_forces"])
    cli_est = LTAUEstimator.load(runs["root"] / "cli_out" / "estimator")
    cli_model = load_model(runs["root"] / "cli" / "tiny.model", allow_pickle=True)
    assert cli_est.metadata["model_hash"] == cli_model.card.model_hash and cli_est.nbins == 50


def test_mace_validation_set_calibrates_the_ood_score(runs, train_file):
    """MACE's 4 validation structures (valid_fraction 0.2), none of them trained on, are the reference."""
    from ase.io import read

    from ltau_lmp.prediction import predict_frames

    result = runs["logged"]
    model = load_model(result.model_path, allow_pickle=True)
    assert len(result.reference_frames) == N_FRAMES - 16
    everything = read(train_file, index=":")
    trained = {a.positions.tobytes() for a in result.frames}
    assert all(a.positions.tobytes() not in trained for a in result.reference_frames)
    assert {a.positions.tobytes() for a in result.reference_frames} | trained == {
        a.positions.tobytes() for a in everything}
    est = LTAUEstimator.load(result.out_dir / "estimator")
    assert est.alarm_thresholds["n_reference"] == 4 * 8
    reference = predict_frames(model, result.reference_frames, forces=False).latent
    np.testing.assert_array_equal(np.load(result.out_dir / "reference_descriptors.npy"), reference)
    np.testing.assert_array_equal(est.reference_distances, np.sort(est.query(reference).distance))
    assert len(read(result.out_dir / "reference_set.xyz", index=":")) == 4


def test_replay_agrees_with_the_live_log(runs):
    """Checkpoint t holds the weights the first step of epoch t + 1 started from."""
    result = runs["logged"]
    model = load_model(result.model_path, allow_pickle=True)
    checkpoints = [result.model_path.parent / "checkpoints"]
    assert [epoch for epoch, _ in checkpoint_files(checkpoints)] == list(range(EPOCHS))
    first_step = {epoch: (ids, errors) for epoch, ids, errors in reversed(runs["steps"])}
    for epoch, _, errors in replay_errors(model, checkpoints, result.frames):
        if epoch + 1 < EPOCHS:
            ids, logged = first_step[epoch + 1]
            np.testing.assert_allclose(errors[ids], logged, rtol=1e-10, atol=1e-12)
    log = replay(model, checkpoints, result.frames, ErrorLog.log_spaced(128))
    assert log.epoch == EPOCHS and np.all(log.totals() == EPOCHS)


def test_validation_log_is_maces_own_validation(runs):
    """One row per training epoch; each epoch's RMS of ‖F_pred − F_ref‖ over the 32 validation atoms
    is sqrt(3) x the force RMSE MACE itself reports for that epoch's validation (per component)."""
    result = runs["logged"]
    log = result.validation_log
    assert log.n_samples == 4 * 8 and log.epoch == result.error_log.epoch == EPOCHS
    assert np.array_equal(log.bin_edges, result.error_log.bin_edges)
    assert np.all(log.totals() == EPOCHS)
    curve = epoch_curve(log.epoch_stats)
    reported = validation_rmse_f(runs["root"] / "logged")
    assert sorted(reported) == list(range(EPOCHS))
    np.testing.assert_array_equal(curve["n"], 32)
    np.testing.assert_allclose(curve["rms"], np.sqrt(3) * np.array([reported[e] for e in range(EPOCHS)]), rtol=1e-10)
    assert len(set(np.round(curve["rms"], 8))) == EPOCHS  # the epochs differ: each row is its own epoch
    saved = ErrorLog.load(result.out_dir / "validation_error_log.npz")
    np.testing.assert_array_equal(saved.counts, log.counts)
    np.testing.assert_array_equal(saved.epoch_stats, log.epoch_stats)
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["validation_error_log"]["n_samples"] == 32


def test_validation_ids_are_reference_set_atoms(runs):
    """MACE validates epoch t with the weights it saves as checkpoint t (no EMA): the reference
    frames (read back from reference_set.xyz) through each checkpoint give, atom by atom, the live
    validation log's histograms; a permutation of the ids would not."""
    result = runs["logged"]
    model = load_model(result.model_path, allow_pickle=True)
    reference = read_training_set(result.out_dir / "reference_set.xyz")
    assert len(reference) == 4 and all(len(a) == 8 for a in reference)
    for a, b in zip(reference, result.reference_frames):
        np.testing.assert_array_equal(a.arrays["REF_forces"], b.arrays["REF_forces"])
    checkpoints = [result.model_path.parent / "checkpoints"]
    train = ErrorLog(result.error_log.n_samples, result.error_log.bin_edges)
    validation = ErrorLog(32, result.validation_log.bin_edges)
    replay(model, checkpoints, result.frames, train, reference_frames=reference, validation_log=validation)
    assert validation.epoch == train.epoch == EPOCHS
    np.testing.assert_array_equal(validation.counts, result.validation_log.counts)
    np.testing.assert_allclose(validation.epoch_stats, result.validation_log.epoch_stats, rtol=1e-10)
    live = result.validation_log.counts
    assert not np.array_equal(live[np.roll(np.arange(32), 8)], live)  # frames differ, so the test can fail


def test_validation_every_other_epoch(train_file, tmp_path):
    """--eval_interval 2 over 3 epochs: MACE validates after epochs 0 and 2; epoch 1 keeps a row with n = 0."""
    args = [a for a in mace_args(train_file, tmp_path) if a not in ("--save_all_checkpoints", "--keep_checkpoints")]
    result = train_with_ltau([*args, "--eval_interval", "2"], error_log=ErrorLogOptions(nbins=20))
    log = result.validation_log
    assert log.epoch == result.error_log.epoch == 3 and log.nbins == 20
    curve = epoch_curve(log.epoch_stats)
    np.testing.assert_array_equal(curve["n"], [32, 0, 32])
    reported = validation_rmse_f(tmp_path)
    assert sorted(reported) == [0, 2]
    np.testing.assert_allclose(curve["rms"][[0, 2]], np.sqrt(3) * np.array([reported[0], reported[2]]), rtol=1e-10)
    assert np.all(log.totals() == 2)


def test_replay_cli(runs, capsys):
    result, parser = runs["logged"], runs["parser"]
    out = runs["root"] / "replayed"
    argv = ["replay", str(result.model_path), str(result.model_path.parent / "checkpoints"),
            "--train-file", str(result.out_dir / "train_set.xyz"), "-o", str(out), "--skip-epochs", "1"]
    args = parser.parse_args(argv)
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        args.func(args)
    args = parser.parse_args([*argv, "--allow-pickle"])
    assert args.func(args) == 0
    log = ErrorLog.load(out / "error_log.npz")
    assert (log.epoch, log.n_counted) == (EPOCHS, (EPOCHS - 1) * 128)
    assert LTAUEstimator.load(out / "estimator").metadata["model_hash"] == result.model_hash
    assert LTAUEstimator.load(out / "estimator").alarm_thresholds is None
    assert not (out / "validation_error_log.npz").exists()
    args = parser.parse_args([*argv, "--allow-pickle", "--reference-file", str(result.out_dir / "reference_set.xyz"),
                              "--false-alarm-rate", "0.1", "--overwrite"])
    assert args.func(args) == 0
    assert LTAUEstimator.load(out / "estimator").alarm_thresholds["n_reference"] == 32
    validation = ErrorLog.load(out / "validation_error_log.npz")  # every checkpoint, as the training log
    assert (validation.epoch, validation.n_counted) == (EPOCHS, (EPOCHS - 1) * 32)
    np.testing.assert_allclose(validation.epoch_stats, result.validation_log.epoch_stats, rtol=1e-10)
    # reference frames without forces still calibrate, but fill no validation log (said so)
    from ase.io import write

    bare = [a.copy() for a in result.reference_frames]
    for a in bare:
        del a.arrays["REF_forces"]
    write(runs["root"] / "bare.xyz", bare, format="extxyz")
    capsys.readouterr()
    args = parser.parse_args([*argv, "--allow-pickle", "--reference-file", str(runs["root"] / "bare.xyz"),
                              "--false-alarm-rate", "0.1", "--overwrite"])
    assert args.func(args) == 0
    assert "reference frame 0 has no forces under 'REF_forces'" in capsys.readouterr().out
    assert not (out / "validation_error_log.npz").exists()
    assert LTAUEstimator.load(out / "estimator").alarm_thresholds["n_reference"] == 32


def test_refusals(train_file, tmp_path):
    base = mace_args(train_file, tmp_path)
    with pytest.raises(LTAUError, match="--lbfgs"):
        parse_mace_args([*base, "--lbfgs"])
    with pytest.raises(LTAUError, match="--distributed"):
        parse_mace_args([*base, "--distributed"])
    with pytest.raises(ConfigError, match="estimator.index"):  # checked before MACE starts
        train_with_ltau(base, estimator=EstimatorOptions(index="bogus"))
    with pytest.raises(ConfigError, match="lo < hi"):
        train_with_ltau(base, error_log=ErrorLogOptions(lo=1.0, hi=0.5))
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="no per-epoch checkpoints"):
        checkpoint_files([tmp_path])
    for name in ("a_run-1_epoch-0.pt", "b_run-1_epoch-0.pt"):
        torch.save({}, tmp_path / name)
    with pytest.raises(ConfigError, match=r"several checkpoints for epoch\(s\) \[0\]"):
        checkpoint_files([tmp_path])
    with pytest.raises(ConfigError, match="not named like"):
        checkpoint_files([train_file])
    args = argparse.ArgumentParser()
    cli.register(args.add_subparsers())
    parsed = args.parse_args(["mace-train"])
    with pytest.raises(ConfigError, match="after `--`"):
        parsed.func(parsed)


def test_replay_rejects_foreign_checkpoints(runs, tmp_path):
    model = load_model(runs["logged"].model_path, allow_pickle=True)
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "x_epoch-0.pt")
    with pytest.raises(FileFormatError, match="do not fit the model"):
        next(replay_errors(model, [tmp_path], runs["logged"].frames))
