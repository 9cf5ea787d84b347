"""fix ltau inside LAMMPS: per-atom values, MPI agreement, halt, dump, log, restart, bad input.

A small random model and an estimator built from its own latent features of rattled Si cells
(training errors that differ between atoms) stand in for a trained one. One in-process
1-rank run is the reference: its log gives the step at which the uncertainty first crosses a
threshold, so the halt and dump tests know in advance where events must fire. The ``mpi``
tests launch ``mpirun -np 2`` with a timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read

from helpers.mpi_run import BIN, ENV, mpirun, per_rank
from helpers.paths import INPUTS

from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.calibration import thresholds_for
from ltau_lmp.estimator.errorlog import ErrorLog
from ltau_lmp.lammps.events import FrameDump
from ltau_lmp.model import LocalForceField, save_model

EVERY, STEPS = 5, 60

# 64 rattled Si atoms at 1500 K under the random model: the uncertainty drifts upwards.
# displace_atoms random and velocity create (loop all) do not depend on the number of ranks.
BASE = """\
units           metal
atom_style      atomic
boundary        p p p
lattice         diamond 5.431
region          box block 0 2 0 2 0 2
create_box      1 box
create_atoms    1 box
mass            1 28.0855
displace_atoms  all random 0.05 0.05 0.05 1234
pair_style      ltau
pair_coeff      * * {model} Si
velocity        all create 1500 4928459 mom yes rot yes dist gaussian
timestep        0.001
fix             md all nve
"""


# --------------------------------------------------------------------------------------------
# fixtures: model, estimators (good, corrupt, other model), the 1-rank reference run
# --------------------------------------------------------------------------------------------

def _latent(model, n_cells: int, seed: int) -> np.ndarray:
    calc = LTAUCalculator(model)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_cells):
        atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = calc
        atoms.get_potential_energy()
        out.append(np.array(calc.results["latent"], dtype=np.float32))
    return np.concatenate(out)


def _estimator(model, path: Path, seed: int = 0, held_out: bool = False) -> Path:
    """Estimator from the model's features; every entry has its own error scale. ``held_out``:
    with the OOD reference distribution of eight more rattled cells (512 atoms: enough for a tail
    fit) and alarm thresholds at a rate of 0.5 per evaluation (auto halts within a short test)."""
    latent = _latent(model, 4, seed)
    rng = np.random.default_rng(seed)
    log = ErrorLog.log_spaced(len(latent), lo=1e-3, hi=10.0, nbins=50)
    scale = np.exp(rng.normal(-3.0, 0.7, len(latent)))
    for _ in range(5):
        log.update(np.arange(len(latent)), scale * rng.lognormal(0.0, 0.3, len(latent)))
        log.end_epoch()
    reference = _latent(model, 8, seed + 100) if held_out else None
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": model.model_hash},
                        reference_descriptors=reference, false_alarm_rate=0.5).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fix")
    model = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=16, seed=0)
    save_model(model, root / "model.pt")
    est = _estimator(model, root / "est")
    corrupt = root / "est_corrupt"
    shutil.copytree(est, corrupt)
    pdfs = corrupt / "pdfs.npy"
    pdfs.write_bytes(pdfs.read_bytes()[: pdfs.stat().st_size // 2])
    wide = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=32, seed=1)
    other = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=16, seed=1)
    return {"root": root, "model": model, "model_file": str(root / "model.pt"), "est": str(est),
            "est_corrupt": str(corrupt), "est_dim32": str(_estimator(wide, root / "est_dim32")),
            "est_other": str(_estimator(other, root / "est_other")),
            "est_ood": str(_estimator(model, root / "est_ood", held_out=True))}


def _read_log(path: Path) -> np.ndarray:
    """The rows of a fix ltau log, after checking its header (the fix, then the column names)."""
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("# fix ltau "), lines[0]
    assert "# step worst mean quantile n_over_dump n_over_halt max_distance worst_tag" in lines
    rows = [line for line in lines if not line.startswith("#")]
    return np.array([[float(v) for v in line.split()] for line in rows]).reshape(-1, 8)


def _read_custom(path: Path) -> tuple[int, np.ndarray]:
    """(timestep, rows sorted by id) of one `dump custom` snapshot."""
    lines = Path(path).read_text().splitlines()
    step = int(lines[lines.index("ITEM: TIMESTEP") + 1])
    start = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    rows = np.loadtxt(lines[start:], ndmin=2)
    return step, rows[np.argsort(rows[:, 0])]


def _custom_dumps(directory: Path, prefix: str) -> dict[int, np.ndarray]:
    return dict(_read_custom(p) for p in directory.glob(prefix + ".*") if p.suffix[1:].isdigit())


REF_SCRIPT = BASE + """\
fix             u all ltau {est} every {every} metric distance log {dir}/ref.log
dump            d all custom {every} {dir}/ref.* id f_u[1] f_u[2] f_u[3] f_u[4]
dump_modify     d format float %.17g
run             {steps}
"""


@pytest.fixture(scope="module")
def reference(files):
    """In-process run on one rank; returns its log, per-atom dumps and final state."""
    from lammps import LMP_STYLE_ATOM, LMP_TYPE_ARRAY

    from ltau_lmp.lammps.driver import create_lammps

    out = files["root"] / "ref"
    out.mkdir()
    lmp = create_lammps(log="none", screen=False)
    try:
        lmp.commands_string(REF_SCRIPT.format(model=files["model_file"], est=files["est"], dir=out,
                                              every=EVERY, steps=STEPS))
        n = lmp.extract_global("nlocal")
        tags = lmp.numpy.extract_atom("id")[:n]
        order = np.argsort(tags)
        boxlo, boxhi, xy, yz, xz, periodic, _ = lmp.extract_box()
        final = {
            "step": lmp.extract_global("ntimestep"),
            "tags": tags[order].copy(),
            "x": lmp.numpy.extract_atom("x")[:n][order].copy(),
            "peratom": lmp.numpy.extract_fix("u", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:n][order].copy(),
            "cell": np.array([[boxhi[0] - boxlo[0], 0, 0], [xy, boxhi[1] - boxlo[1], 0],
                              [xz, yz, boxhi[2] - boxlo[2]]]),
            "origin": np.array(boxlo),
            "scalar": lmp.extract_fix("u", 0, 0),
        }
    finally:
        lmp.close()
    log = _read_log(out / "ref.log")
    # The halt step: a new record of the max, >= 5 % above every earlier evaluation, in the
    # second half of the run; the threshold sits halfway, far from both (ranks and reruns
    # differ only in the last bits of the trajectory).
    best = None
    for i in range(len(log) // 2, len(log)):
        before = log[:i, 1].max()
        if log[i, 1] > 1.05 * before:
            best = i
            break
    assert best is not None, f"uncertainty never jumps in the reference run:\n{log}"
    return {"dir": out, "log": log, "final": final, "dumps": _custom_dumps(out, "ref"),
            "halt_step": int(log[best, 0]), "halt_value": log[best, 1], "halt_tag": int(log[best, 7]),
            "halt": 0.5 * (log[best, 1] + log[:best, 1].max())}


def _run_script(tmp_path: Path, script: str, launcher: str = "ltau-lmp", np_: int = 2,
                timeout: float = 90) -> subprocess.CompletedProcess:
    (tmp_path / "in.test").write_text(script)
    args = ["ltau-lmp", "run", "in.test", "-log", "none"] if launcher == "ltau-lmp" else \
        ["lmp", "-in", "in.test", "-log", "none"]
    return mpirun(args, tmp_path, np_, timeout)


# --------------------------------------------------------------------------------------------
# values: fix ltau == LTAUEstimator.query; never silently zero; 1 rank == 2 ranks
# --------------------------------------------------------------------------------------------

def test_peratom_equals_estimator_query(files, reference):
    final = reference["final"]
    assert final["step"] == STEPS
    atoms = Atoms("Si" * len(final["tags"]), positions=final["x"] - final["origin"], cell=final["cell"], pbc=True)
    atoms.calc = LTAUCalculator(files["model"])
    atoms.get_potential_energy()
    est = LTAUEstimator.load(files["est"])
    res = est.query(atoms.calc.results["latent"])
    want = np.column_stack([res.expected, res.interval(0.05, 0.95), res.distance])
    got = final["peratom"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the same numbers reach the per-atom dump and the global scalar (metric distance)
    np.testing.assert_allclose(reference["dumps"][STEPS][:, 1:], got, rtol=1e-12)
    assert final["scalar"] == pytest.approx(got[:, 3].max())


def test_ci_no_skips_only_the_interval_columns(files, reference, tmp_path):
    """`ci no`: the lean evaluation leaves f_u[2], f_u[3] at 0 and every other value unchanged."""
    from ltau_lmp.lammps.driver import create_lammps

    lean = REF_SCRIPT.replace("metric distance", "metric distance ci no")
    lmp = create_lammps(log="none", screen=False)
    try:
        lmp.commands_string(lean.format(model=files["model_file"], est=files["est"], dir=tmp_path, every=EVERY,
                                        steps=STEPS))
    finally:
        lmp.close()
    full, cut = reference["dumps"], _custom_dumps(tmp_path, "ref")
    assert sorted(cut) == sorted(full)
    for step, rows in cut.items():
        np.testing.assert_array_equal(rows[:, [0, 1, 4]], full[step][:, [0, 1, 4]])
        assert np.all(rows[:, 2:4] == 0.0) and np.all(full[step][:, 3] > 0)
    np.testing.assert_array_equal(_read_log(tmp_path / "ref.log"), reference["log"])


def test_uncertainty_is_never_silently_zero(reference):
    """Regression guard: a known failure mode of similar tools is an all-zero uncertainty."""
    for step, rows in reference["dumps"].items():
        expected, lo, hi, dist = rows[:, 1:].T
        assert np.all(expected > 0) and np.ptp(expected) > 0, step
        assert np.all(hi > lo) and np.all(lo >= 0), step
        assert np.all(dist > 0) and np.ptp(dist) > 0, step
    log = reference["log"]
    np.testing.assert_array_equal(log[:, 0], np.arange(0, STEPS + 1, EVERY))
    assert sorted(reference["dumps"]) == list(range(0, STEPS + 1, EVERY))
    assert np.all(log[:, 1] > 0) and np.all(log[:, 2] > 0) and np.all(log[:, 1] >= log[:, 3])
    np.testing.assert_allclose(log[:, 1], [reference["dumps"][int(s)][:, 4].max() for s in log[:, 0]], rtol=1e-5)
    assert log[-1, 1] > 2 * log[0, 1]  # the model drifts: events below really fire


def _expected_dump_steps(log: np.ndarray, thresh: float, interval: int, max_frames: int) -> list[int]:
    steps: list[int] = []
    for row in log:
        if row[1] > thresh and (not steps or row[0] - steps[-1] >= interval) and len(steps) < max_frames:
            steps.append(int(row[0]))
    return steps


@pytest.mark.mpi
def test_two_ranks_match_one_and_dump_follows_log(files, reference, tmp_path):
    """1 vs 2 ranks: per-atom values by tag and the log agree; the frame dump holds exactly
    the over-threshold evaluations (interval/max respected) and reads back with ASE."""
    log1 = reference["log"]
    dump_thresh = float(np.median(log1[:, 1]))      # about half of the evaluations are over
    interval, max_frames = 10, 3
    script = BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every {EVERY} metric distance log two.log dump frames.xyz {dump_thresh} interval {interval} max {max_frames}
        dump d all custom {EVERY} two.* id f_u[1] f_u[2] f_u[3] f_u[4]
        dump_modify d format float %.17g
        run {STEPS}
        """)
    res = _run_script(tmp_path, script)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    two = _custom_dumps(tmp_path, "two")
    assert sorted(two) == sorted(reference["dumps"])
    for step, rows in two.items():
        ref = reference["dumps"][step]
        np.testing.assert_array_equal(rows[:, 0], ref[:, 0])
        np.testing.assert_allclose(rows[:, 1:], ref[:, 1:], rtol=1e-6, atol=1e-9, err_msg=f"step {step}")
    np.testing.assert_array_equal(two[0][:, 1:], reference["dumps"][0][:, 1:])  # before any dynamics

    log2 = _read_log(tmp_path / "two.log")
    np.testing.assert_array_equal(log2[:, 0], log1[:, 0])
    np.testing.assert_array_equal(log2[:, 7], log1[:, 7])                # worst tag
    np.testing.assert_allclose(log2[:, [1, 2, 3, 6]], log1[:, [1, 2, 3, 6]], rtol=1e-5)
    assert np.all(log2[:, 4] == [np.count_nonzero(two[int(s)][:, 4] > dump_thresh) for s in log2[:, 0]])

    want = _expected_dump_steps(log2, dump_thresh, interval, max_frames)
    assert len(want) >= 2, log2
    frames = read(tmp_path / "frames.xyz", ":")
    assert [f.info["timestep"] for f in frames] == want
    for frame in frames:
        step = frame.info["timestep"]
        custom = two[step]
        assert len(frame) == 64 and set(frame.get_chemical_symbols()) == {"Si"}
        np.testing.assert_array_equal(frame.arrays["tag"], np.arange(1, 65))
        for col, name in enumerate(("ltau_expected", "ltau_ci_low", "ltau_ci_high", "ltau_knn_distance"), 1):
            np.testing.assert_allclose(frame.arrays[name], custom[:, col], rtol=1e-6, atol=1e-7)  # %.8f
        assert frame.info["ltau_worst"] == pytest.approx(custom[:, 4].max(), rel=1e-6)
        assert frame.info["ltau_worst"] > dump_thresh and frame.info["ltau_metric"] == "distance"
        assert frame.get_forces().shape == (64, 3) and np.abs(frame.get_forces()).max() > 0
        assert np.all(frame.pbc) and frame.cell.volume == pytest.approx(10.862 ** 3, rel=1e-6)


