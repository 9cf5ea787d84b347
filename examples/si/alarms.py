"""Alarms set from the training data alone: false alarms in domain, warning before failure.

    python examples/si/alarms.py [--run examples/si/run] [--out doc/validation] [--ranks 2]

Uses only what `ltau-lmp train` left in RUN: the model and the estimator with its recommended
thresholds (`halt auto`: expected error and OOD p-value for the false-alarm rate it was built
with, from held-out validation atoms). Nothing is tuned on the runs judged here.

0. Calibration of the persistence rule (no labels): an NVT run at the hottest training
   temperature, 1200 K (other seed), the edge of the training domain where in-domain alarms
   are most frequent; the recommended rule is the least persistent one without an alarm there.
1. Judged: in-domain NVT, 216 atoms at 1000 K, --steps steps on --ranks MPI ranks.
2. Judged: heating ramp 300 -> 3000 K over --steps steps (every evaluated frame dumped, true
   errors from Stillinger-Weber): the step where the true max force error first passes --failure.
All runs carry two fix ltau (metric expected, metric ood) with `halt auto over 1000000000
error continue`: they never halt, but their logs count, at every evaluation, the atoms over the
automatic threshold (`n_over_halt`), exactly what `halt auto over K within N` acts on
(`ltau_lmp.lammps.fix.Persistence`). From those logs, for every rule: false alarms per 10,000
in-domain steps and the lead time of the first alarm in the ramp. A last NVT run at 1000 K with
`metric ood halt auto over K within N error soft` (the recommended rule) checks it for real.
Writes OUT/alarms.json and OUT/alarm_timeline.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))
from demo import sh, stage  # noqa: E402

# halt ... over K within N, least persistent first
PERSISTENCE = ((1, 1), (2, 2), (3, 3), (2, 5), (3, 5), (3, 10), (4, 10), (5, 10), (5, 5), (6, 20), (8, 20))
NEVER = 1_000_000_000

SCRIPT = """\
units           metal
atom_style      atomic
boundary        p p p
lattice         diamond 5.431
region          box block 0 3 0 3 0 3
create_box      1 box
create_atoms    1 box
mass            1 28.0855
pair_style      ltau
pair_coeff      * * {model} Si
velocity        all create {t0} {seed} mom yes rot yes dist gaussian
timestep        0.001
fix             md all nvt temp {t0} {t1} 0.1
fix             e all ltau {estimator} every {every} metric expected halt auto {halt_e} log {name}_expected.log {dump}
fix             o all ltau {estimator} every {every} metric ood halt auto {halt_o} log {name}_ood.log
thermo          1000
thermo_style    custom step temp pe f_e f_o
run             {steps}
print           "{name} ENDED AT $(step)"
"""


def read_log(path: Path) -> np.ndarray:
    """fix ltau log: step worst mean quantile n_over_dump n_over_halt max_distance worst_tag."""
    return np.loadtxt(path, comments="#", ndmin=2)


def alarms(log: np.ndarray, k: int, n: int) -> list[int]:
    """Steps where `halt auto over k within n` fires (setup evaluations at step 0 never count)."""
    from ltau_lmp.lammps.fix import Persistence

    rule = Persistence(k, n)
    return [int(step) for step, over in zip(log[:, 0], log[:, 5]) if step > 0 and rule.update(over > 0)]


def rule_name(k: int, n: int) -> str:
    return f"over {k}" + (f" within {n}" if n > k else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=HERE / "run", help="ltau-lmp train output (model.pt, estimator/)")
    parser.add_argument("--out", type=Path, default=ROOT / "doc" / "validation")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "alarms")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--failure", type=float, default=1.0, help="true max force error (eV/A) = failure")
    args = parser.parse_args()
    from ltau_lmp.estimator import LTAUEstimator

    model, estimator = args.run / "model.pt", args.run / "estimator"
    thresholds = LTAUEstimator.load(estimator).alarm_thresholds
    if thresholds is None:
        sys.exit(f"{estimator} has no recommended thresholds: retrain with held-out validation atoms")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in work.iterdir():
        old.unlink()
    mpirun = [BIN / "mpirun", "-np", args.ranks, BIN / "ltau-lmp", "run"]
    common = dict(model=model.resolve(), estimator=estimator.resolve(), every=args.every, steps=args.steps,
                  halt_e=f"over {NEVER} error continue", halt_o=f"over {NEVER} error continue")

    stage(f"0/3 calibration of the persistence rule: NVT at 1200 K (hottest training data), {args.steps} steps")
    (work / "in.calib").write_text(SCRIPT.format(name="calib", t0=1200, t1=1200, dump="", seed=1234567, **common))
    sh(*mpirun, "in.calib", "-log", "log.calib", cwd=work)
    stage(f"1/3 in-domain NVT at 1000 K, {args.steps} steps, {args.ranks} ranks")
    (work / "in.nvt").write_text(SCRIPT.format(name="nvt", t0=1000, t1=1000, dump="", seed=4928459, **common))
    sh(*mpirun, "in.nvt", "-log", "log.nvt", cwd=work)
    stage(f"2/3 heating ramp 300 -> 3000 K over {args.steps} steps; true errors of every frame")
    (work / "in.heat").write_text(SCRIPT.format(name="heat", t0=300, t1=3000, dump="dump heat_frames.xyz 0.0",
                                                seed=4928459, **common))
    sh(*mpirun, "in.heat", "-log", "log.heat", cwd=work)
    from ltau_lmp.evaluation.failure import failure_timeline
    from ltau_lmp.evaluation.metrics import first_crossing

    timeline = failure_timeline(work / "heat_frames.xyz", model, thresholds["expected"], args.failure)
    failure_step = first_crossing(timeline.steps, timeline.true_max, args.failure)

    report = {"thresholds": thresholds, "steps": args.steps, "every": args.every, "ranks": args.ranks,
              "failure_threshold": args.failure, "true_failure_step": failure_step, "persistence": {}}
    recommended = {}
    for metric in ("expected", "ood"):
        calib, nvt, heat = (read_log(work / f"{name}_{metric}.log") for name in ("calib", "nvt", "heat"))
        for k, n in PERSISTENCE:
            in_domain, ramp = alarms(nvt, k, n), alarms(heat, k, n)
            first = ramp[0] if ramp else None
            report["persistence"][f"{metric} {rule_name(k, n)}"] = {
                "calibration_alarms": len(alarms(calib, k, n)),
                "false_alarms_per_10k_steps": len(in_domain) * 10_000 / args.steps,
                "first_false_alarm_step": in_domain[0] if in_domain else None,
                "ramp_alarm_step": first,
                "lead_steps": failure_step - first if first is not None and failure_step is not None else None}
        quiet = [(k, n) for k, n in PERSISTENCE if not alarms(calib, k, n)]
        recommended[metric] = rule_name(*(quiet[0] if quiet else PERSISTENCE[-1]))
    report["recommended"] = recommended

    stage(f"3/3 check: in-domain NVT at 1000 K with metric ood halt auto {recommended['ood']} error soft")
    (work / "in.check").write_text(SCRIPT.format(
        name="check", t0=1000, t1=1000, dump="", seed=4928459,
        **{**common, "halt_o": f"{recommended['ood']} error soft"}))
    result = sh(*mpirun, "in.check", "-log", "log.check", cwd=work)
    ended = [line for line in (work / "log.check").read_text().splitlines() if line.startswith("check ENDED AT")]
    report["check_run"] = {"returncode": result.returncode, "ended_at": int(ended[-1].split()[-1]) if ended else None,
                           "halted": "condition met" in (work / "log.check").read_text()}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alarms.json").write_text(json.dumps(report, indent=2))
    plot(work, timeline, thresholds, failure_step, args.failure, args.out / "alarm_timeline.png")
    print(f"\nthresholds from the training data: {thresholds}")
    print(f"true max force error passes {args.failure} eV/A at step {failure_step} of the ramp")
    print("| alarm | alarms in the 1200 K calibration run | false alarms / 10k steps at 1000 K | ramp alarm step "
          "| lead (steps) |\n|---|---:|---:|---:|---:|")
    for name, row in report["persistence"].items():
        print(f"| {name} | {row['calibration_alarms']} | {row['false_alarms_per_10k_steps']:g} | "
              f"{row['ramp_alarm_step']} | {row['lead_steps']} |")
    print(f"recommended (least persistent rule quiet in the calibration run): {recommended}")
    print(f"check run (metric ood halt auto {recommended['ood']} error soft): ended at step "
          f"{report['check_run']['ended_at']}, halted: {report['check_run']['halted']}")


def plot(work: Path, timeline, thresholds: dict, failure_step, failure: float, path: Path) -> None:
    """Ramp: min p (ood) and max expected error against the true max error, with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood, expected = read_log(work / "heat_ood.log"), read_log(work / "heat_expected.log")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.semilogy(timeline.steps, timeline.true_max, color="k", label="true max force error")
    top.semilogy(expected[:, 0], expected[:, 1], color="C0", label="max expected error (LTAU)")
    top.axhline(thresholds["expected"], color="C0", ls="--", label="auto threshold (expected)")
    top.axhline(failure, color="k", ls=":", label=f"failure ({failure} eV/Å)")
    top.set_ylim(bottom=1e-3)           # step 0 is the perfect lattice: errors ~1e-13
    top.set_ylabel("eV/Å")
    top.legend(fontsize=8)
    bottom.semilogy(ood[:, 0], ood[:, 1], color="C1", label="min OOD p-value")
    bottom.axhline(thresholds["ood"], color="C1", ls="--", label="auto threshold (ood)")
    bottom.set_ylabel("p-value")
    bottom.set_xlabel("MD step (300 → 3000 K)")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        if failure_step is not None:
            ax.axvline(failure_step, color="k", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
