"""fix ltau pieces that need no LAMMPS: keyword parsing, the step log and the frame dump."""

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps.events import FrameDump, StepLog
from ltau_lmp.lammps import abi
from ltau_lmp.lammps.fix_decision import Persistence
from ltau_lmp.lammps.fix_options import FixOptions
from ltau_lmp.lammps.pair import PairOptions


def test_parse_all_keywords():
    o = FixOptions.parse("est every 10 k 5 metric upper ci 0.1 0.9 quantile 0.5 halt 0.8 error continue "
                         "message no dump frames.xyz 0.3 interval 20 max 7 log ltau.log".split())
    assert (o.estimator, o.every, o.k, o.metric, o.ci, o.quantile) == ("est", 10, 5, "upper", (0.1, 0.9), 0.5)
    assert (o.halt, o.halt_mode, o.halt_message, o.halt_mode_code) == (0.8, "continue", False, abi.HALT_CONTINUE)
    assert (o.dump_file, o.dump_threshold, o.dump_interval, o.dump_max) == ("frames.xyz", 0.3, 20, 7)
    assert (o.log_file, o.append) == ("ltau.log", False)
    assert FixOptions.parse("est log l.txt append yes".split()).append
    defaults = FixOptions.parse(["est"])
    assert (defaults.every, defaults.k, defaults.metric, defaults.dump_file) == (1, None, "expected", None)
    assert (defaults.halt, defaults.halt_mode_code) == (None, abi.HALT_NONE)
    with_halt = FixOptions.parse(["est", "halt", "1"])      # fix halt's defaults: error soft, message yes
    assert (with_halt.halt_mode, with_halt.halt_message, with_halt.halt_mode_code) == ("soft", True, abi.HALT_SOFT)
    # `error`/`message` may come before `halt`, as keywords of their own (fix halt's syntax)
    assert FixOptions.parse("est error hard halt 2".split()).halt_mode_code == abi.HALT_HARD
    assert FixOptions.parse("est ci no every 5".split()).ci is None      # the lean evaluation: no intervals


@pytest.mark.parametrize("args,message", [
    ([], "usage"),
    (["e", "colour", "red"], "unknown keyword 'colour'"),
    (["e", "halt", "-1"], "halt threshold must be >= 0"),
    (["e", "halt", "abc"], "halt threshold must be a number"),
    (["e", "dump", "f.xyz", "nan"], "dump threshold must be finite"),
    (["e", "dump", "f.xyz"], "keyword dump needs FILE THRESH"),
    (["e", "every", "0"], "every must be a positive integer"),
    (["e", "metric", "max"], "metric must be expected or upper or distance"),
    (["e", "ci", "0.9", "0.1"], "ci needs 0 <= LO < HI <= 1"),
    (["e", "metric", "upper", "ci", "no"], "metric upper is the CI's upper end: it needs ci LO HI"),
    (["e", "halt", "1", "error", "maybe"], "error must be hard or soft or continue, got 'maybe'"),
    (["e", "halt", "1", "message", "maybe"], "message must be yes or no"),
    (["e", "error", "hard"], "keyword error needs halt THRESH"),
    (["e", "halt", "1", "over", "3", "within", "2"], "N must be at least K"),
    (["e", "halt", "1", "over", "0"], "halt ... over must be a positive integer"),
    (["e", "every"], "keyword every needs N"),
    (["e", "dump", "f", "1", "max", "0"], "dump ... max must be a positive integer"),
    (["e", "append", "yes"], "append yes continues the log and dump files: it needs log FILE"),
    (["e", "log", "l", "append", "1"], "append must be yes or no"),
])
def test_bad_keywords_are_named(args, message):
    with pytest.raises(LTAUError, match=message):
        FixOptions.parse(args)


@pytest.mark.parametrize("k,n,fires_at", [
    (1, None, [1, 3, 4, 6, 7, 8, 9]),      # every evaluation over the threshold
    (3, None, [8]),                        # 3 in a row: evaluations 6, 7, 8
    (2, 3, [3, 6, 8]),                     # 2 of the last 3, starting over after each alarm
    (3, 5, [4, 8]),
])
def test_persistence_fires_exactly_at_the_kth_of_n(k, n, fires_at):
    sequence = [False, True, False, True, True, False, True, True, True, True]
    rule = Persistence(k, n)
    assert [i for i, over in enumerate(sequence) if rule.update(over)] == fires_at


def test_pair_style_keywords():
    assert PairOptions.parse([]) == PairOptions(allow_pickle=False, family=None)
    assert PairOptions.parse("allow_pickle yes family mace".split()) == PairOptions(True, "mace")
    for words, message in ((["allow_pickle"], "keyword allow_pickle needs yes|no"),
                           (["allow_pickle", "1"], "allow_pickle must be yes or no"),
                           (["family", "schnet"], "family must be ltau_local or mace or nequip or allegro"),
                           (["trust", "yes"], "unknown keyword 'trust'")):
        with pytest.raises(LTAUError, match=message):
            PairOptions.parse(words)