# --------------------------------------------------------------------------------------------
# halt: hard (error on every rank at the known step), soft + restart, the fix halt idiom
# --------------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_hard_halt_at_first_step_over_threshold_on_all_ranks(files, reference, tmp_path):
    r = reference
    script = BASE.format(model=files["model_file"]) + (
        f"fix u all ltau {files['est']} every {EVERY} metric distance halt {r['halt']} error hard log halt.log\n"
        f"run {STEPS}\n")
    got = per_rank(tmp_path, {"in.halt": script})["in.halt"]
    for rank, result in enumerate(got):
        assert result.startswith("ERROR"), (rank, got)
        assert f"Fix ltau u condition met on step {r['halt_step']} with value {r['halt_value']:.6g}" in result, \
            (rank, result)
        assert f"atom tag {r['halt_tag']}" in result and "exceeds the halt threshold" in result, (rank, result)
    log = _read_log(tmp_path / "halt.log")
    assert log[-1, 0] == r["halt_step"] and log[-1, 1] > r["halt"]
    assert np.all(log[:-1, 1] <= r["halt"]) and log[-1, 5] >= 1

    # the native lmp binary (embedded Python) exits non-zero with the message, no hang
    res = _run_script(tmp_path, script, launcher="lmp")
    assert res.returncode != 0
    assert f"condition met on step {r['halt_step']} " in res.stdout + res.stderr, \
        res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.mpi
