"""LTAU for a MACE model trained by MACE's own trainer, end to end (what `make demo-mace` runs).

    python examples/mace_si/demo.py [--out runs/mace_demo] [--ranks 2]

1. reference data: the Stillinger-Weber sets of examples/si (crystal 300-1200 K for training;
   liquid, amorphous, defects, compression out of domain)
2. `ltau-lmp mace-train`: MACE's unchanged mace_run_train, every training atom's force error
   logged each epoch -> MACE model + LTAU estimator of its latent features
3. evaluation on the labelled sets (calibration, Spearman, out-of-domain ROC); the halt threshold
   for step 5 is taken here, from the in-domain test set: just above its largest expected error
4. LAMMPS NVT with pair_style ltau (the MACE model) + fix ltau on N MPI ranks (one cutoff of
   ghost atoms and a ghost exchange after each layer: exact)
5. heating ramp 300 -> 3000 K until fix ltau's halt fires, then on to the end of the ramp
   without halting (error continue), and the true errors of every evaluated frame: did the
   alarm come before the model failed? By default on one rank, where the graph is folded onto
   the atoms (no ghost node at all), the cheapest for this 216-atom cell on 2 cores.
Each stage is the command a user would type; the commands are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "examples" / "si"))
from demo import sh, stage  # noqa: E402  (the silicon demo's command runner)


def mace_train_command(config: dict, data: Path, work: Path) -> list[str]:
    """`ltau-lmp mace-train [ltau options] -- [mace_run_train arguments]` from config.yaml."""
    ltau = config["ltau"]
    cmd = [str(BIN / "ltau-lmp"), "mace-train", "--skip-epochs", str(ltau["skip_epochs"]), "--lo", str(ltau["lo"]),
           "--hi", str(ltau["hi"]), "--nbins", str(ltau["nbins"]), "--index", ltau["index"], "-k", str(ltau["k"]),
           "-o", str(work / "ltau"), "--overwrite", "--"]
    mace = {**config["mace"], "train_file": str(data / "train.xyz"), "work_dir": str(work)}
    for key, value in mace.items():
        cmd.append(f"--{key}={value}")
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mace_demo")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks of the NVT run")
    parser.add_argument("--ramp-ranks", type=int, default=1, help="MPI ranks of the heating ramp")
    parser.add_argument("--failure", type=float, default=1.0,
                        help="true max force error (eV/Angstrom) that counts as the model failing")
    parser.add_argument("--nvt-steps", type=int, default=100, help="steps of the NVT run")
    parser.add_argument("--heat-steps", type=int, default=3000, help="steps of the 300 -> 3000 K ramp")
    parser.add_argument("--every", type=int, default=10, help="fix ltau every N steps")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the data and the trained model of an earlier run in --out (MD and analysis only)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    config = yaml.safe_load((HERE / "config.yaml").read_text())
    data, work, md = out / "data", out / "mace", out / "md"
    md.mkdir(exist_ok=True)
    model, estimator = work / f"{config['mace']['name']}.model", work / "ltau" / "estimator"

    reuse = args.reuse and (data / "test.xyz").is_file() and (estimator / "meta.json").is_file()
    times = {}
    if not reuse:
        t = stage("1/5 reference data (LAMMPS, Stillinger-Weber; the sets of examples/si)")
        generate = yaml.safe_load((HERE / config["data"]).read_text())
        generate["generate"]["out_dir"] = str(data)
        (out / "generate.yaml").write_text(yaml.safe_dump({"generate": generate["generate"]}, sort_keys=False))
        sh(BIN / "ltau-lmp", "generate", out / "generate.yaml", "--overwrite")  # a rerun replaces the earlier outputs
        times["generate"] = time.perf_counter() - t

        t = stage("2/5 MACE's own trainer, every training atom's force error logged every epoch")
        sh(*mace_train_command(config, data, work))
        times["train"] = time.perf_counter() - t

    t = stage("3/5 evaluate LTAU on the labelled sets")
    sh(BIN / "ltau-lmp", "evaluate", "--model", model, "--allow-pickle", "--estimator", estimator,
       "--data-dir", data, "-o", out / "evaluation", "--overwrite")
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["sets"]
    halt = in_domain_alarm(model, estimator, data / "test.xyz")
    print(f"halt threshold: {halt:.3f} eV/A (just above the largest expected error of any in-domain test atom)")
    times["evaluate"] = time.perf_counter() - t

    for old in md.iterdir():  # fix ltau appends to its log and dump: start the demo fresh
        old.unlink()
    common = ["-var", "model", model, "-var", "allow_pickle", "yes", "-var", "estimator", estimator,
              "-var", "cells", 3, "-var", "every", args.every]
    t = stage(f"4/5 NVT: pair_style ltau (MACE) + fix ltau on {args.ranks} MPI ranks")
    sh(BIN / "mpirun", "-np", args.ranks, BIN / "ltau-lmp", "run", ROOT / "lammps_inputs" / "in.si_ltau", *common,
       "-var", "out", "nvt", "-var", "steps", args.nvt_steps, "-log", "log.nvt", cwd=md)
    times["nvt"] = time.perf_counter() - t

    t = stage(f"5/5 heating ramp on {args.ramp_ranks} rank(s) until fix ltau halts; true errors of every frame")
    sh(BIN / "mpirun", "-np", args.ramp_ranks, BIN / "ltau-lmp", "run", ROOT / "lammps_inputs" / "in.si_heat",
       *common, "-var", "halt", f"{halt:.4f}", "-var", "out", "heat", "-var", "steps", args.heat_steps,
       "-var", "observe", 1, "-log", "log.heat", cwd=md)
    from ltau_lmp.evaluation.failure import failure_timeline, write_failure_report
    from ltau_lmp.model import load_model

    timeline = failure_timeline(md / "heat_frames.xyz", load_model(model, allow_pickle=True), halt, args.failure)
    failure = write_failure_report(timeline, out / "failure", halt_step=timeline.predicted_cross, overwrite=True)
    times["heat"] = time.perf_counter() - t

    summary = {"times_s": times, "halt_threshold": halt, "lead_steps": failure["lead_steps"],
               "halt_step": timeline.predicted_cross, "true_failure_step": timeline.true_cross,
               "sets": metrics, "train": json.loads((work / "ltau" / "summary.json").read_text())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    test = metrics["test"]
    print("\n" + "=" * 78)
    print(f"MACE + LTAU demo finished in {(time.perf_counter() - t_start) / 60:.1f} min  "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print(f"  MACE: test force RMSE {test['force_rmse_component']:.3f} eV/A per component")
    print(f"  LTAU in-domain: Spearman {test['spearman']:.2f}, miscalibration area {test['miscalibration_area']:.3f}")
    print(f"  out-of-domain (liquid) AUROC: expected error {metrics['liquid']['auroc_expected']:.3f}, "
          f"kNN distance {metrics['liquid']['auroc_distance']:.3f}")
    lead = failure["lead_steps"]
    print(f"  heating run: fix ltau halted at step {timeline.predicted_cross} (max expected error > {halt:.3f} "
          f"eV/A); the true max error passed {args.failure} eV/A at step {timeline.true_cross}"
          + (f" -> {lead} steps of warning" if lead is not None else ""))
    print(f"outputs: {out} (summary.json, evaluation/, failure/, md/, mace/)")


def in_domain_alarm(model_path: Path, estimator_path: Path, test_file: Path) -> float:
    """1.05 x the largest expected error LTAU gives any atom of the in-domain test set."""
    from ltau_lmp.calculator import LTAUCalculator
    from ltau_lmp.data.datasets import read_frames
    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.model import load_model

    calc = LTAUCalculator(load_model(model_path, allow_pickle=True), estimator=LTAUEstimator.load(estimator_path))
    worst = max(float(np.max(calc.get_property("uncertainty", atoms))) for atoms in read_frames(test_file))
    return 1.05 * worst


if __name__ == "__main__":
    main()
