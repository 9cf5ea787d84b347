"""ltau-lmp learn: a tiny loop (8 SW frames, a small built-in model, 20-step protocols) runs its
rounds end to end; a protocol that never alarms ends it by the stopping rule; a kill at any stage
resumes to the same labels as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from helpers.learn import SW, tiny_loop_inputs
from ltau_lmp.data.config import from_dict
from ltau_lmp.learn import loop
from ltau_lmp.learn.config import LearnConfig
from ltau_lmp.learn.label import collect_labels

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    return {"root": root, "initial": tiny_loop_inputs(root)}


def config(inputs, out: str, halt: str, replicas: int = 1, **stop) -> LearnConfig:
    protocol = {"name": "hot", "template": "nvt.in", "steps": 20, "ranks": 1, "replicas": replicas,
                "variables": {"data": "si.data", "temp": "900", "every": "5", "restart_every": "5",
                              "halt": halt, "dump": "1.0"}}
    return from_dict(LearnConfig, {
        "out_dir": out, "initial_data": str(inputs["initial"]), "protocols": [protocol],
        "train": {"epochs": 3, "batch_size": 2, "threads": 1, "schedule": "none", "early_stopping": 0,
                  "model": {"n_basis": 4, "n_radial": 4, "max_l": 2, "hidden": [16], "latent_dim": 8},
                  "data": {"val_fraction": 0.25}, "error_log": {"skip_epochs": 1}},
        "reference": SW,
        "labelling": {"workers": 1}, "selection": {"per_protocol": 2, "per_round": 2},
        "stop": {"max_rounds": 2, **stop}}, "learn")


def labels_of(run: Path) -> list[tuple]:
    out = []
    for folder in sorted((run / "rounds").iterdir()):
        for atoms in collect_labels(folder / "labels") if (folder / "labels").is_dir() else []:
            out.append((atoms.info["round"], atoms.info["protocol"], atoms.info["step"], atoms.info["source"],
                        np.round(atoms.get_forces(), 6).tobytes()))
    return out


def test_two_rounds_end_to_end(inputs):
    manifest = loop.run_learn(config(inputs, "run", "1.0 over 2"), inputs["root"], progress=False)
    rounds, final = manifest.data["rounds"][:2], manifest.data["rounds"][2]
    assert len(manifest.data["rounds"]) == 3 and manifest.data["stopped"].startswith("max_rounds 2")
    assert set(final["stages"]) == {"train"} and final["stages"]["train"]["labels"] == 4   # no label left unused
    assert manifest.data["final_round"] == 2
    for rnd in rounds:
        assert set(rnd["stages"]) == set(loop.STAGES)
        hot = rnd["stages"]["explore"]["protocols"]["hot"]
        assert hot["status"] == "halted" and hot["halt_step"] is not None
        assert rnd["stages"]["label"]["labelled"] == 2 and not rnd["stages"]["label"]["failed"]
    first, second = (rnd["stages"] for rnd in rounds)
    assert second["train"]["labels"] == 2 and second["train"]["warm_start"]            # round 0's labels
    assert first["train"]["structures"] == 6 and second["train"]["structures"] == 8    # 2 of 8 validate, every round
    assert len(read(inputs["root"] / "run" / "validation.xyz", index=":")) == 2
    assert second["explore"]["protocols"]["hot"]["resumed_from"].endswith(first["explore"]["protocols"]["hot"]["restart"])
    assert second["explore"]["protocols"]["hot"]["start_step"] > 0                    # from before the alarm
    for rnd in rounds:  # predicted (when flagged) vs true (SW) error of each labelled frame, both positive
        assert len(rnd["stages"]["label"]["errors"]) == 2 and np.all(np.array(rnd["stages"]["label"]["errors"]) > 0)
    for name in manifest.data["figures"].values():
        assert (inputs["root"] / "run" / name).stat().st_size > 0
    labels = labels_of(inputs["root"] / "run")
    assert len(labels) == 4 == manifest.labels and {lab[0] for lab in labels} == {0, 1}
    assert all(lab[1] == "hot" and lab[2] >= 0 and "explore/hot/0/frames.xyz" in lab[3] for lab in labels)


def test_replicas_explore_from_the_same_state(inputs):
    """Two replicas per round: replica 1 starts from replica 0's state with fresh velocities (round 1:
    from the restart before the furthest alarm of round 0), both dump candidates, both write their
    trajectories; frames are selected from both."""
    from ase.io import read as read_any

    manifest = loop.run_learn(config(inputs, "replicas", "1.0 over 2", replicas=2), inputs["root"], progress=False)
    run = inputs["root"] / "replicas"
    first, second = (rnd["stages"]["explore"]["protocols"]["hot"] for rnd in manifest.data["rounds"][:2])
    assert [len(p["replicas"]) for p in (first, second)] == [2, 2] and first["status"] == "halted"
    assert second["resumed_from"].endswith(first["restart"])
    assert first["restart"] in [rep["restart"] for rep in first["replicas"]]
    for p in (first, second):
        trajectories = [read_any(run / rep["trajectory"], index=":", format="lammps-dump-text") for rep in p["replicas"]]
        assert np.allclose(trajectories[0][0].positions, trajectories[1][0].positions)      # the same start
        assert not np.allclose(trajectories[0][-1].positions, trajectories[1][-1].positions)  # then apart
        assert set(trajectories[0][0].get_chemical_symbols()) == {"Si"}
    sources = {atoms.info["source"].split("/")[2] for atoms in collect_labels(run / "rounds" / "000" / "labels")}
    assert manifest.labels == 4 and sources <= {"0", "1"}
    # the state both replicas started from (round 1: the restart round 0 already evaluated) is no candidate
    for r, p in enumerate((first, second)):
        steps = {atoms.info["step"] for atoms in collect_labels(run / "rounds" / f"{r:03d}" / "labels")}
        assert p["start_step"] not in steps


def test_a_failing_reference_is_recorded_retried_and_the_loop_goes_on(inputs):
    """The reference raises on one selected frame every time: it is tried 1 + retries times,
    recorded with its error in the manifest and the labels folder, and the loop trains the next
    round on the other frame."""
    from dataclasses import replace

    from ltau_lmp.learn.config import Reference

    log = inputs["root"] / "failing_calls.txt"
    cfg = replace(config(inputs, "failing", "1.0 over 2"), reference=Reference(
        "helpers.learn:FailsOnFirstStep", {"log": str(log), **SW["kwargs"]}))
    manifest = loop.run_learn(cfg, inputs["root"], progress=False)
    first, second = (rnd["stages"] for rnd in manifest.data["rounds"][:2])
    assert first["label"]["labelled"] == 1 and len(first["label"]["failed"]) == 1
    failure = first["label"]["failed"][0]
    assert "SCF did not converge" in failure["error"] and failure["provenance"]["round"] == 0
    record = json.loads((inputs["root"] / "failing" / "rounds" / "000" / "labels" / "labels"
                         / f"{failure['key']}.json").read_text())
    assert record["status"] == "failed" and record["attempts"] == 1 + cfg.labelling.retries
    assert second["train"]["labels"] == 1 and manifest.data["stopped"].startswith("max_rounds 2")


def test_quiet_protocol_ends_the_loop(inputs):
    manifest = loop.run_learn(config(inputs, "quiet", "1e-300"), inputs["root"], progress=False)
    assert len(manifest.data["rounds"]) == 1 and "every protocol completed" in manifest.data["stopped"]
    assert set(manifest.data["rounds"][0]["stages"]) == {"train", "explore"}
    assert loop.run_learn(config(inputs, "quiet", "1e-300"), inputs["root"], progress=False).labels == 0


def test_the_command_line(inputs, capsys):
    """`ltau-lmp learn CONFIG` runs the loop of a YAML file and names the resulting model; a changed
    configuration in the same run folder is refused with the keys that changed."""
    import yaml

    from dataclasses import asdict

    from ltau_lmp.cli import main

    section = asdict(config(inputs, "cli", "1e-300"))
    (inputs["root"] / "learn.yaml").write_text(yaml.safe_dump({"learn": section}))
    assert main(["learn", str(inputs["root"] / "learn.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "every protocol completed" in out and "rounds/000/model/model.pt" in out
    section["stop"]["max_rounds"] = 3
    (inputs["root"] / "learn.yaml").write_text(yaml.safe_dump({"learn": section}))
    assert main(["learn", str(inputs["root"] / "learn.yaml"), "--quiet"]) == 2
    assert "another configuration (changed: stop)" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["_explore", "_label", "_train"])
def test_a_kill_resumes_to_the_same_labels(inputs, stage, monkeypatch):
    """The loop killed in round 1 (at the start of exploration, labelling after one frame, or
    training), then run again: the same labels as an uninterrupted run (test_two_rounds_end_to_end)."""
    reference = labels_of(inputs["root"] / "run")
    cfg = config(inputs, f"killed_{stage}", "1.0 over 2")
    real = getattr(loop, stage)

    def killed(*args, **kwargs):
        r = args[4] if stage != "_label" else args[2]
        if r == 1:
            if stage == "_label":  # label one frame, then die
                from ltau_lmp.learn import label

                monkeypatch.setattr(label, "label_worker", _dies_after_one(label.label_worker))
                return real(*args, **kwargs)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, stage, killed)
    with pytest.raises(KeyboardInterrupt):
        loop.run_learn(cfg, inputs["root"], progress=False)
    monkeypatch.undo()
    manifest = loop.run_learn(cfg, inputs["root"], progress=False)
    assert manifest.data["stopped"].startswith("max_rounds 2")
    assert labels_of(inputs["root"] / f"killed_{stage}") == reference


def _dies_after_one(worker):
    calls = []

    def wrapped(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return worker(*args, **kwargs)
    return wrapped


def test_validation_runs_with_the_reference(inputs):
    """A round's model rerun along every protocol, never halting, a frame every 5 steps, SW labels:
    one true max error and one LTAU expected error per frame."""
    from ltau_lmp.learn.validate import validate_round

    cfg = config(inputs, "run", "1.0 over 2")
    if not (inputs["root"] / "run" / "manifest.json").is_file():
        loop.run_learn(cfg, inputs["root"], progress=False)
    res = validate_round(cfg, inputs["root"], 1, inputs["root"] / "validation", stride=5)["hot"]
    assert res["status"] == "completed" and res["steps"] == [0, 5, 10, 15, 20]
    again = validate_round(cfg, inputs["root"], 1, inputs["root"] / "validation", stride=5)["hot"]  # a rerun
    assert again["steps"] == res["steps"] and np.allclose(again["true_max"], res["true_max"])
    assert len(res["true_max"]) == len(res["expected_max"]) == 5
    assert np.all(np.array(res["true_max"]) > 0) and np.all(np.array(res["expected_max"]) > 0)


def test_random_baseline_and_scratch_training(inputs):
    """The random baseline draws from the loop's own trajectories (each run's first frame, its
    starting state, left out), labels with the reference; a from-scratch model trains on the
    initial frames plus those labels without warm start."""

    from ase.io import read as read_any

    from ltau_lmp.learn.baseline import random_labels, train_from_scratch, trajectory_frames

    cfg = config(inputs, "run", "1.0 over 2")
    run = inputs["root"] / "run"
    if not (run / "manifest.json").is_file():
        loop.run_learn(cfg, inputs["root"], progress=False)
    manifest = json.loads((run / "manifest.json").read_text())
    pool = trajectory_frames(run, manifest)
    dumped = [rep["trajectory"] for rnd in manifest["rounds"][:2]
              for rep in rnd["stages"]["explore"]["protocols"]["hot"]["replicas"]]
    assert len(pool) == sum(len(read_any(run / t, index=":", format="lammps-dump-text")) - 1 for t in dumped) > 3
    assert all(atoms.info["step"] > 0 or atoms.info["round"] > 0 for atoms in pool)
    drawn = random_labels(cfg, run, manifest, 3, seed=0, progress=False)
    assert len(drawn) == 3 and {a.info["source"] for a in drawn} <= {a.info["source"] for a in pool}
    assert all(abs(a.get_forces()).max() > 0 for a in drawn)
    assert len(loop.labels_before(run, manifest["final_round"])) == manifest["rounds"][-1]["stages"]["train"]["labels"]
    model = train_from_scratch(cfg, inputs["root"], run, "random_scratch", drawn, epochs=2)
    assert model.epochs == 2 and model.model.is_file() and (model.estimator / "meta.json").is_file()
    assert len(read_any(run / "baselines" / "random_scratch" / "train.xyz", index=":")) == 6 + 3


def test_sigterm_stops_the_loop_and_its_lammps(inputs):
    """A batch system's SIGTERM to `ltau-lmp learn` ends it like Ctrl-C (exit 130) and stops the
    LAMMPS run it started; nothing keeps running in the run folder."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    import yaml

    from ltau_lmp.learn.validate import NEVER

    section = asdict(config(inputs, "sigterm", NEVER))
    section["protocols"][0]["steps"] = 10_000_000
    (inputs["root"] / "long.yaml").write_text(yaml.safe_dump({"learn": section}))
    run = inputs["root"] / "sigterm"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ltau-lmp"), "learn", "long.yaml", "--quiet"],
                            cwd=inputs["root"], env=env, stderr=subprocess.PIPE)

    def in_run():  # processes whose working folder is inside the run folder
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/cwd").startswith(str(run)):
                    found.append(int(pid))
            except OSError:
                continue
        return found

    deadline = time.time() + 120
    while not list(run.glob("rounds/000/explore/hot/.0.*/log.lammps")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    assert in_run(), "LAMMPS did not start"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130 and b"interrupted" in proc.stderr.read()
    time.sleep(1)
    assert not in_run()