def test_step_log_appends_only_when_asked_and_never_repeats_a_step(tmp_path):
    path = tmp_path / "ltau.log"
    log = StepLog(path, ["step", "max"])
    log.start(0, ["u: metric expected (eV/Angstrom)", "  halt when > 0.5"])
    assert log.write(0, [0.5]) and log.write(10, [0.25])
    again = StepLog(path, ["step", "max"], append=True)          # a restart: append yes
    assert again.last_step == 10
    again.start(10, ["u: continued"])
    assert not again.write(10, [0.9])                # re-evaluated first step of the continued run
    assert again.write(20, [1])
    lines = path.read_text().splitlines()
    assert lines == ["# fix ltau u: metric expected (eV/Angstrom)", "#   halt when > 0.5", "# step max",
                     "0 0.5", "10 0.25", "# fix ltau u: continued", "# step max", "20 1"]
    np.testing.assert_array_equal(np.loadtxt(path), [[0, 0.5], [10, 0.25], [20, 1]])


def test_step_log_starts_afresh_by_default(tmp_path):
    """The same input run again (another temperature) must not keep the first run's lines."""
    path = tmp_path / "ltau.log"
    first = StepLog(path, ["step", "max"])
    first.start(0, ["u: first run"])
    first.write(0, [0.5])
    second = StepLog(path, ["step", "max"])
    second.start(0, ["u: second run"])
    assert second.write(0, [3.0])
    assert path.read_text().splitlines() == ["# fix ltau u: second run", "# step max", "0 3"]


def test_append_onto_later_steps_stops_naming_the_file(tmp_path):
    path = tmp_path / "ltau.log"
    log = StepLog(path, ["step", "max"])
    log.start(0, [])
    log.write(0, [0.5]), log.write(100, [0.5])
    again = StepLog(path, ["step", "max"], append=True)
    with pytest.raises(LTAUError, match=f"log {path}: the file already holds step 100, after step 50"):
        again.start(50, [])
    log.start(100, [])                               # a second run of the same fix goes on: fine
    with pytest.raises(LTAUError, match="already holds step 100, after step 0 .*reset_timestep"):
        log.start(0, [])                             # reset_timestep between runs
    dump = FrameDump(tmp_path / "f.xyz")
    dump.write(_frame(40), 40)
    with pytest.raises(LTAUError, match="dump .*f.xyz: the file already holds step 40, after step 30"):
        FrameDump(tmp_path / "f.xyz", append=True).start(30)
    FrameDump(tmp_path / "f.xyz", append=True).start(40)


def test_fix_files_never_overwrite_a_users_file(tmp_path):
    script = tmp_path / "in.lammps"
    script.write_text("units metal\n")
    with pytest.raises(LTAUError, match=f"log {script}: exists and is not a fix ltau log; refusing"):
        StepLog(script, ["step"])
    with pytest.raises(LTAUError, match=f"dump {script}: exists and is not a fix ltau dump; refusing"):
        FrameDump(script)
    assert script.read_text() == "units metal\n"
    (tmp_path / "taken").write_text("x")
    with pytest.raises(LTAUError, match=f"dump {tmp_path}/taken/f.xyz: cannot create its folder: "
                                        f"{tmp_path}/taken is a file"):
        FrameDump(tmp_path / "taken" / "f.xyz")
    with pytest.raises(LTAUError, match=f"log {tmp_path}: is a folder"):
        StepLog(tmp_path, ["step"])


def _frame(step, n=3):
    atoms = Atoms("Si" * n, positions=np.arange(3 * n, dtype=float).reshape(n, 3), cell=[5, 5, 5], pbc=True)
    atoms.info.update(timestep=step, ltau_metric="expected")
    atoms.arrays["ltau_expected"] = np.linspace(0.1, 0.3, n)
    return atoms


def test_frame_dump_recovers_steps_and_cuts_a_torn_frame(tmp_path):
    path = tmp_path / "frames.xyz"
    dump = FrameDump(path)
    dump.write(_frame(5), 5)
    dump.write(_frame(9), 9)
    whole = path.read_bytes()
    path.write_bytes(whole + b"3\nLattice=\"5 0 0 0 5 0 0 0 5\" timestep=12\nSi 0 0 0\n")  # torn write
    again = FrameDump(path, append=True)
    assert again.steps == [5, 9]
    assert path.read_bytes() == whole
    frames = read(path, ":")
    assert [f.info["timestep"] for f in frames] == [5, 9]
    np.testing.assert_allclose(frames[1].arrays["ltau_expected"], [0.1, 0.2, 0.3])
    fresh = FrameDump(path)                          # a new run: an earlier ltau dump starts afresh
    assert fresh.steps == [] and path.read_bytes() == b""


def test_frame_dump_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.xyz"
    path.write_text("hello\nworld\n")
    with pytest.raises(LTAUError, match="append yes: not an extended-XYZ file"):
        FrameDump(path, append=True)
