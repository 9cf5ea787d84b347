"""ltau-lmp learn with nequip's own trainer (learn.trainer: nequip): a tiny loop (8 SW frames, the
example's tiny NequIP for 3 epochs, a 20-step NVT protocol whose template loads the checkpoint with
`pair_style ltau allow_pickle yes`) runs two rounds end to end, round 1 warm-started from round
0's model; with a zero learning rate a warm-started training gives back that model exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import read

pytest.importorskip("nequip")
from helpers.learn import tiny_loop_inputs  # noqa: E402
from helpers.paths import ROOT  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ltau_lmp.data.config import from_dict  # noqa: E402
from ltau_lmp.errors import ConfigError  # noqa: E402
from ltau_lmp.estimator import LTAUEstimator  # noqa: E402
from ltau_lmp.learn import loop  # noqa: E402
from ltau_lmp.learn.config import LearnConfig  # noqa: E402
from ltau_lmp.learn.explore import SI_NVT_TEMPLATE  # noqa: E402
from ltau_lmp.learn.trainers import RoundModel  # noqa: E402
from ltau_lmp.learn.trainers.nequip import train_nequip  # noqa: E402

pytestmark = pytest.mark.mpi

PAIR = "pair_style      ltau\n"
NEQUIP = {"config": str(ROOT / "examples" / "nequip_si" / "nequip_si.yaml"), "overrides": ["epochs=3"]}


def config(root, initial, **changes) -> LearnConfig:
    protocol = {"name": "hot", "template": "nvt.in", "steps": 20, "ranks": 1,
                "variables": {"data": "si.data", "temp": "900", "every": "5", "restart_every": "5",
                              "halt": "1.0 over 2", "dump": "1.0"}}
    options = {"out_dir": "run", "initial_data": str(initial), "trainer": "nequip", "nequip": NEQUIP,
               "allow_pickle": True, "protocols": [protocol],
               "train": {"seed": 0, "data": {"val_fraction": 0.25}, "error_log": {"skip_epochs": 1}},
               "reference": {"calculator": "ltau_lmp.data.reference:LAMMPSCalculator",
                             "kwargs": {"potential": "Si.sw", "pair_style": "sw", "elements": ["Si"]}},
               "labelling": {"workers": 1}, "selection": {"per_protocol": 2, "per_round": 2},
               "stop": {"max_rounds": 2}}
    return from_dict(LearnConfig, {**options, **changes}, "learn")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn_nequip")
    assert PAIR in SI_NVT_TEMPLATE
    initial = tiny_loop_inputs(root, SI_NVT_TEMPLATE.replace(PAIR, "pair_style      ltau allow_pickle yes\n"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # nequip-train and LAMMPS: one thread each on the shared cores
        manifest = loop.run_learn(config(root, initial), root, progress=False)
    return root, manifest


def test_two_rounds_end_to_end(run):
    root, manifest = run
    folder = root / "run"
    assert manifest.data["stopped"].startswith("max_rounds 2") and len(manifest.data["rounds"]) == 3
    assert set(manifest.data["rounds"][2]["stages"]) == {"train"}                  # the budget stop's training
    for rnd in manifest.data["rounds"]:
        train = rnd["stages"]["train"]
        assert train["model"].endswith("model/ltau/model.ckpt") and train["estimator"].endswith("model/ltau/estimator")
        assert train["epochs"] == 3 and train["allow_pickle"] and train["warm_start"] == (rnd["round"] > 0)
        assert train["thresholds"]["n_reference"] == 128                             # the 2 validation frames
    for rnd in manifest.data["rounds"][:2]:
        stages = rnd["stages"]
        assert set(stages) == set(loop.STAGES)
        assert stages["explore"]["protocols"]["hot"]["status"] == "halted"
        assert stages["label"]["labelled"] == 2 and not stages["label"]["failed"]
        assert np.all(np.array(stages["label"]["errors"]) > 0)
        (log,) = (folder / "rounds" / f"{rnd['round']:03d}" / "explore" / "hot").rglob("log.lammps")
        text = log.read_text()
        assert "pair_style      ltau allow_pickle yes" in text
        assert f"pair_coeff      * * {folder / stages['train']['model']} Si" in text
    assert manifest.labels == 4 and manifest.data["rounds"][1]["stages"]["train"]["labels"] == 2
    model = RoundModel.from_json(manifest.data["rounds"][1]["stages"]["train"], folder)
    assert len(read(model.model.parent / "train_set.xyz", index=":")) == 8              # 6 initial + 2 labels
    assert LTAUEstimator.load(model.estimator).metadata["model_hash"] == model.load().card.model_hash


def test_round_one_starts_from_round_zeros_model(run, tmp_path, monkeypatch):
    """Round 1's nequip-train config names round 0's checkpoint and keeps its model config; trained
    like it for an epoch with a zero learning rate, a warm start returns round 0's model itself
    (its content hash: architecture, metadata and every weight)."""
    root, manifest = run
    folder = root / "run"
    first = RoundModel.from_json(manifest.data["rounds"][0]["stages"]["train"], folder)
    second = OmegaConf.load(folder / "rounds" / "001" / "model" / "config.yaml")
    (warm,) = [c for c in second.trainer.callbacks if c["_target_"].endswith(".WarmStart")]
    assert warm.checkpoint == str(first.model)
    stored = torch.load(first.model, weights_only=True)["hyper_parameters"]["model"]
    assert OmegaConf.to_container(second.training_module.model) == stored
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = config(root, root / "data" / "train.xyz",
                 nequip={**NEQUIP, "overrides": ["epochs=1", "training_module.optimizer.lr=0.0"]},
                 train={"data": {"val_fraction": 0.25}})
    frozen = train_nequip(cfg, root, folder / "rounds" / "001" / "train.xyz", folder / "validation.xyz", first,
                          tmp_path / "frozen")
    assert frozen.load().card.model_hash == first.load().card.model_hash


def test_refusals_before_anything_is_written(run, tmp_path):
    root, _ = run
    data, val, out = root / "run" / "rounds" / "000" / "train.xyz", root / "run" / "validation.xyz", tmp_path / "out"
    cases = [({"nequip": {**NEQUIP, "epochs": 3}}, val, "learn.nequip: unknown key"),
             ({"nequip": {**NEQUIP, "overrides": ["data.train_dataset.file_path=x.xyz"]}}, val, "the loop sets itself"),
             ({"nequip": {**NEQUIP, "overrides": ["model=nosuch"]}}, val, "Could not find 'model/nosuch'"),
             ({"nequip": {**NEQUIP, "overrides": ["epochs=1"]}}, val, r"skip_epochs \(1\) must be smaller"),
             ({"train": {"error_log": {"skip_epochs": 1}, "estimator": {"weighting": "distance"}}}, val,
              "estimator.weighting"),
             ({}, None, "needs a validation set")]
    for changes, validation, message in cases:
        with pytest.raises(ConfigError, match=message):
            train_nequip(config(root, data, **changes), root, data, validation, None, out)
    assert not out.exists()
