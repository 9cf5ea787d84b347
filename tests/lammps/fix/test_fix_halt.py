"""fix ltau's halt and LAMMPS run-loop semantics: hard halt on every rank at the known step, the fix
halt idiom, halt modes and the next run, halt ... over N, a redefined pair style, minimize,
run pre no, rerun, extra force calls within a step."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from helpers.fix_ltau import (BASE, EVERY, STEPS, assert_values_describe, custom_dumps, first_run_of, in_process,
                              read_log, run_script)
from helpers.mpi_run import per_rank

from ltau_lmp.model import LocalForceField, save_model


# --------------------------------------------------------------------------------------------
# halt: hard (error on every rank at the known step), the fix halt idiom
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
    log = read_log(tmp_path / "halt.log")
    assert log[-1, 0] == r["halt_step"] and log[-1, 1] > r["halt"]
    assert np.all(log[:-1, 1] <= r["halt"]) and log[-1, 5] >= 1

    # the native lmp binary (embedded Python) exits non-zero with the message, no hang
    res = run_script(tmp_path, script, launcher="lmp")
    assert res.returncode != 0
    assert f"condition met on step {r['halt_step']} " in res.stdout + res.stderr, \
        res.stdout[-2000:] + res.stderr[-2000:]


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
    dumps = custom_dumps(tmp_path, "risky")
    assert list(dumps) == [r["halt_step"]]
    assert dumps[r["halt_step"]][:, 4].max() == pytest.approx(r["halt_value"], rel=1e-6)


# --------------------------------------------------------------------------------------------
# LAMMPS run-loop semantics: fix halt's modes, redefinition, minimize, pre no, rerun, swaps
# --------------------------------------------------------------------------------------------

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
    _, error = in_process(script, log=tmp_path / "log.lammps")
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
    same, error = in_process(head + f"pair_style ltau\npair_coeff * * {files['model_file']} Si\nrun 10\n")
    assert error == "" and same["step"] == 20
    assert_values_describe(files, same)
    _, error = in_process(head + f"pair_style ltau\npair_coeff * * {tmp_path / 'other.pt'} Si\nrun 10\n")
    assert "was built for model" in error and "no features" not in error, error
    _, error = in_process(head + "pair_style zero 4.0\npair_coeff * *\nrun 10\n")
    assert "Fix ltau" in error and "requires pair_style ltau" in error, error
    # a new pair style object (hybrid in between) without pair_coeff yet
    _, error = in_process(head + "pair_style zero 4.0\npair_coeff * *\npair_style ltau\nrun 10\n")
    assert "All pair coeffs are not set" in error or "pair_coeff" in error, error


def test_minimize_evaluates_at_the_minimizer_force_calls(files, tmp_path):
    script = BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every 1 log {tmp_path}/min.log
        minimize 0 0 8 1000
        """)
    state, error = in_process(script)
    assert error == "" and state["step"] == 8
    assert_values_describe(files, state)        # the values describe the minimized structure
    np.testing.assert_array_equal(read_log(tmp_path / "min.log")[:, 0], np.arange(0, 9))
    # a soft halt ends the minimization at the first check over the threshold
    state, error = in_process(BASE.format(model=files["model_file"]) +
                               f"fix u all ltau {files['est']} every 2 halt 0.0\nminimize 0 0 8 1000\n")
    assert error == "" and state["step"] == 2


def test_run_pre_no_post_no_continues_the_log(files, tmp_path):
    script = BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every {EVERY} log {tmp_path}/pre.log
        run 10
        run 10 pre no post no
        run 10 pre no post no
        """)
    state, error = in_process(script)
    assert error == "" and state["step"] == 30
    assert_values_describe(files, state)
    np.testing.assert_array_equal(read_log(tmp_path / "pre.log")[:, 0], np.arange(0, 31, EVERY))


def test_rerun_reproduces_the_values_of_the_original_run(files, reference, tmp_path):
    """rerun: each frame read back gets the same per-atom values as in the run that wrote it."""
    _, error = in_process(BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        dump x all custom 10 {tmp_path}/traj.dump id type x y z
        dump_modify x format float %.17g sort id
        run {STEPS}
        """))
    assert error == ""
    _, error = in_process(BASE.format(model=files["model_file"]) + textwrap.dedent(f"""\
        fix u all ltau {files['est']} every 10 metric distance log {tmp_path}/rerun.log
        dump d all custom 10 {tmp_path}/re.* id f_u[1] f_u[2] f_u[3] f_u[4]
        dump_modify d format float %.17g
        rerun {tmp_path}/traj.dump dump x y z
        """))
    assert error == ""
    rerun = custom_dumps(tmp_path, "re")
    assert sorted(rerun) == list(range(0, STEPS + 1, 10))
    for step, rows in rerun.items():
        np.testing.assert_allclose(rows, reference["dumps"][step], rtol=1e-9, atol=1e-12, err_msg=f"step {step}")
    np.testing.assert_array_equal(read_log(tmp_path / "rerun.log")[:, 0], np.arange(0, STEPS + 1, 10))


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
    state, error = in_process(script)
    assert error == "" and state["step"] == 20
    assert float((tmp_path / "accepted.txt").read_text()) > 0        # swaps really happened
    assert_values_describe(files, state)
    np.testing.assert_array_equal(read_log(tmp_path / "swap.log")[:, 0], np.arange(0, 21, EVERY))


# --------------------------------------------------------------------------------------------
# persistence: halt ... over N
# --------------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_halt_over_n_fires_at_the_nth_consecutive_evaluation_on_every_rank(files, reference, tmp_path):
    """The condition's sequence comes from the 1-rank reference log (setup, step 0, never counts);
    with `over 2` the halt must come at the second evaluation in a row over the threshold."""
    log = reference["log"][1:]                        # step 0 is the setup evaluation
    thresh = float(np.median(log[:, 1]))
    steps, flags = log[:, 0].astype(int).tolist(), (log[:, 1] > thresh).tolist()
    want = first_run_of(flags, steps, 2)
    assert want is not None and want != first_run_of(flags, steps, 1), "the sequence must test persistence"
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
