"""The labelling stage of the learning loop (ltau_lmp.learn.label) and the reference as an ASE calculator."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import all_changes

from ltau_lmp.data.reference import LAMMPSCalculator, ReferenceCalculator, make_calculator, reference_calculation
from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.learn.label import (
    LABELS_DIR,
    collect_labels,
    dask_executor,
    frame_key,
    label_frames,
    read_records,
)

HERE = Path(__file__).resolve().parent
SW = {"potential": "Si.sw", "pair_style": "sw", "elements": ["Si"]}


class MisbehavingSW(LAMMPSCalculator):
    """Stillinger-Weber that misbehaves on chosen frames (by ``atoms.info["step"]``), importable by path.

    Every calculation appends the frame's step to ``log``. ``fail_step``: always raises there;
    ``flaky_step``: its first ``flaky_times`` calculations raise; ``crash_step``: the worker process
    dies there (os._exit); ``sleep``: seconds each calculation takes at least; environment variable LTAU_TEST_KILL_STEP: this process is killed (SIGKILL)
    there, as by a scheduler or Ctrl-\\.
    """

    def __init__(self, log, fail_step=None, flaky_step=None, flaky_times=0, crash_step=None, sleep=0.0, **kwargs):
        super().__init__(**kwargs)
        self.log, self.fail_step, self.crash_step, self.sleep = Path(log), fail_step, crash_step, sleep
        self.flaky_step, self.flaky_times = flaky_step, flaky_times

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        step = atoms.info.get("step")
        with open(self.log, "a") as fh:
            fh.write(f"{step}\n")
        if str(step) == os.environ.get("LTAU_TEST_KILL_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.crash_step:
            os._exit(3)
        time.sleep(self.sleep)
        if step == self.fail_step:
            raise RuntimeError(f"SCF did not converge at step {step}")
        if step == self.flaky_step and calls(self.log).count(step) <= self.flaky_times:
            raise OSError(f"node lost at step {step}")
        super().calculate(atoms, properties, system_changes)


def calls(log):
    path = Path(log)
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def sw_spec(log, **kwargs):
    return {"calculator": f"{__name__}:MisbehavingSW", "kwargs": {"log": str(log), **SW, **kwargs}}


def si_frames(n=6, seed=0):
    """Strained, rattled 8-atom silicon cells with the loop's provenance (round, protocol, step, source)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = bulk("Si", "diamond", a=5.431, cubic=True)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.03 * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
        atoms.info.update(round=1, protocol="nvt_1200K" if i % 2 else "ramp", step=100 * i,
                          source=f"round_001/explore/{'nvt_1200K' if i % 2 else 'ramp'}/dump.xyz",
                          max_expected=0.1 * i)
        frames.append(atoms)
    return frames


def assert_same_labels(a, b, atol=1e-7):
    assert [x.info["label_key"] for x in a] == [y.info["label_key"] for y in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.positions, y.positions, atol=atol)
        assert x.get_potential_energy() == pytest.approx(y.get_potential_energy(), abs=atol)
        np.testing.assert_allclose(x.get_forces(), y.get_forces(), atol=atol)
        np.testing.assert_allclose(x.get_stress(), y.get_stress(), atol=atol)
        assert {k: x.info[k] for k in ("round", "protocol", "step", "source")} == \
            {k: y.info[k] for k in ("round", "protocol", "step", "source")}


