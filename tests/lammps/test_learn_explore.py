"""The explore stage of the learning loop (ltau_lmp.learn.explore): real `mpirun -np 1 ltau-lmp run`
subprocesses of the shipped template on a 64-atom Si cell with a small random model and an estimator
built from its own latents of rattled cells (held-out cells calibrate `ood` and the `auto` thresholds).

At 10 K the crystal stays in domain: `halt auto` never fires. A forced halt (`halt "1.0 over 3"`:
every p-value is <= 1, so the third check, step 15 with every 5, halts) must leave restart files
from before the halt step; resuming from one continues LAMMPS's step counter from that state.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write
from helpers.fix_ltau import rattled_latents

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.errorlog import ErrorLog
from ltau_lmp.evaluation.select import read_dumps
from ltau_lmp.learn.explore import SI_NVT_TEMPLATE, load_result, run_protocol
from ltau_lmp.model import LocalForceField, save_model
from ltau_lmp.outputs import OutputExistsError

LAUNCHER = "mpirun -np {ranks}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    model = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=16, seed=0)
    save_model(model, root / "model.pt")
    latent = rattled_latents(model, 4, 0)
    rng = np.random.default_rng(0)
    log = ErrorLog.log_spaced(len(latent), lo=1e-3, hi=10.0, nbins=50)
    for _ in range(3):
        log.update(np.arange(len(latent)), np.exp(rng.normal(-3.0, 0.7, len(latent))))
        log.end_epoch()
    LTAUEstimator.build(latent, log, k=5, index="flat", metadata={"model_hash": model.model_hash},
                        reference_descriptors=rattled_latents(model, 8, 100),
                        false_alarm_rate=1e-3).save(root / "est")
    write(root / "si.data", bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2), format="lammps-data",
          atom_style="atomic", masses=True)
    return {"root": root, "model": root / "model.pt", "est": root / "est", "data": root / "si.data"}


def protocol(files, name: str, steps: int, template: str = SI_NVT_TEMPLATE, **variables) -> dict:
    return {"name": name, "template": template, "steps": steps, "ranks": 1,
            "variables": {"data": str(files["data"]), "temp": 10, "every": 5, "restart_every": 5, **variables}}


def explore(files, proto, workdir, **kw):
    return run_protocol(proto, files["model"], files["est"], files["root"] / workdir, launcher=LAUNCHER,
                        timeout=120, **kw)


def ltau_rows(path) -> np.ndarray:
    return np.loadtxt([line for line in path.read_text().splitlines() if not line.startswith("#")], ndmin=2)


def test_quiet_protocol_completes(files):
    res = explore(files, protocol(files, "cold", 20), "cold")
    assert res.status == "completed", res.error + "\n" + res.log_tail
    assert (res.start_step, res.final_step, res.steps_run, res.halt_step) == (0, 20, 20, None)
    assert res.returncode == 0 and not res.timed_out and res.error is None
    assert ltau_rows(res.ltau_log)[:, 0].tolist() == [0, 5, 10, 15, 20]
    assert sorted(res.restarts) == [5, 10, 15, 20] and res.restart == res.restarts[20]
    assert res.input.read_text().count("variable        halt index \"auto\"") == 1
    assert load_result(res.workdir) == res


def test_halt_dumps_frames_and_resumes_from_before_the_halt(files):
    hot = protocol(files, "forced", 40, halt="1.0 over 3", dump="1.0")
    res = explore(files, hot, "forced")
    assert res.status == "halted", res.error + "\n" + res.log_tail
    assert res.halt_step == 15 and res.final_step == 15 and res.steps_run == 15
    assert "condition met on step 15" in res.halt_message
    # every evaluation was dumped (threshold 1.0), each frame with its provenance
    assert [f.step for f in res.frames] == [0, 5, 10, 15]
    frames = read_dumps(res.dumps)
    assert [a.info["source"] for a in frames] == [f.source for f in res.frames]
    assert [a.info["timestep"] for a in frames] == [f.step for f in res.frames]
    assert {f.protocol for f in res.frames} == {"forced"}
    # the restart to resume from is the latest one before the halt step, not the one at it
    assert res.restart_step == 10 and res.restart == res.restarts[10] and res.restart.is_file()

    cont = explore(files, protocol(files, "forced", 40), "forced_2", resume_from=res.restart)
    assert cont.status == "completed", cont.error + "\n" + cont.log_tail
    assert (cont.start_step, cont.final_step, cont.steps_run) == (10, 40, 30)
    assert cont.variables["resumed"] == "1" and cont.variables["start"] == f"read_restart {res.restart}"
    assert min(cont.restarts) == 15 and cont.restart == cont.restarts[40]
    # the resumed run starts from the very state written at step 10: the same uncertainties there
    first, again = ltau_rows(res.ltau_log), ltau_rows(cont.ltau_log)
    np.testing.assert_allclose(again[0, :4], first[first[:, 0] == 10][0, :4], rtol=1e-6)


def test_template_error_is_a_failed_result_with_the_lammps_error(files):
    broken = SI_NVT_TEMPLATE.replace("pair_style      ltau", "pair_style      no_such_style")
    res = explore(files, protocol(files, "broken", 20, template=broken), "broken")
    assert res.status == "failed" and res.returncode != 0
    first, where = res.error.splitlines()      # once each, not once per stream
    assert first.startswith("ERROR: Unrecognized pair style 'no_such_style'")
    assert where == "Last input line: pair_style no_such_style"
    assert "no_such_style" in res.log_tail and res.frames == [] and res.restart is None
    # a template that stops short of ${steps} (without a halt) is not a completed protocol
    short = SI_NVT_TEMPLATE.replace("run             ${steps} upto", "variable half equal ${steps}/2\nrun ${half}")
    res = explore(files, protocol(files, "short", 20, template=short), "short")
    assert res.status == "failed" and res.returncode == 0 and res.final_step == 10
    assert "ended at step 10, not at step 20" in res.error


def test_timeout_stops_the_run(files):
    # (the random model drifts out of domain after ~100 steps even at 10 K: thresholds it never reaches)
    long = protocol(files, "long", 10 ** 6, halt="1e-300", dump="1e-300")
    res = run_protocol(long, files["model"], files["est"], files["root"] / "long",
                       launcher=LAUNCHER, timeout=3)
    assert res.status == "failed" and res.timed_out and "timed out after 3 s" in res.error


def test_contract_is_checked_before_running(files, tmp_path):
    run = lambda proto, **kw: run_protocol(proto, files["model"], files["est"], tmp_path / "x", **kw)  # noqa: E731
    with pytest.raises(ConfigError, match=r"\$\{ltau_log\}"):
        run(protocol(files, "p", 20, template=SI_NVT_TEMPLATE.replace("log ${ltau_log}", "log ltau.log")))
    with pytest.raises(ConfigError, match="set by the explore stage"):
        run(protocol(files, "p", 20, model="other.pt"))
    with pytest.raises(ConfigError, match="starting structure"):
        run({**protocol(files, "p", 20), "variables": {}})
    with pytest.raises(ConfigError, match="launcher"):
        run(protocol(files, "p", 20), launcher="mpirun -np {nodes}")
    missing = run_protocol(protocol(files, "p", 20), files["model"], files["est"], tmp_path / "y",
                           launcher="no-such-launcher -n {ranks}")
    assert missing.status == "failed" and "could not be started" in missing.error
    assert "no-such-launcher" in missing.log_tail
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("not an explore output")
    with pytest.raises(OutputExistsError):
        run(protocol(files, "p", 20))
    assert not (tmp_path / "x" / "in.lmp").exists()
