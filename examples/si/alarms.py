"""Alarms set from the training data alone: false alarms in domain, warning before failure.

    python examples/si/alarms.py [--run runs/demo/run] [--out doc/validation] [--ranks 2]

Uses only what `ltau-lmp train` left in RUN: the model and the estimator with its recommended
thresholds (`halt auto`: fitted from the held-out validation atoms for a false-alarm rate per
evaluation of all watched atoms; the fix scales them to the 216 atoms here). Nothing is tuned
on the runs judged here, and there is no persistence rule to pick: `halt auto` fires at the
first evaluation over the threshold.

Both runs carry two fix ltau (metric expected, metric ood) with `halt auto over 1000000000
error continue`: they never halt, but their logs count, at every evaluation, the atoms over the
automatic threshold (`n_over_halt`), exactly what `halt auto` acts on. Every evaluated frame is
dumped and its true errors computed with Stillinger-Weber.
1. In-domain NVT, 216 atoms at 1000 K, --steps steps on --ranks MPI ranks: the alarms, and the
   true max force error at each (is the alarm false?).
2. Heating ramp 300 -> 3000 K over --steps steps: the step where the true max force error
   first passes --failure, and where each `halt auto` fires.
From the logs also the rules `halt auto over K` (K evaluations in a row, K = 1, 2, 3) for
comparison. Writes OUT/alarms.json and OUT/alarm_timeline.png.
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

PERSISTENCE = (1, 2, 3)   # halt auto over K
NEVER = f"over {1_000_000_000} error continue"
N_ATOMS = 216

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
fix             e all ltau {estimator} every {every} metric expected halt auto {never} log {name}_expected.log {dump}
fix             o all ltau {estimator} every {every} metric ood halt auto {never} log {name}_ood.log
thermo          1000
thermo_style    custom step temp pe f_e f_o
run             {steps}
print           "{name} ENDED AT $(step)"
"""


def read_log(path: Path) -> np.ndarray:
    """fix ltau log: step worst mean quantile n_over_dump n_over_halt max_distance worst_tag."""
    return np.loadtxt(path, comments="#", ndmin=2)