def test_labels_equal_direct_reference_calculation(tmp_path):
    frames = si_frames()
    # what a dump of the explored run may carry: a model's predictions (never taken as labels), a mapping
    frames[0].info.update(energy=-1.0, meta={"model": "round_000"})
    frames[0].arrays["forces"] = np.ones((8, 3))
    spec = {"calculator": "ltau_lmp.data.reference:LAMMPSCalculator", "kwargs": SW}
    report = label_frames(frames, spec, tmp_path, max_workers=2, progress=False)  # spawned process pool
    assert report.ok and report.labelled and sorted(report.labelled) == sorted(report.keys)
    assert report.keys == [frame_key(a) for a in frames] and len(set(report.keys)) == len(frames)

    labelled = collect_labels(tmp_path, report.keys)
    truth = reference_calculation(frames)
    for atoms, got, (energy, forces, stress) in zip(frames, labelled, truth):
        np.testing.assert_allclose(got.positions, atoms.positions, atol=1e-8)
        assert got.get_potential_energy() == pytest.approx(energy, abs=1e-7)
        np.testing.assert_allclose(got.get_forces(), forces, atol=1e-7)
        np.testing.assert_allclose(got.get_stress(), stress, atol=1e-7)
        for key in ("round", "protocol", "step", "source"):
            assert got.info[key] == atoms.info[key]
        assert got.info["max_expected"] == pytest.approx(atoms.info["max_expected"])
        assert abs(forces).max() > 0.1  # the frames are far from equilibrium: the comparison means something

    # without keys: every label, ordered by provenance (round, protocol, step)
    ordered = collect_labels(tmp_path)
    assert [(a.info["protocol"], a.info["step"]) for a in ordered] == sorted(
        (a.info["protocol"], a.info["step"]) for a in frames)
    record = json.loads((tmp_path / LABELS_DIR / f"{report.keys[0]}.json").read_text())
    assert record["status"] == "labelled" and record["attempts"] == 1 and record["errors"] == []
    assert record["provenance"] == {"round": 1, "protocol": "ramp", "step": 0,
                                    "source": "round_001/explore/ramp/dump.xyz"}
    assert record["reference"] == ReferenceCalculator.from_config(spec).to_dict() and record["seconds"] > 0
    assert record["info_dropped"] == ["meta"] and "meta" not in labelled[0].info
    assert os.getpid() not in {r["pid"] for r in read_records(tmp_path).values()}  # labelled in worker processes

    # the calculator itself, through ASE, gives the same truth; no stress without 3D periodicity
    atoms = frames[1].copy()
    atoms.calc = LAMMPSCalculator(**SW)
    assert atoms.get_potential_energy() == pytest.approx(truth[1][0], abs=1e-10)
    np.testing.assert_allclose(atoms.get_stress(), truth[1][2], atol=1e-12)
    atoms.pbc = (True, True, False)
    atoms.get_potential_energy()
    assert "stress" not in atoms.calc.results


def test_failing_frame_is_recorded_retried_and_the_others_go_on(tmp_path):
    frames = si_frames()
    log = tmp_path / "calls.txt"
    spec = sw_spec(log, fail_step=200, flaky_step=300, flaky_times=1)
    report = label_frames(frames, spec, tmp_path / "out", retries=2, max_workers=1, progress=False)

    steps = calls(log)
    assert steps.count(200) == 3  # the first attempt and `retries` more
    assert steps.count(300) == 2  # a transient failure, then labelled
    assert all(steps.count(s) == 1 for s in (0, 100, 400, 500))
    assert [f.provenance["step"] for f in report.failed] == [200] and not report.ok
    failure = report.failed[0]
    assert failure.attempts == 3 and failure.new
    assert "RuntimeError: SCF did not converge at step 200" in failure.error
    assert "calculate" in failure.traceback and "RuntimeError" in failure.traceback
    assert len(report.labelled) == 5 and report.attempts == 6 + 2 + 1

    records = read_records(tmp_path / "out")
    bad = records[failure.key]
    assert bad["status"] == "failed" and bad["attempts"] == 3 and len(bad["errors"]) == 3
    assert [e["attempt"] for e in bad["errors"]] == [1, 2, 3]
    flaky = records[frame_key(frames[3])]
    assert flaky["status"] == "labelled" and flaky["attempts"] == 2
    assert "OSError: node lost at step 300" in flaky["errors"][0]["error"]
    # the failed frame itself is kept (not lost), without labels; it is not among the labelled frames
    from ase.io import read
    kept = read(tmp_path / "out" / LABELS_DIR / f"{failure.key}.extxyz")
    np.testing.assert_allclose(kept.positions, frames[2].positions, atol=1e-8)
    assert kept.calc is None and kept.info["step"] == 200
    assert sorted(a.info["step"] for a in collect_labels(tmp_path / "out")) == [0, 100, 300, 400, 500]
    assert [a.info["step"] for a in collect_labels(tmp_path / "out", report.keys)] == [0, 100, 300, 400, 500]

    # a rerun keeps the failure on record without trying again, unless asked to
    again = label_frames(frames, spec, tmp_path / "out", retries=2, max_workers=1, progress=False)
    assert again.attempts == 0 and len(again.reused) == 5 and [f.new for f in again.failed] == [False]
    assert calls(log) == steps
    retried = label_frames(frames, spec, tmp_path / "out", retries=0, max_workers=1,
                           progress=False, retry_failed=True)
    assert calls(log) == steps + [200] and retried.attempts == 1 and retried.failed[0].attempts == 1


