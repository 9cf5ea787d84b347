"""The files fix ltau writes: the log and the frame dump across a soft halt + restart (append), under
kill -9, in a rerun in the same folder, when time goes back; the shipped input scripts' outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest
from ase.io import read

from helpers.fix_ltau import BASE, EVERY, STEPS, in_process, read_log, run_script
from helpers.mpi_run import BIN, ENV, mpirun, per_rank
from helpers.paths import INPUTS

from ltau_lmp.lammps.events import FrameDump


# --------------------------------------------------------------------------------------------
# soft halt + restart: the log and the dump continue (append yes)
# --------------------------------------------------------------------------------------------

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
    res = run_script(tmp_path, script)
    out = res.stdout
    assert res.returncode == 0, out[-2000:] + res.stderr[-2000:]
    s = r["halt_step"]
    assert f"STOPPED_AT {s}\n" in out and f"ENDED_AT {s + 30}\n" in out, out[-3000:]
    assert out.count(f"Fix ltau u condition met on step {s} ") == 1
    log = read_log(tmp_path / "r.log")
    np.testing.assert_array_equal(log[:, 0], np.arange(0, s + 31, EVERY))   # no step twice, no gap
    assert np.all(log[log[:, 0] < s, 1] <= r["halt"]) and log[log[:, 0] == s, 1] > r["halt"]
    steps = FrameDump(tmp_path / "r.xyz", append=True).steps
    assert steps[0] == s and len(steps) == len(set(steps)) and steps == sorted(steps)
    assert [f.info["timestep"] for f in read(tmp_path / "r.xyz", ":")] == steps


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
    ltau = read_log(tmp_path / "ltau.log")
    np.testing.assert_array_equal(ltau[:, 0], np.arange(0, 41, 2))
    assert [f.info["timestep"] for f in read(tmp_path / "ltau_frames.xyz", ":")] == [0]  # interval 100
    heat = read_log(tmp_path / "heat.log")          # halt 0: stops at the first end-of-step check
    assert heat[:, 0].tolist() == [0, 5] and len(read(tmp_path / "heat_frames.xyz", ":")) == 2
    assert (tmp_path / "heat_last.data").exists()
    restart = read_log(tmp_path / "restart.log")
    np.testing.assert_array_equal(restart[:, 0], np.arange(0, 26, 5))    # halted at 5, then 20 more


# --------------------------------------------------------------------------------------------
# what a user keeps: files of a rerun, appends
# --------------------------------------------------------------------------------------------

def test_rerun_in_the_same_folder_starts_the_log_and_dump_afresh(files, tmp_path):
    """The same input at 1000 K, then at 3000 K: the files hold the second run, not the first."""
    def run(temp):
        script = BASE.format(model=files["model_file"]).replace("velocity        all create 1500",
                                                                 f"velocity        all create {temp}")
        script += f"fix u all ltau {files['est']} every {EVERY} log u.log dump u.xyz 0 interval 10\nrun 20\n"
        _, error = in_process(script.replace("u.log", str(tmp_path / "u.log")).replace("u.xyz", str(tmp_path / "u.xyz")))
        assert error == ""
        return read_log(tmp_path / "u.log"), read(tmp_path / "u.xyz", ":")

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
    np.testing.assert_array_equal(read_log(tmp_path / "append.log")[:, 0], [0, 5, 10, 15, 20])   # kept