def test_soft_halt_restart_continues_without_repeating_steps(files, reference, tmp_path):
    r, model, est = reference, files["model_file"], files["est"]
    fix = f"fix u all ltau {est} every {EVERY} metric distance halt {{halt}} error soft log r.log dump r.xyz {r['halt']}"
    script = BASE.format(model=model) + textwrap.dedent(f"""\
        {fix.format(halt=r['halt'])}
        run {STEPS}
        print "STOPPED_AT $(step)"
        write_restart r.restart
        clear
        read_restart r.restart
        pair_style ltau
        pair_coeff * * {model} Si
        fix md all nve
        {fix.format(halt=100 * r['halt'])} append yes
        run 30
        print "ENDED_AT $(step)"
        """)
    res = _run_script(tmp_path, script)
    out = res.stdout
    assert res.returncode == 0, out[-2000:] + res.stderr[-2000:]
    s = r["halt_step"]
    assert f"STOPPED_AT {s}\n" in out and f"ENDED_AT {s + 30}\n" in out, out[-3000:]
    assert out.count(f"Fix ltau u condition met on step {s} ") == 1
    log = _read_log(tmp_path / "r.log")
    np.testing.assert_array_equal(log[:, 0], np.arange(0, s + 31, EVERY))   # no step twice, no gap
    assert np.all(log[log[:, 0] < s, 1] <= r["halt"]) and log[log[:, 0] == s, 1] > r["halt"]
    steps = FrameDump(tmp_path / "r.xyz", append=True).steps
    assert steps[0] == s and len(steps) == len(set(steps)) and steps == sorted(steps)
    assert [f.info["timestep"] for f in read(tmp_path / "r.xyz", ":")] == steps


