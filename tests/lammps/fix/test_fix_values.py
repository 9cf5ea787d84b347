"""fix ltau's values: per-atom values equal LTAUEstimator.query, never silently zero, 1 rank = 2 ranks
(also for the out-of-domain p-value column), and the frame dump follows the log.

The ``mpi`` tests launch ``mpirun -np 2`` with a timeout, so a hang fails the test instead of the suite."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

from helpers.fix_ltau import BASE, EVERY, REF_SCRIPT, STEPS, custom_dumps, final_state, first_run_of, read_log, run_script
from helpers.mpi_run import per_rank

from ltau_lmp.calculator import LTAUCalculator
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.calibration import thresholds_for


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
    full, cut = reference["dumps"], custom_dumps(tmp_path, "ref")
    assert sorted(cut) == sorted(full)
    for step, rows in cut.items():
        np.testing.assert_array_equal(rows[:, [0, 1, 4]], full[step][:, [0, 1, 4]])
        assert np.all(rows[:, 2:4] == 0.0) and np.all(full[step][:, 3] > 0)
    np.testing.assert_array_equal(read_log(tmp_path / "ref.log"), reference["log"])


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
    res = run_script(tmp_path, script)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    two = custom_dumps(tmp_path, "two")
    assert sorted(two) == sorted(reference["dumps"])
    for step, rows in two.items():
        ref = reference["dumps"][step]
        np.testing.assert_array_equal(rows[:, 0], ref[:, 0])
        np.testing.assert_allclose(rows[:, 1:], ref[:, 1:], rtol=1e-6, atol=1e-9, err_msg=f"step {step}")
    np.testing.assert_array_equal(two[0][:, 1:], reference["dumps"][0][:, 1:])  # before any dynamics

    log2 = read_log(tmp_path / "two.log")
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
        state = final_state(lmp)
        assert lmp.extract_fix("u", 0, 0) == pytest.approx(state["peratom"][:, 4].min())      # f_u = min p
        assert lmp.extract_fix("u", 0, 1, 5) == pytest.approx(state["peratom"][:, 4].min())   # f_u[6]
    finally:
        lmp.close()
    atoms = Atoms("Si" * len(state["x"]), positions=state["x"], cell=state["cell"], pbc=True)
    atoms.calc = LTAUCalculator(files["model"])
    atoms.get_potential_energy()
    np.testing.assert_allclose(state["peratom"][:, 4], est.query(atoms.calc.results["latent"]).ood, rtol=1e-12)

    log = read_log(tmp_path / "one.log")
    steps, flags = log[1:, 0].astype(int).tolist(), (log[1:, 1] <= threshold * (1 + 1e-5)).tolist()  # %.6g
    want = first_run_of(flags, steps, 2)
    assert want is not None, f"the p-values never reach {threshold}: {log[:, 1]}"
    scripts = {name: OOD_SCRIPT.format(model=files["model_file"], est=files["est_ood"], every=EVERY, halt=halt,
                                       log=f"{name}.log", dumps=name, steps=STEPS)
               for name, halt in (("two", ""), ("halt", "halt auto over 2 error hard"))}
    got = per_rank(tmp_path, scripts)
    for rank in (0, 1):
        assert got["two"][rank] == "OK", got["two"]
        assert f"condition met on step {want} " in got["halt"][rank] and "ood uncertainty is at or below the " \
            f"halt threshold {threshold:g}" in got["halt"][rank], (rank, want, got["halt"])
    one, two = custom_dumps(tmp_path, "one"), custom_dumps(tmp_path, "two")
    p_values = np.concatenate([rows[:, 5] for rows in one.values()])
    assert np.all((p_values > 0) & (p_values <= 1)) and len(np.unique(p_values)) > 1
    assert sorted(two) == sorted(one) == list(range(0, STEPS + 1, EVERY))
    assert sorted(custom_dumps(tmp_path, "halt")) == [s for s in sorted(one) if s < want]  # halt precedes output
    for step, rows in two.items():
        np.testing.assert_array_equal(rows[:, 0], one[step][:, 0])
        np.testing.assert_allclose(rows[:, 1:], one[step][:, 1:], rtol=1e-6, atol=1e-9, err_msg=f"step {step}")
