"""What fix ltau tells the user: bad input stops every rank with the cause and a non-zero exit (no
hang), non-finite model output names the atoms, the init report, warnings."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers.fix_ltau import BASE, EVERY, in_process, run_script
from helpers.mpi_run import per_rank

from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.calibration import thresholds_for


# --------------------------------------------------------------------------------------------
# bad input: LAMMPS error naming the cause on both ranks, non-zero exit, no hang
# --------------------------------------------------------------------------------------------

BAD = {
    "unknown_keyword": ("{est} every 5 colour red", "unknown keyword 'colour'"),
    "missing_estimator": ("/nonexistent/estimator", "estimator directory not found"),
    "corrupt_estimator": ("{est_corrupt}", "pdf_blocks.npy"),
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
    res = run_script(tmp_path, BASE.format(model=files["model_file"]) + "fix u all ltau " + args.format(**files) + "\n",
                      launcher=launcher)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# what a user sees: non-finite model output, the init report, warnings
# --------------------------------------------------------------------------------------------

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
    _, error = in_process(script, log=tmp_path / "log.lammps")
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
    _, error = in_process(script, log=tmp_path / "log.lammps")
    assert error == ""
    text = (tmp_path / "log.lammps").read_text()
    assert f"WARNING: Fix ltau u: estimator {unchecked} is unchecked (it records no model hash)" in text
    assert "WARNING: Fix ltau u: its group has no atoms" in text
    row = text.splitlines()[text.splitlines().index(next(l for l in text.splitlines() if l.split()[:1] == ["Step"])) + 1]
    assert row.split()[2:] == ["1", "1", "1"], row      # worst p-value, mean, min p-value: 1, never -0