def test_rerun_labels_nothing_new(tmp_path):
    frames = si_frames(4)
    log = tmp_path / "calls.txt"
    first = label_frames(frames, sw_spec(log), tmp_path / "out", max_workers=1, progress=False)
    labels = tmp_path / "out" / LABELS_DIR
    stamps = {p.name: p.stat().st_mtime_ns for p in labels.iterdir()}
    second = label_frames(frames + frames[:2], sw_spec(log), tmp_path / "out", max_workers=1, progress=False)
    assert len(first.labelled) == 4 and second.labelled == [] and second.attempts == 0
    assert sorted(second.reused) == sorted(first.keys) and second.keys == first.keys + first.keys[:2]
    assert calls(log) == [0, 100, 200, 300]
    assert {p.name: p.stat().st_mtime_ns for p in labels.iterdir()} == stamps
    assert_same_labels(collect_labels(tmp_path / "out", first.keys), collect_labels(tmp_path / "out", second.keys))
    # a record whose frame file was deleted is labelled again, and only that one
    (labels / f"{first.keys[1]}.extxyz").unlink()
    redo = label_frames(frames, sw_spec(log), tmp_path / "out", max_workers=1, progress=False)
    assert redo.labelled == [first.keys[1]] and calls(log) == [0, 100, 200, 300, 100]
    # a frame with other provenance is another label, even at the same positions
    moved = frames[0].copy()
    moved.info["round"] = 2
    third = label_frames([moved], sw_spec(log), tmp_path / "out", max_workers=1, progress=False)
    assert third.labelled == [frame_key(moved)] != [first.keys[0]] and calls(log)[-1] == 0
    # one writer at a time
    import fcntl
    with open(tmp_path / "out" / ".label.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LTAUError, match="another label_frames call is writing here"):
            label_frames(frames, sw_spec(log), tmp_path / "out", max_workers=1, progress=False)
    # another reference in the same folder is refused
    with pytest.raises(ConfigError, match="one folder holds labels of one reference"):
        label_frames(frames, {"calculator": "ltau_lmp.data.reference:LAMMPSCalculator", "kwargs": SW},
                     tmp_path / "out", max_workers=1, progress=False)


def test_rerun_after_a_kill_labels_only_the_missing_frames(tmp_path):
    frames = si_frames()
    whole = label_frames(frames, sw_spec(tmp_path / "whole.txt"), tmp_path / "whole", max_workers=1,
                         progress=False)

    # a labelling process killed (SIGKILL) during its fourth calculation
    log, out = tmp_path / "calls.txt", tmp_path / "out"
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
              f"from {__name__} import si_frames, sw_spec\n"
              "from ltau_lmp.learn.label import label_frames\n"
              f"label_frames(si_frames(), sw_spec({str(log)!r}), {str(out)!r}, max_workers=1, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LTAU_TEST_KILL_STEP": "300"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert calls(log) == [0, 100, 200, 300]
    labels = out / LABELS_DIR
    assert sorted(read_records(out)) == sorted(whole.keys[:3])
    # what a kill between the frame file and its record, and in the middle of a write, leaves behind
    missing = whole.keys[4]
    (labels / f"{missing}.extxyz").write_text("8\ntorn")
    (labels / f".{whole.keys[5]}.json.x1y2z3.json").write_text('{"format": "ltau-la')

    rerun = label_frames(frames, sw_spec(log), out, max_workers=1, progress=False)
    assert calls(log) == [0, 100, 200, 300, 300, 400, 500]
    assert sorted(rerun.labelled) == sorted(whole.keys[3:]) and sorted(rerun.reused) == sorted(whole.keys[:3])
    assert not [p for p in labels.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in labels.iterdir()) == sorted(f"{k}.{x}" for k in whole.keys for x in ("json", "extxyz"))
    assert_same_labels(collect_labels(out), collect_labels(tmp_path / "whole"), atol=0)
    assert_same_labels(collect_labels(out, rerun.keys), collect_labels(tmp_path / "whole", whole.keys), atol=0)


def test_a_worker_that_dies_fails_its_frame_only(tmp_path):
    frames = si_frames(4)
    log = tmp_path / "calls.txt"
    # frames take 0.3 s, so others are in flight whenever the pool breaks: they must not be charged
    report = label_frames(frames, sw_spec(log, crash_step=100, sleep=0.3), tmp_path / "out", retries=1,
                          max_workers=2, progress=False)
    assert [f.provenance["step"] for f in report.failed] == [100]
    assert "BrokenProcessPool" in report.failed[0].error and report.failed[0].attempts == 2
    assert sorted(a.info["step"] for a in collect_labels(tmp_path / "out")) == [0, 200, 300]
    assert 2 <= calls(log).count(100) <= 3  # charged only when it ran alone


def test_dask_executor_labels_like_the_local_one(tmp_path):
    pytest.importorskip("distributed")
    frames = si_frames(4)
    local = label_frames(frames, sw_spec(tmp_path / "calls.txt"), tmp_path / "local", max_workers=1,
                         progress=False)
    with dask_executor(n_workers=1, processes=False) as executor:
        remote = label_frames(frames, sw_spec(tmp_path / "calls.txt"), tmp_path / "dask", executor=executor,
                              progress=False)
        assert executor.submit(sum, [1, 2]).result() == 3  # label_frames leaves a caller's executor open
    assert remote.ok and sorted(remote.labelled) == sorted(local.labelled)
    assert_same_labels(collect_labels(tmp_path / "dask", remote.keys), collect_labels(tmp_path / "local", local.keys),
                       atol=0)
    assert sorted(calls(tmp_path / "calls.txt")) == sorted(2 * [0, 100, 200, 300])


def test_bad_reference_paths_and_arguments_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"'no_such_module:Calc'.*cannot import module 'no_such_module'"):
        make_calculator({"calculator": "no_such_module:Calc"})
    with pytest.raises(ConfigError, match=r"'ltau_lmp.data.reference.NoSuch'.*no attribute 'NoSuch'"):
        make_calculator("ltau_lmp.data.reference.NoSuch")
    with pytest.raises(ConfigError, match=r"'ltau_lmp.data.reference:LAMMPSCalculator'.*NoSuch.sw.*not found"):
        make_calculator({"calculator": "ltau_lmp.data.reference:LAMMPSCalculator", "kwargs": {"potential": "NoSuch.sw"}})
    with pytest.raises(ConfigError, match=r"LAMMPSCalculator' with kwargs .*TypeError.*temperature"):
        make_calculator({"calculator": "ltau_lmp.data.reference:LAMMPSCalculator", "kwargs": {"temperature": 300}})
    with pytest.raises(ConfigError, match=r"'numpy:pi'.*not callable"):
        make_calculator("numpy:pi")
    with pytest.raises(ConfigError, match=r"unknown keys \['kwarg'\]"):
        make_calculator({"calculator": "ltau_lmp.data.reference:LAMMPSCalculator", "kwarg": {}})
    # label_frames stops before any work, naming the path
    with pytest.raises(ConfigError, match="no_such_module"):
        label_frames(si_frames(2), {"calculator": "no_such_module:Calc"}, tmp_path, max_workers=1, progress=False)
    assert not list((tmp_path / LABELS_DIR).iterdir())
    # the good path builds the calculator; the dask executor without dask names the extra to install
    assert isinstance(make_calculator({"calculator": "ltau_lmp.data.reference:LAMMPSCalculator", "kwargs": SW}),
                      LAMMPSCalculator)
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ConfigError, match=r'pip install "ltau_lmp\[dask\]"'):
        dask_executor()