def test_fix_halt_and_dump_modify_skip_idiom(files, reference, tmp_path):
    """compute reduce max f_u[1] + variable + fix halt ... error soft + dump_modify skip."""
    from ltau_lmp.lammps.driver import create_lammps

    r = reference
    lmp = create_lammps(log="none", screen=False)
    try:
        lmp.commands_string(BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
            fix u all ltau {files['est']} every {EVERY} metric distance
            compute umax all reduce max f_u[1] f_u[4]
            variable risky equal c_umax[2]>{r['halt']}
            variable calm equal c_umax[2]<={r['halt']}
            fix stop all halt {EVERY} v_risky > 0.5 error soft
            thermo_style custom step temp c_umax[1] c_umax[2] f_u f_u[1] f_u[2] f_u[5]
            thermo {EVERY}
            dump d all custom {EVERY} {tmp_path}/risky.* id f_u[1] f_u[2] f_u[3] f_u[4]
            dump_modify d skip v_calm
            run {STEPS}
            """))
        assert lmp.extract_global("ntimestep") == r["halt_step"]
        assert lmp.extract_fix("u", 0, 0) == pytest.approx(r["halt_value"], rel=1e-6)     # f_u
        assert lmp.extract_compute("umax", 0, 1)[1] == pytest.approx(r["halt_value"], rel=1e-6)
        assert lmp.extract_fix("u", 0, 1, 4) == pytest.approx(r["halt_value"], rel=1e-6)   # f_u[5]
    finally:
        lmp.close()
    dumps = _custom_dumps(tmp_path, "risky")
    assert list(dumps) == [r["halt_step"]]
    assert dumps[r["halt_step"]][:, 4].max() == pytest.approx(r["halt_value"], rel=1e-6)


# --------------------------------------------------------------------------------------------
# dump under kill -9
# --------------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_kill_9_leaves_whole_frames(files, tmp_path):
    script = BASE.format(model=files["model_file"]) + (
        f"fix u all ltau {files['est']} every 1 dump frames.xyz 0.0 log k.log\nrun 1000000\n")
    (tmp_path / "in.kill").write_text(script)
    path = tmp_path / "frames.xyz"
    proc = subprocess.Popen([str(BIN / "mpirun"), "-np", "2", "ltau-lmp", "run", "in.kill", "-log", "none"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"timestep=") >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the dumping run ended by itself"
        assert path.exists() and path.read_bytes().count(b"timestep=") >= 8, "no frames after 90 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    size = -1
    while size != path.stat().st_size:     # a killed rank 0 still completes the write() it is in
        size = path.stat().st_size
        time.sleep(0.5)
    frames = read(path, ":")
    assert len(frames) >= 8
    assert all(len(f) == 64 and f.arrays["ltau_expected"].shape == (64,) for f in frames)
    dump = FrameDump(path, append=True)               # would cut a torn tail: there is none
    assert path.stat().st_size == size
    assert dump.steps == [f.info["timestep"] for f in frames] == list(range(len(frames)))


# --------------------------------------------------------------------------------------------
# bad input: LAMMPS error naming the cause on both ranks, non-zero exit, no hang
# --------------------------------------------------------------------------------------------

BAD = {
    "unknown_keyword": ("{est} every 5 colour red", "unknown keyword 'colour'"),
    "missing_estimator": ("/nonexistent/estimator", "estimator directory not found"),
    "corrupt_estimator": ("{est_corrupt}", "pdfs.npy"),
    "feature_dim_mismatch": ("{est_dim32}", "32-dimensional latent features but the model of pair_style ltau has latent_dim 16"),
    "model_hash_mismatch": ("{est_other}", "was built for model"),
    "negative_halt": ("{est} halt -0.1", "halt threshold must be >= 0"),
    "negative_dump": ("{est} dump f.xyz -1", "dump threshold must be >= 0"),
    "nonnumeric_halt": ("{est} halt high", "halt threshold must be a number, got 'high'"),
    "nonnumeric_dump": ("{est} dump f.xyz 1e-2x", "dump threshold must be a number"),
    "ood_without_reference": ("{est} metric ood", "metric ood cannot use estimator"),
    "ood_with_other_k": ("{est_ood} metric ood k 3", "measured with k = 5, not k = 3"),
    "halt_auto_without_thresholds": ("{est} halt auto", "recommends no threshold for metric expected"),
    "halt_auto_for_distance": ("{est_ood} metric distance halt auto", "recommends no threshold for metric distance"),
    "ood_threshold_above_one": ("{est_ood} metric ood halt 2", "p-value in [0, 1]"),
}
NO_PAIR = BASE.replace("pair_style      ltau\npair_coeff      * * {model} Si\n",
                       "pair_style      zero 4.0\npair_coeff      * *\n") + "fix u all ltau {est}\n"


@pytest.mark.mpi
def test_bad_input_stops_both_ranks_with_the_cause(files, tmp_path):
    scripts = {f"in.{name}": BASE.format(model=files["model_file"]) + "fix u all ltau " + args.format(**files) + "\n"
               for name, (args, _) in BAD.items()}
    scripts["in.no_pair_style"] = NO_PAIR.format(est=files["est"])
    expected = {f"in.{name}": message for name, (_, message) in BAD.items()}
    expected["in.no_pair_style"] = "requires pair_style ltau"
    got = per_rank(tmp_path, scripts, timeout=120)
    for name, message in expected.items():
        for rank in (0, 1):
            assert got[name][rank].startswith("ERROR") and message in got[name][rank], (name, rank, got[name])


@pytest.mark.mpi
@pytest.mark.parametrize("case,launcher", [("corrupt_estimator", "ltau-lmp"), ("model_hash_mismatch", "lmp")])
def test_bad_input_exit_code(case, launcher, files, tmp_path):
    args, message = BAD[case]
    res = _run_script(tmp_path, BASE.format(model=files["model_file"]) + "fix u all ltau " + args.format(**files) + "\n",
                      launcher=launcher)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# the shipped input scripts run (tiny sizes)
# --------------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_input_scripts_run(files, tmp_path):
    common = ["-var", "model", files["model_file"], "-var", "estimator", files["est"], "-var", "cells", "2"]
    runs = {
        "in.si_ltau": ["-var", "steps", "40", "-var", "every", "2", "-var", "dump_thresh", "0"],
        "in.si_heat": ["-var", "steps", "400", "-var", "every", "5", "-var", "halt", "0.0"],
        "in.si_restart": ["-var", "steps1", "40", "-var", "steps2", "20", "-var", "every", "5",
                          "-var", "halt", "0.0", "-var", "halt2", "1e9"],
    }
    for script, extra in runs.items():
        res = mpirun(["ltau-lmp", "run", str(INPUTS / script), "-log", "none", *common, *extra], tmp_path)
        assert res.returncode == 0, (script, res.stdout[-2000:] + res.stderr[-2000:])
    ltau = _read_log(tmp_path / "ltau.log")
    np.testing.assert_array_equal(ltau[:, 0], np.arange(0, 41, 2))
    assert [f.info["timestep"] for f in read(tmp_path / "ltau_frames.xyz", ":")] == [0]  # interval 100
    heat = _read_log(tmp_path / "heat.log")          # halt 0: stops at the first end-of-step check
    assert heat[:, 0].tolist() == [0, 5] and len(read(tmp_path / "heat_frames.xyz", ":")) == 2
    assert (tmp_path / "heat_last.data").exists()
    restart = _read_log(tmp_path / "restart.log")
    np.testing.assert_array_equal(restart[:, 0], np.arange(0, 26, 5))    # halted at 5, then 20 more


# --------------------------------------------------------------------------------------------
# LAMMPS run-loop semantics: fix halt's modes, redefinition, minimize, pre no, rerun, swaps
# --------------------------------------------------------------------------------------------

def _final_state(lmp) -> dict:
    """Positions, per-atom fix values and box of a 1-rank instance, sorted by atom ID."""
    from lammps import LMP_STYLE_ATOM, LMP_TYPE_ARRAY

    n = lmp.extract_global("nlocal")
    tags = lmp.numpy.extract_atom("id")[:n]
    order = np.argsort(tags)
    boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
    cell = np.array([[boxhi[0] - boxlo[0], 0, 0], [xy, boxhi[1] - boxlo[1], 0], [xz, yz, boxhi[2] - boxlo[2]]])
    state = {"step": lmp.extract_global("ntimestep"), "x": lmp.numpy.extract_atom("x")[:n][order] - boxlo,
             "cell": cell}
    if lmp.has_id("fix", "u"):
        state["peratom"] = lmp.numpy.extract_fix("u", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:n][order].copy()
    return state


def _assert_values_describe(files, state) -> None:
    """fix ltau's per-atom values are those of the current configuration (a fresh query)."""
    atoms = Atoms("Si" * len(state["x"]), positions=state["x"], cell=state["cell"], pbc=True)
    atoms.calc = LTAUCalculator(files["model"])
    atoms.get_potential_energy()
    res = LTAUEstimator.load(files["est"]).query(atoms.calc.results["latent"])
    want = np.column_stack([res.expected, res.interval(0.05, 0.95), res.distance])
    np.testing.assert_allclose(state["peratom"], want, rtol=1e-5, atol=1e-7)


def _in_process(script: str, log: Path | None = None) -> tuple[dict, str]:
    """Run ``script`` on one rank here; returns the final state and the error text ('' if none)."""
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log=str(log) if log else "none", screen=False)
    try:
        try:
            lmp.commands_string(script)
            error = ""
        except Exception as exc:
            error = " ".join(str(exc).split())
        return _final_state(lmp), error
    finally:
        lmp.close()


