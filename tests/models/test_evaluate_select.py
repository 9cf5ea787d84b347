"""Smoke tests of `ltau-lmp evaluate` and `ltau-lmp select` on tiny real data."""

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from ltau_lmp.cli import main
from ltau_lmp.data.reference import reference_calculation
from ltau_lmp.estimator import ErrorLog, LTAUEstimator
from ltau_lmp.evaluation.select import select_frames
from ltau_lmp.lammps.events import FrameDump
from ltau_lmp.model import LocalForceField, save_model


def _labelled(n_frames, rattle, seed):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        energy, forces, stress = reference_calculation(atoms)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A random model, an estimator over its latent features of 'training' atoms (calibrated on
    held-out ones; est_uncalibrated without them), and sets."""
    from ltau_lmp.evaluation.evaluate import predict_frames

    tmp = tmp_path_factory.mktemp("eval")
    model = LocalForceField(["Si"], cutoff=4.0, seed=0)
    save_model(model, tmp / "model.pt")
    train = _labelled(6, 0.05, 0)
    _, errors, latent = predict_frames(model, train, [atoms.get_forces() for atoms in train])
    log = ErrorLog.log_spaced(len(errors), 1e-3, 100.0, 40)
    rng = np.random.default_rng(1)
    for _ in range(5):
        log.update(np.arange(len(errors)), errors * rng.lognormal(0, 0.3, len(errors)))
        log.end_epoch()
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": model.model_hash}).save(tmp / "est_uncalibrated")
    held_out = predict_frames(model, _labelled(6, 0.05, 4))[2]
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": model.model_hash}, reference_descriptors=held_out,
                        false_alarm_rate=0.05).save(tmp / "est")
    write(tmp / "test.xyz", _labelled(3, 0.05, 2))
    write(tmp / "hot.xyz", _labelled(3, 0.4, 3))
    return tmp, model


def test_evaluate_writes_metrics_and_figures(pipeline, capsys):
    tmp, _ = pipeline
    assert main(["evaluate", "--model", str(tmp / "model.pt"), "--estimator", str(tmp / "est"),
                 "--set", f"test={tmp / 'test.xyz'}", "--set", f"hot={tmp / 'hot.xyz'}",
                 "-o", str(tmp / "out")]) == 0
    report = json.loads((tmp / "out" / "metrics.json").read_text())
    assert set(report["sets"]) == {"test", "hot"}
    hot = report["sets"]["hot"]
    assert hot["n_atoms"] == 24 and 0.0 <= hot["auroc_distance"] <= 1.0
    assert hot["auroc_distance"] > 0.9  # strongly rattled atoms lie far from the training atoms
    # -p ranks like the distance; only atoms beyond every reference atom tie (at 1/(n+1))
    assert hot["auroc_ood"] > 0.9 and hot["auroc_ood"] <= hot["auroc_distance"]
    assert report["alarm_thresholds"]["false_alarm_rate"] == 0.05
    assert hot["alarm_rate_ood"] > 0.5 and report["sets"]["test"]["alarm_rate_ood"] < 0.25
    assert "auroc_ood" not in report["sets"]["test"]
    for png in report["figures"].values():
        assert (tmp / "out" / png.split("/")[-1]).stat().st_size > 5000
    assert "| hot |" in (tmp / "out" / "table.md").read_text()

    assert main(["evaluate", "--model", str(tmp / "model.pt"), "--estimator", str(tmp / "est_uncalibrated"),
                 "--set", f"test={tmp / 'test.xyz'}", "--set", f"hot={tmp / 'hot.xyz'}",
                 "-o", str(tmp / "out_uncalibrated")]) == 0
    report = json.loads((tmp / "out_uncalibrated" / "metrics.json").read_text())
    assert "auroc_ood" not in report["sets"]["hot"] and report["alarm_thresholds"] is None


def test_evaluate_errors_are_one_line(pipeline, capsys):
    tmp, _ = pipeline
    assert main(["evaluate", "--model", str(tmp / "model.pt"), "--estimator", str(tmp / "est"),
                 "--set", "oops", "-o", str(tmp / "o")]) == 2
    assert "--set expects NAME=FILE" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp / "model.pt"), "--estimator", str(tmp / "est"),
                 "--set", f"a={tmp / 'test.xyz'}", "-o", str(tmp / "o")]) == 2
    assert "in-domain set 'test' is not among" in capsys.readouterr().err


def test_select_prefers_uncertain_and_diverse_frames():
    scores = np.array([0.9, 0.89, 0.88, 0.1, 0.5])
    prints = np.array([[0.0], [0.01], [5.0], [9.0], [2.0]])
    asked = []

    def fingerprints_of(pool):
        asked.append(sorted(pool.tolist()))
        return prints[pool]

    assert select_frames(scores, fingerprints_of, 2, pool_factor=2) == [0, 2]   # 1 is a near-copy of 0
    assert select_frames(scores, fingerprints_of, 3, pool_factor=1) == [0, 2, 1]
    assert asked == [[0, 1, 2, 4], [0, 1, 2]]   # only the candidate pool is fingerprinted


def test_select_cli_on_dumped_frames(pipeline, tmp_path, capsys):
    tmp, model = pipeline
    dump = FrameDump(tmp_path / "dump.xyz")
    for step, atoms in enumerate(_labelled(4, 0.1, 5)):
        atoms.calc = None
        atoms.arrays["ltau_expected"] = np.full(len(atoms), 0.1 * (step + 1))
        atoms.info["timestep"] = step * 10
        dump.write(atoms, step * 10)
    out = tmp_path / "selected.xyz"
    assert main(["select", str(tmp_path / "dump.xyz"), "--model", str(tmp / "model.pt"), "-n", "2",
                 "-o", str(out)]) == 0
    picked = read(out, ":")
    assert len(picked) == 2 and picked[0].info["timestep"] == 30
    assert main(["select", str(tmp / "test.xyz"), "--model", str(tmp / "model.pt"), "-o", str(out),
                 "--overwrite"]) == 2
    assert "no per-atom ltau_expected" in capsys.readouterr().err


def _dump(path, n_frames):
    dump = FrameDump(path)
    for step, atoms in enumerate(_labelled(n_frames, 0.1, 5)):
        atoms.calc = None
        atoms.arrays["ltau_expected"] = np.full(len(atoms), 0.1 * (step + 1))
        dump.write(atoms, step * 10)
    return path


def test_select_says_when_the_dumps_hold_fewer_frames_than_asked(pipeline, tmp_path, capsys):
    tmp, _ = pipeline
    dump = _dump(tmp_path / "dump.xyz", 2)
    assert main(["select", str(dump), "--model", str(tmp / "model.pt"), "-n", "10", "-o", str(tmp_path / "s.xyz")]) == 0
    captured = capsys.readouterr()
    assert "the dumps hold only 2 frames, fewer than the 10 requested" in captured.err
    assert captured.out.startswith(f"wrote 2 of the 10 requested frames to {tmp_path / 's.xyz'}")
    assert len(read(tmp_path / "s.xyz", ":")) == 2
    assert main(["select", str(dump), "--model", str(tmp / "model.pt"), "-n", "1", "-o", str(tmp_path / "one.xyz")]) == 0
    assert capsys.readouterr().out.startswith("wrote 1 frame to")


def test_select_never_replaces_a_users_file(pipeline, tmp_path, capsys):
    tmp, _ = pipeline
    dump = _dump(tmp_path / "dump.xyz", 3)
    mine = tmp_path / "mine.xyz"
    mine.write_text("my own structures\n")
    select = ["select", str(dump), "--model", str(tmp / "model.pt"), "-n", "2"]
    for extra in ([], ["--overwrite"]):
        assert main([*select, "-o", str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{mine}: the file exists and is not an earlier" in err
        assert mine.read_text() == "my own structures\n"
    assert main([*select, "-o", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder" in capsys.readouterr().err
    out = tmp_path / "picked.xyz"
    assert main([*select, "-o", str(out)]) == 0
    assert main([*select, "-o", str(out)]) == 2
    assert "holds an earlier `ltau-lmp select` output; give --overwrite" in capsys.readouterr().err
    assert main([*select, "-n", "1", "-o", str(out), "--overwrite"]) == 0
    assert len(read(out, ":")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.xyz", "mine.xyz", "picked.xyz"]


def test_evaluate_output_safety(pipeline, tmp_path, capsys):
    tmp, _ = pipeline
    evaluate = ["evaluate", "--model", str(tmp / "model.pt"), "--estimator", str(tmp / "est"),
                "--set", f"test={tmp / 'test.xyz'}"]
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([*evaluate, "-o", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mine}: the folder exists and was not written by ltau_lmp" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "eval"
    assert main([*evaluate, "-o", str(out)]) == 0
    first = (out / "metrics.json").read_text()
    assert json.loads(first)["figures"]["calibration"] == str(out / "calibration.png")
    assert main([*evaluate, "-o", str(out)]) == 2
    assert "give --overwrite" in capsys.readouterr().err
    assert main([*evaluate, "-o", str(out), "--overwrite", "--tol", "0.2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["tol"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "results"]   # no temporary siblings left


def test_evaluate_data_dir_must_exist(pipeline, capsys):
    tmp, _ = pipeline
    assert main(["evaluate", "--model", str(tmp / "model.pt"), "--estimator", str(tmp / "est"),
                 "--data-dir", str(tmp / "no_such_data"), "-o", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp / 'no_such_data'}: no such data folder" in err


def test_evaluation_does_not_import_the_trainer():
    import subprocess
    import sys

    code = ("import sys, ltau_lmp.evaluation.evaluate, ltau_lmp.evaluation.select, ltau_lmp.evaluation.ensemble, "
            "ltau_lmp.prediction; print([m for m in sys.modules if m.startswith('ltau_lmp.training')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_select_never_picks_a_frame_twice():
    """Identical frames (replicas dumping the state they all started from) are one candidate: the
    selection stops short of n rather than repeat it."""
    scores = np.array([0.9, 0.8, 0.7, 0.5])
    prints = np.array([[1.0], [1.0], [1.0], [1.0]])
    assert select_frames(scores, lambda pool: prints[pool], 4, pool_factor=1) == [0]
    prints[3] = 2.0
    assert select_frames(scores, lambda pool: prints[pool], 4, pool_factor=1) == [0, 3]