def alarms(log: np.ndarray, k: int) -> list[int]:
    """Steps where `halt auto over k` fires (setup evaluations at step 0 never count)."""
    from ltau_lmp.lammps.fix import Persistence

    rule = Persistence(k)
    return [int(step) for step, over in zip(log[:, 0], log[:, 5]) if step > 0 and rule.update(over > 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo" / "run",
                        help="ltau-lmp train output (model.pt, estimator/)")
    parser.add_argument("--out", type=Path, default=ROOT / "doc" / "validation")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "alarms")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--failure", type=float, default=1.0, help="true max force error (eV/A) = failure")
    args = parser.parse_args()
    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.estimator.calibration import thresholds_for

    model, estimator = args.run / "model.pt", args.run / "estimator"
    recommended = LTAUEstimator.load(estimator).alarm_thresholds
    if recommended is None:
        sys.exit(f"{estimator} has no recommended thresholds: retrain with held-out validation atoms")
    thresholds = thresholds_for(recommended, N_ATOMS)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in work.iterdir():
        old.unlink()
    mpirun = [BIN / "mpirun", "-np", args.ranks, BIN / "ltau-lmp", "run"]
    common = dict(model=model.resolve(), estimator=estimator.resolve(), every=args.every, steps=args.steps,
                  never=NEVER, seed=4928459)

    stage(f"1/2 in-domain NVT at 1000 K, {args.steps} steps, {args.ranks} ranks; true errors of every frame")
    (work / "in.nvt").write_text(SCRIPT.format(name="nvt", t0=1000, t1=1000, dump="dump nvt_frames.xyz 0.0",
                                               **common))
    sh(*mpirun, "in.nvt", "-log", "log.nvt", cwd=work)
    stage(f"2/2 heating ramp 300 -> 3000 K over {args.steps} steps; true errors of every frame")
    (work / "in.heat").write_text(SCRIPT.format(name="heat", t0=300, t1=3000, dump="dump heat_frames.xyz 0.0",
                                                **common))
    sh(*mpirun, "in.heat", "-log", "log.heat", cwd=work)
    from ltau_lmp.evaluation.failure import failure_timeline
    from ltau_lmp.evaluation.metrics import first_crossing

    timeline = failure_timeline(work / "heat_frames.xyz", model, thresholds["expected"], args.failure)
    failure_step = first_crossing(timeline.steps, timeline.true_max, args.failure)
    in_domain = failure_timeline(work / "nvt_frames.xyz", model, thresholds["expected"], args.failure)
    nvt_true = dict(zip(np.asarray(in_domain.steps).tolist(), np.asarray(in_domain.true_max).tolist()))
    nvt_max = np.asarray(in_domain.true_max)[1:]   # step 0 is the perfect lattice

    report = {"recommended": recommended, "thresholds_216_atoms": thresholds, "steps": args.steps,
              "every": args.every, "ranks": args.ranks, "failure_threshold": args.failure,
              "true_failure_step": failure_step,
              "nvt_true_max_error": {"median": float(np.median(nvt_max)), "p99": float(np.quantile(nvt_max, 0.99)),
                                     "max": float(nvt_max.max()),
                                     "first_step_over_failure": first_crossing(in_domain.steps, in_domain.true_max,
                                                                               args.failure)},
              "rules": {}}
    for metric in ("expected", "ood"):
        nvt, heat = (read_log(work / f"{name}_{metric}.log") for name in ("nvt", "heat"))
        for k in PERSISTENCE:
            found, ramp = alarms(nvt, k), alarms(heat, k)
            first = ramp[0] if ramp else None
            report["rules"][f"{metric} halt auto" + (f" over {k}" if k > 1 else "")] = {
                "in_domain_alarms_per_10k_steps": len(found) * 10_000 / args.steps,
                "in_domain_alarm_steps": found,
                "true_max_error_at_in_domain_alarms": [round(nvt_true[s], 4) for s in found],
                "ramp_alarm_step": first,
                "lead_steps": failure_step - first if first is not None and failure_step is not None else None}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alarms.json").write_text(json.dumps(report, indent=2))
    plot(work, timeline, thresholds, failure_step, args.failure, args.out / "alarm_timeline.png")
    print(f"\nthresholds from the training data for {N_ATOMS} watched atoms: {thresholds}")
    print(f"true max force error passes {args.failure} eV/A at step {failure_step} of the ramp")
    print(f"1000 K run, true max force error per frame: {report['nvt_true_max_error']}")
    print("| alarm | alarms / 10k steps at 1000 K (true max error there) | ramp alarm step | lead (steps) |\n"
          "|---|---|---:|---:|")
    for name, row in report["rules"].items():
        print(f"| {name} | {row['in_domain_alarms_per_10k_steps']:g} {row['true_max_error_at_in_domain_alarms']} | "
              f"{row['ramp_alarm_step']} | {row['lead_steps']} |")


def plot(work: Path, timeline, thresholds: dict, failure_step, failure: float, path: Path) -> None:
    """Ramp: min p (ood) and max expected error against the true max error, with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood, expected = read_log(work / "heat_ood.log"), read_log(work / "heat_expected.log")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.semilogy(timeline.steps, timeline.true_max, color="k", label="true max force error")
    top.semilogy(expected[:, 0], expected[:, 1], color="C0", label="max expected error (LTAU)")
    top.axhline(thresholds["expected"], color="C0", ls="--", label=f"auto threshold (expected, {N_ATOMS} atoms)")
    top.axhline(failure, color="k", ls=":", label=f"failure ({failure} eV/Å)")
    top.set_ylim(bottom=1e-3)           # step 0 is the perfect lattice: errors ~1e-13
    top.set_ylabel("eV/Å")
    top.legend(fontsize=8)
    bottom.semilogy(ood[:, 0], np.maximum(ood[:, 1], 1e-300), color="C1", label="min OOD p-value")
    bottom.axhline(thresholds["ood"], color="C1", ls="--", label=f"auto threshold (ood, {N_ATOMS} atoms)")
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