HALT_CASES = {
    # name: (fix ltau halt keywords, another fix halt line, step after run 1, step after `run 3`)
    "soft": ("halt {halt} error soft", "", "{s}", "{s}"),
    "soft, message no": ("halt {halt} error soft message no", "", "{s}", "{s}"),
    "default is soft": ("halt {halt}", "", "{s}", "{s}"),
    "continue": ("halt {halt} error continue", "", "{s}", "{s}+3"),
    "fix halt soft, fix ltau continue never fires": (
        "halt 1e9 error continue", "fix stop all halt 5 v_step >= 20 error soft", "20", "20"),
    "fix halt continue, fix ltau soft never fires": (
        "halt 1e9 error soft", "fix stop all halt 5 v_step >= 20 error continue", "20", "23"),
}


@pytest.mark.parametrize("case", list(HALT_CASES))
def test_halt_modes_and_the_next_run(case, files, reference, tmp_path):
    """fix ltau's halt follows fix halt: soft skips later runs, continue lets them go ahead, and
    a timeout that another fix set is never reset by fix ltau (issue: it once was)."""
    keywords, other, after1, after2 = HALT_CASES[case]
    s, halt = reference["halt_step"], reference["halt"]
    script = BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        variable step equal step
        fix u all ltau {files['est']} every {EVERY} metric distance {keywords.format(halt=halt)}
        {other}
        run {STEPS}
        print "$(step)" append {tmp_path}/steps.txt screen no
        run 3
        print "$(step)" append {tmp_path}/steps.txt screen no
        """)
    _, error = _in_process(script, log=tmp_path / "log.lammps")
    assert error == ""
    steps = [int(v) for v in (tmp_path / "steps.txt").read_text().split()]
    assert steps == [eval(after1.format(s=s)), eval(after2.format(s=s))], case   # "{s}+3" -> s + 3
    text = (tmp_path / "log.lammps").read_text()
    mine = f"Fix ltau u condition met on step {s} with value {reference['halt_value']:.6g}"
    assert (mine in text) == ("{halt}" in keywords and "message no" not in keywords), text[-1500:]
    assert ("fix-id stop met on step 20" in text) == bool(other), text[-1500:]


def test_redefined_pair_style_is_followed_or_refused_at_init(files, reference, tmp_path):
    """A new pair_style ltau between runs: same model -> the fix follows it; another model ->
    error at init naming the mismatch (not "no features" later); another pair style -> error."""
    other = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=16, seed=1)
    save_model(other, tmp_path / "other.pt")
    head = BASE.format(model=files["model_file"]) + f"fix u all ltau {files['est']} every {EVERY}\nrun 10\n"
    same, error = _in_process(head + f"pair_style ltau\npair_coeff * * {files['model_file']} Si\nrun 10\n")
    assert error == "" and same["step"] == 20
    _assert_values_describe(files, same)
    _, error = _in_process(head + f"pair_style ltau\npair_coeff * * {tmp_path / 'other.pt'} Si\nrun 10\n")
    assert "was built for model" in error and "no features" not in error, error
    _, error = _in_process(head + "pair_style zero 4.0\npair_coeff * *\nrun 10\n")
    assert "Fix ltau" in error and "requires pair_style ltau" in error, error
    # a new pair style object (hybrid in between) without pair_coeff yet
    _, error = _in_process(head + "pair_style zero 4.0\npair_coeff * *\npair_style ltau\nrun 10\n")
    assert "All pair coeffs are not set" in error or "pair_coeff" in error, error


def test_minimize_evaluates_at_the_minimizer_force_calls(files, tmp_path):
    script = BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every 1 log {tmp_path}/min.log
        minimize 0 0 8 1000
        """)
    state, error = _in_process(script)
    assert error == "" and state["step"] == 8
    _assert_values_describe(files, state)        # the values describe the minimized structure
    np.testing.assert_array_equal(_read_log(tmp_path / "min.log")[:, 0], np.arange(0, 9))
    # a soft halt ends the minimization at the first check over the threshold
    state, error = _in_process(BASE.format(model=files["model_file"]) +
                               f"fix u all ltau {files['est']} every 2 halt 0.0\nminimize 0 0 8 1000\n")
    assert error == "" and state["step"] == 2


