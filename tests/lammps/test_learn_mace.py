"""ltau-lmp learn with MACE's own trainer (learn.trainer: mace): a tiny loop (8 SW frames, a
very small MACE, 20-step protocol) runs two rounds end to end; round 1 continues from round 0's
weights; LAMMPS runs MACE's TorchScript NAME_compiled.model (no pickle opt-in) and fix ltau's
latents are the estimator's own entries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.io import read, write

from ltau_lmp.data.config import from_dict
from ltau_lmp.learn import loop
from ltau_lmp.learn.config import LearnConfig

pytest.importorskip("mace")
from helpers.archives import SI_HEADER  # noqa: E402
from helpers.learn import tiny_loop_inputs  # noqa: E402
from helpers.fix_ltau import in_process  # noqa: E402

from ltau_lmp.errors import ConfigError  # noqa: E402
from ltau_lmp.estimator import LTAUEstimator  # noqa: E402
from ltau_lmp.learn.trainers.mace import mace_arguments, train_mace  # noqa: E402

pytestmark = pytest.mark.mpi

MACE = {"name": "si", "model": "MACE", "r_max": 4.0, "num_channels": 8, "max_L": 0, "num_interactions": 2,
        "correlation": 2, "E0s": "average", "max_num_epochs": 3, "batch_size": 2, "forces_weight": 100.0,
        "default_dtype": "float64", "device": "cpu", "seed": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn_mace")
    initial = tiny_loop_inputs(root)
    protocol = {"name": "hot", "template": "nvt.in", "steps": 20, "ranks": 1,
                "variables": {"data": "si.data", "temp": "900", "every": "5", "restart_every": "5",
                              "halt": "1.0 over 2", "dump": "1.0"}}
    cfg = from_dict(LearnConfig, {
        "out_dir": "run", "initial_data": str(initial), "trainer": "mace", "mace": MACE,
        "protocols": [protocol], "launcher": "env OMP_NUM_THREADS=1 mpirun -np {ranks}",  # learn_mace.yaml's
        "train": {"seed": 0, "data": {"val_fraction": 0.25}, "error_log": {"skip_epochs": 1}},
        "reference": {"calculator": "ltau_lmp.data.reference:LAMMPSCalculator",
                      "kwargs": {"potential": "Si.sw", "pair_style": "sw", "elements": ["Si"]}},
        "labelling": {"workers": 1}, "selection": {"per_protocol": 2, "per_round": 2}, "stop": {"max_rounds": 2}},
        "learn")
    return root / "run", loop.run_learn(cfg, root, progress=False)


def validation_losses(model_dir) -> dict:
    """{epoch (None: before training): MACE's validation loss} from its results file."""
    (results,) = (model_dir / "mace" / "results").glob("*_train.txt")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return {row["epoch"]: row["loss"] for row in rows if row["mode"] == "eval"}


def test_two_rounds_end_to_end(run):
    folder, manifest = run
    rounds = manifest.data["rounds"][:2]
    assert manifest.data["stopped"].startswith("max_rounds 2")
    assert all(set(rnd["stages"]) == {"train"} for rnd in manifest.data["rounds"][2:])  # a final training only
    for rnd in manifest.data["rounds"]:
        train = rnd["stages"]["train"]
        assert train["model"].endswith("model/mace/si_compiled.model") and train["epochs"] == 3
        assert train["estimator"].endswith("model/lammps/estimator")
        assert train["thresholds"]["n_reference"] == 128                       # the 2 validation frames
        assert train["warm_start"] == (rnd["round"] > 0)
    for rnd in rounds:
        stages = rnd["stages"]
        assert set(stages) == set(loop.STAGES)
        hot = stages["explore"]["protocols"]["hot"]
        assert hot["status"] == "halted" and hot["halt_step"] is not None
        assert stages["label"]["labelled"] == 2 and not stages["label"]["failed"]
        assert np.all(np.array(stages["label"]["errors"]) > 0)
        (log,) = (folder / "rounds" / f"{rnd['round']:03d}" / "explore" / "hot").rglob("log.lammps")
        text = log.read_text()
        assert f"pair_coeff      * * {folder / stages['train']['model']} Si" in text and "allow_pickle" not in text
    second = rounds[1]["stages"]["train"]
    assert second["labels"] == 2 and second["structures"] == 8
    assert len(read(folder / "rounds" / "001" / "model" / "ltau" / "train_set.xyz", index=":")) == 8
    assert manifest.labels == 4


def test_round_one_starts_from_round_zeros_weights(run):
    """The same validation set every round: round 1's loss before its first epoch is round 0's
    final model's (the lowest validation loss: the checkpoint MACE keeps), far below round 0's start."""
    folder, _ = run
    first, second = (validation_losses(folder / "rounds" / f"{r:03d}" / "model") for r in (0, 1))
    best = min(loss for epoch, loss in first.items() if epoch is not None)
    assert second[None] == pytest.approx(best, rel=1e-9)
    assert second[None] < 0.5 * first[None]


def test_fix_latents_are_the_estimators_entries(run, tmp_path):
    """Round 1's first training frame in LAMMPS with its compiled model, fix ltau k 1: every atom
    finds its own estimator entry at distance 0 and gets that entry's expected error."""
    folder, manifest = run
    entry = manifest.data["rounds"][1]["stages"]["train"]
    model, estimator = folder / entry["model"], folder / entry["estimator"]
    atoms = read(folder / "rounds" / "001" / "model" / "ltau" / "train_set.xyz", index=0)
    write(tmp_path / "cell.lmp", atoms, format="lammps-data", specorder=["Si"], masses=False, units="metal")
    script = SI_HEADER + f"fix u all ltau {estimator} k 1 metric distance\nrun 0\n"
    state, error = in_process(script.format(data=tmp_path / "cell.lmp", model=model))
    assert error == ""
    est = LTAUEstimator.load(estimator)
    assert state["peratom"][:, 3].max() <= 1e-6 * np.abs(np.load(estimator.parent / "descriptors.npy")).max()
    np.testing.assert_allclose(state["peratom"][:, 0], est.entry_expected[:len(atoms)], rtol=1e-6)


def test_options_the_loop_sets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="learn.mace.train_file: set by the loop"):
        mace_arguments({**MACE, "train_file": "x.xyz"}, tmp_path / "t.xyz", None, tmp_path, None)
    with pytest.raises(ConfigError, match="without the leading dashes"):
        mace_arguments({"--name": "si"}, tmp_path / "t.xyz", None, tmp_path, None)
    with pytest.raises(ConfigError, match="learn.mace.name"):
        mace_arguments({"model": "MACE"}, tmp_path / "t.xyz", None, tmp_path, None)
    args = mace_arguments(MACE, tmp_path / "t.xyz", tmp_path / "v.xyz", tmp_path / "w", tmp_path / "si.model")
    assert f"--foundation_model={tmp_path / 'si.model'}" in args and "--multiheads_finetuning=False" in args
    assert f"--valid_file={tmp_path / 'v.xyz'}" in args and "--energy_key=energy" in args
    flags = mace_arguments({**MACE, "ema": True, "swa": False}, tmp_path / "t.xyz", None, tmp_path / "w", None)
    assert "--ema" in flags and not any(arg.startswith("--swa") for arg in flags)
    with pytest.raises(ConfigError, match="--amsgrad can only make it True"):
        mace_arguments({**MACE, "amsgrad": False}, tmp_path / "t.xyz", None, tmp_path, None)
    cfg = from_dict(LearnConfig, {"initial_data": "x.xyz", "trainer": "mace", "mace": MACE,
                                  "protocols": [{"name": "hot", "template": "nvt.in"}],
                                  "train": {"error_log": {"skip_epochs": 3}}}, "learn")
    with pytest.raises(ConfigError, match=r"skip_epochs \(3\) must be smaller than learn.mace.max_num_epochs \(3\)"):
        train_mace(cfg, tmp_path, tmp_path / "t.xyz", None, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()                                  # refused before anything is written