def test_run_pre_no_post_no_continues_the_log(files, tmp_path):
    script = BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every {EVERY} log {tmp_path}/pre.log
        run 10
        run 10 pre no post no
        run 10 pre no post no
        """)
    state, error = _in_process(script)
    assert error == "" and state["step"] == 30
    _assert_values_describe(files, state)
    np.testing.assert_array_equal(_read_log(tmp_path / "pre.log")[:, 0], np.arange(0, 31, EVERY))


def test_rerun_reproduces_the_values_of_the_original_run(files, reference, tmp_path):
    """rerun: each frame read back gets the same per-atom values as in the run that wrote it."""
    _, error = _in_process(BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        dump x all custom 10 {tmp_path}/traj.dump id type x y z
        dump_modify x format float %.17g sort id
        run {STEPS}
        """))
    assert error == ""
    _, error = _in_process(BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every 10 metric distance log {tmp_path}/rerun.log
        dump d all custom 10 {tmp_path}/re.* id f_u[1] f_u[2] f_u[3] f_u[4]
        dump_modify d format float %.17g
        rerun {tmp_path}/traj.dump dump x y z
        """))
    assert error == ""
    rerun = _custom_dumps(tmp_path, "re")
    assert sorted(rerun) == list(range(0, STEPS + 1, 10))
    for step, rows in rerun.items():
        np.testing.assert_allclose(rows, reference["dumps"][step], rtol=1e-9, atol=1e-12, err_msg=f"step {step}")
    np.testing.assert_array_equal(_read_log(tmp_path / "rerun.log")[:, 0], np.arange(0, STEPS + 1, 10))


def test_extra_force_calls_within_a_step(files, tmp_path):
    """fix atom/swap evaluates the energy several times per step (pre_exchange): the fix uses
    the last force call of the step, which describes the configuration at its end."""
    script = BASE.format(model=files["model_file"]).replace(
        "create_box      1 box", "create_box      2 box").replace(
        "mass            1 28.0855", "mass            * 28.0855\nset type 1 type/fraction 2 0.5 12345").replace(
        f"pair_coeff      * * {files['model_file']} Si", f"pair_coeff      * * {files['model_file']} Si Si"
    ) + textwrap.dedent(f"""\
        fix swap all atom/swap {EVERY} 4 29494 1500 ke yes types 1 2
        fix u all ltau {files['est']} every {EVERY} log {tmp_path}/swap.log
        run 20
        print "$(f_swap[2])" file {tmp_path}/accepted.txt screen no
        """)
    state, error = _in_process(script)
    assert error == "" and state["step"] == 20
    assert float((tmp_path / "accepted.txt").read_text()) > 0        # swaps really happened
    _assert_values_describe(files, state)
    np.testing.assert_array_equal(_read_log(tmp_path / "swap.log")[:, 0], np.arange(0, 21, EVERY))


# --------------------------------------------------------------------------------------------
# persistence: halt ... over N
# --------------------------------------------------------------------------------------------

def _first_run_of(flags: list[bool], steps: list[int], k: int, n: int | None = None) -> int | None:
    """Step where the flag has been set in k of the last n evaluations (n = k: k in a row)."""
    recent: list[bool] = []
    for flag, step in zip(flags, steps):
        recent = (recent + [flag])[-(n or k):]
        if sum(recent) >= k:
            return step
    return None


@pytest.mark.mpi
def test_halt_over_n_fires_at_the_nth_consecutive_evaluation_on_every_rank(files, reference, tmp_path):
    """The condition's sequence comes from the 1-rank reference log (setup, step 0, never counts);
    with `over 2` the halt must come at the second evaluation in a row over the threshold."""
    log = reference["log"][1:]                        # step 0 is the setup evaluation
    thresh = float(np.median(log[:, 1]))
    steps, flags = log[:, 0].astype(int).tolist(), (log[:, 1] > thresh).tolist()
    want = _first_run_of(flags, steps, 2)
    assert want is not None and want != _first_run_of(flags, steps, 1), "the sequence must test persistence"
    base = BASE.format(model=files["model_file"])
    scripts = {
        "in.over2": base + f"fix u all ltau {files['est']} every {EVERY} metric distance halt {thresh} over 2 "
                           f"error hard\nrun {STEPS}\n",
        "in.over3": base + f"fix u all ltau {files['est']} every {EVERY} halt 0.0 over 3 error hard\nrun {STEPS}\n",
    }
    got = per_rank(tmp_path, scripts)
    for rank in (0, 1):
        assert f"condition met on step {want} " in got["in.over2"][rank] and "2 evaluations in a row" in \
            got["in.over2"][rank], (rank, want, got["in.over2"])
        assert f"condition met on step {3 * EVERY} " in got["in.over3"][rank], (rank, got["in.over3"])


# --------------------------------------------------------------------------------------------
# out-of-domain p-values: column, metric ood, automatic thresholds
# --------------------------------------------------------------------------------------------

OOD_SCRIPT = BASE + """\
fix             u all ltau {est} every {every} metric ood {halt} log {log}
dump            d all custom {every} {dumps}.* id f_u[1] f_u[2] f_u[3] f_u[4] f_u[5]
dump_modify     d format float %.17g
run             {steps}
"""


@pytest.mark.mpi
def test_ood_column_and_auto_halt_agree_on_one_and_two_ranks(files, tmp_path):
    """f_u[5] = the estimator's p-value; 1 rank = 2 ranks by atom ID; `metric ood halt auto over 2`
    stops both ranks at the step the 1-rank log predicts (p at or below the recommended one)."""
    from ltau_lmp.lammps.driver import create_lammps

    est = LTAUEstimator.load(files["est_ood"])
    assert est.alarm_thresholds["distance_tail"] is not None
    threshold = thresholds_for(est.alarm_thresholds, 64)["ood"]   # 64 watched atoms: each at rate 0.5 / 64
    lmp = create_lammps(log="none", screen=False)
    try:
        lmp.commands_string(OOD_SCRIPT.format(model=files["model_file"], est=files["est_ood"], every=EVERY, halt="",
                                              log=tmp_path / "one.log", dumps=tmp_path / "one", steps=STEPS))
        state = _final_state(lmp)
        assert lmp.extract_fix("u", 0, 0) == pytest.approx(state["peratom"][:, 4].min())      # f_u = min p
        assert lmp.extract_fix("u", 0, 1, 5) == pytest.approx(state["peratom"][:, 4].min())   # f_u[6]
    finally:
        lmp.close()
    atoms = Atoms("Si" * len(state["x"]), positions=state["x"], cell=state["cell"], pbc=True)
    atoms.calc = LTAUCalculator(files["model"])
    atoms.get_potential_energy()
    np.testing.assert_allclose(state["peratom"][:, 4], est.query(atoms.calc.results["latent"]).ood, rtol=1e-12)

    log = _read_log(tmp_path / "one.log")
    steps, flags = log[1:, 0].astype(int).tolist(), (log[1:, 1] <= threshold * (1 + 1e-5)).tolist()  # %.6g
    want = _first_run_of(flags, steps, 2)
    assert want is not None, f"the p-values never reach {threshold}: {log[:, 1]}"
    scripts = {name: OOD_SCRIPT.format(model=files["model_file"], est=files["est_ood"], every=EVERY, halt=halt,
                                       log=f"{name}.log", dumps=name, steps=STEPS)
               for name, halt in (("two", ""), ("halt", "halt auto over 2 error hard"))}
    got = per_rank(tmp_path, scripts)
    for rank in (0, 1):
        assert got["two"][rank] == "OK", got["two"]
        assert f"condition met on step {want} " in got["halt"][rank] and "ood uncertainty is at or below the " \
            f"halt threshold {threshold:g}" in got["halt"][rank], (rank, want, got["halt"])
    one, two = _custom_dumps(tmp_path, "one"), _custom_dumps(tmp_path, "two")
    p_values = np.concatenate([rows[:, 5] for rows in one.values()])
    assert np.all((p_values > 0) & (p_values <= 1)) and len(np.unique(p_values)) > 1
    assert sorted(two) == sorted(one) == list(range(0, STEPS + 1, EVERY))
    assert sorted(_custom_dumps(tmp_path, "halt")) == [s for s in sorted(one) if s < want]  # halt precedes output
    for step, rows in two.items():
        np.testing.assert_array_equal(rows[:, 0], one[step][:, 0])
        np.testing.assert_allclose(rows[:, 1:], one[step][:, 1:], rtol=1e-6, atol=1e-9, err_msg=f"step {step}")


# --------------------------------------------------------------------------------------------
# what a user keeps and sees: files of a rerun, appends, non-finite model output, the init report
# --------------------------------------------------------------------------------------------

def test_rerun_in_the_same_folder_starts_the_log_and_dump_afresh(files, tmp_path):
    """The same input at 1000 K, then at 3000 K: the files hold the second run, not the first."""
    def run(temp):
        script = BASE.format(model=files["model_file"]).replace("velocity        all create 1500",
                                                                 f"velocity        all create {temp}")
        script += f"fix u all ltau {files['est']} every {EVERY} log u.log dump u.xyz 0 interval 10\nrun 20\n"
        _, error = _in_process(script.replace("u.log", str(tmp_path / "u.log")).replace("u.xyz", str(tmp_path / "u.xyz")))
        assert error == ""
        return _read_log(tmp_path / "u.log"), read(tmp_path / "u.xyz", ":")

    cold_log, cold_frames = run(1000)
    hot_log, hot_frames = run(3000)
    np.testing.assert_array_equal(hot_log[:, 0], [0, 5, 10, 15, 20])        # one run's steps, once each
    assert (tmp_path / "u.log").read_text().count("# fix ltau u:") == 1
    assert [f.info["timestep"] for f in hot_frames] == [0, 10, 20]
    assert not np.allclose(hot_frames[-1].positions, cold_frames[-1].positions)
    assert not np.allclose(hot_log[1:, 1], cold_log[1:, 1])


@pytest.mark.mpi
def test_going_back_in_time_on_a_log_stops_both_ranks_naming_the_file(files, tmp_path):
    head = BASE.format(model=files["model_file"])
    fix = f"fix u all ltau {files['est']} every {EVERY} log {tmp_path}/{{name}}.log"
    scripts = {
        # reset_timestep between two runs of one fix
        "in.reset": head + fix.format(name="reset") + "\nrun 20\nreset_timestep 0\nrun 10\n",
        # append yes onto a file that already holds later steps (another run's log)
        "in.append": head + fix.format(name="append") + "\nrun 20\nunfix u\nreset_timestep 5\n"
        + fix.format(name="append") + " append yes\nrun 10\n",
    }
    got = per_rank(tmp_path, scripts)
    for name, first in (("reset", 0), ("append", 5)):
        for rank in (0, 1):
            result = got[f"in.{name}"][rank]
            assert result.startswith("ERROR") and f"log {tmp_path}/{name}.log: the file already holds step 20, " \
                f"after step {first} of this run" in result, (name, rank, result)
    np.testing.assert_array_equal(_read_log(tmp_path / "append.log")[:, 0], [0, 5, 10, 15, 20])   # kept


OVERLAP = """\
units           metal
atom_style      atomic
boundary        p p p
region          box block 0 8 0 8 0 8
create_box      1 box
create_atoms    1 single 1.0 1.0 1.0
create_atoms    1 single 1.0 1.0 1.0
create_atoms    1 single 3.0 1.0 1.0
create_atoms    1 single 5.0 5.0 5.0
mass            1 28.0855
pair_style      ltau
pair_coeff      * * {model} Si
"""


@pytest.mark.mpi
def test_non_finite_model_output_stops_both_ranks_naming_the_atoms(files, tmp_path):
    """Two atoms on one spot: the model's forces are NaN. Without fix ltau the run once went on
    with PotEng -nan; now every rank stops at the force call, naming the step and the atoms."""
    scripts = {"in.plain": OVERLAP.format(model=files["model_file"]) + "run 0\n",
               "in.fix": OVERLAP.format(model=files["model_file"]) + f"fix u all ltau {files['est']}\nrun 0\n"}
    got = per_rank(tmp_path, scripts)
    for name, results in got.items():
        for rank, result in enumerate(results):
            assert result.startswith("ERROR") and "Pair style ltau: step 0: the model gave non-finite" in result \
                and "atom IDs 1, 2" in result, (name, rank, result)


def test_init_report_names_estimator_metric_units_and_resolved_thresholds(files, tmp_path):
    est = LTAUEstimator.load(files["est_ood"])
    ood = thresholds_for(est.alarm_thresholds, 64)["ood"]
    script = BASE.format(model=files["model_file"]) + (
        f"fix u all ltau {files['est_ood']} every {EVERY} metric ood halt auto dump {tmp_path}/f.xyz 0.01 "
        f"log {tmp_path}/u.log\nrun 10\nrun 5\n")
    _, error = _in_process(script, log=tmp_path / "log.lammps")
    assert error == ""
    text = (tmp_path / "log.lammps").read_text()
    first = f"Fix ltau u: estimator {files['est_ood']}: {est.n_entries:,} training atoms, index flat, k 5, " \
            f"built for model {files['model'].model_hash[:12]}"
    assert text.count(first) == 1, text[:3000]          # once, not at every run
    assert "metric ood (out-of-domain p-value, smaller = more unusual), every 5 steps, 64 watched atoms" in text
    assert f"halt when <= {ood:.4g} (auto: false-alarm rate 0.5 per evaluation of 64 atoms) (error soft)" in text
    assert f"dump {tmp_path}/f.xyz when <= 0.01 (interval 1)" in text
    header = [line for line in (tmp_path / "u.log").read_text().splitlines() if line.startswith("#")]
    assert header[0] == "# fix " + first[len("Fix "):]
    assert any(f"halt when <= {ood:.4g}" in line for line in header), header


def test_unchecked_estimator_and_empty_group_are_warned_about(files, tmp_path):
    unchecked = tmp_path / "est_unchecked"
    shutil.copytree(files["est_ood"], unchecked)
    meta = json.loads((unchecked / "meta.json").read_text())
    meta["metadata"].pop("model_hash")
    meta["metadata"]["model_binding"] = "unchecked"
    (unchecked / "meta.json").write_text(json.dumps(meta))
    script = BASE.format(model=files["model_file"]) + (
        f"group nobody empty\nfix u nobody ltau {unchecked} metric ood\n"
        "thermo_style custom step pe f_u f_u[2] f_u[6]\nrun 0\n")
    _, error = _in_process(script, log=tmp_path / "log.lammps")
    assert error == ""
    text = (tmp_path / "log.lammps").read_text()
    assert f"WARNING: Fix ltau u: estimator {unchecked} is unchecked (it records no model hash)" in text
    assert "WARNING: Fix ltau u: its group has no atoms" in text
    row = text.splitlines()[text.splitlines().index(next(l for l in text.splitlines() if l.split()[:1] == ["Step"])) + 1]
    assert row.split()[2:] == ["1", "1", "1"], row      # worst p-value, mean, min p-value: 1, never -0
