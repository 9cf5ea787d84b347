"""The whole ltau_lmp story on silicon, end to end (what `make demo` runs).

    python examples/si/demo.py [--out runs/demo] [--ranks 2]

1. reference data: Stillinger-Weber MD with LAMMPS (crystal 300-1200 K for training; liquid,
   amorphous, defects, compression as out-of-domain sets)
2. training with per-atom force-error logging every epoch -> model + LTAU estimator
3. LAMMPS MD with pair_style ltau + fix ltau on N MPI ranks: production NVT (dump + log)
4. LAMMPS heating ramp until fix ltau's halt fires (failure prediction); the ramp then goes on
   without the halt, for validation only, and the true errors of every logged frame come from
   the reference potential: did the alarm come before the model really failed?
5. evaluation on the labelled sets: calibration, correlation, out-of-domain ROC, plots
Each stage is the `ltau-lmp` command a user would type; the commands are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def sh(*args, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(a) for a in args]
    print("$", f"(cd {cwd} &&)" if cwd else "", shlex.join(cmd), flush=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(cmd, env=env, cwd=cwd)
    if check and result.returncode != 0:
        sys.exit(f"demo: step failed with exit code {result.returncode}: {shlex.join(cmd)}")
    return result


def demo_config(out: Path) -> Path:
    """examples/si/config.yaml with every path pointing into the demo's output folder."""
    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    data = out / "data"
    cfg["generate"]["out_dir"] = str(data)
    train = cfg["train"]
    train["out_dir"] = str(out / "run")
    train["data"]["train"] = str(data / "train.xyz")
    train["data"]["test"] = {name: str(data / f"{name}.xyz") for name in train["data"]["test"]}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks for the LAMMPS runs")
    parser.add_argument("--halt", type=float, default=0.2,
                        help="fix ltau halt threshold on the max expected error (eV/Angstrom)")
    parser.add_argument("--failure", type=float, default=1.0,
                        help="true max force error (eV/Angstrom) that counts as the model failing")
    parser.add_argument("--nvt-steps", type=int, default=2000, help="steps of the production NVT run")
    parser.add_argument("--heat-steps", type=int, default=10000, help="steps of the 300 -> 3000 K ramp")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    config = demo_config(out)
    run, md = out / "run", out / "md"
    md.mkdir(exist_ok=True)
    mpirun = [BIN / "mpirun", "-np", args.ranks, BIN / "ltau-lmp", "run"]

    t = stage("1/5 reference data (LAMMPS, Stillinger-Weber)")
    sh(BIN / "ltau-lmp", "generate", config, "--overwrite")  # a rerun replaces the earlier outputs
    times = {"generate": time.perf_counter() - t}

    t = stage("2/5 train the force field, logging every atom's error every epoch")
    sh(BIN / "ltau-lmp", "train", config, "--overwrite")
    times["train"] = time.perf_counter() - t

    t = stage(f"3/5 production MD: pair_style ltau + fix ltau on {args.ranks} MPI ranks")
    for old in md.iterdir():  # fix ltau appends to its log and dump: start the demo fresh
        old.unlink()
    sh(*mpirun, ROOT / "lammps_inputs" / "in.si_ltau", "-var", "model", run / "model.pt",
       "-var", "estimator", run / "estimator", "-var", "out", "nvt", "-var", "steps", args.nvt_steps,
       "-log", "log.nvt", cwd=md)
    times["md"] = time.perf_counter() - t

    t = stage("4/5 heating ramp until fix ltau halts; true errors of every evaluated frame")
    sh(*mpirun, ROOT / "lammps_inputs" / "in.si_heat", "-var", "model", run / "model.pt",
       "-var", "estimator", run / "estimator", "-var", "halt", args.halt, "-var", "out", "heat",
       "-var", "steps", args.heat_steps, "-var", "observe", 1, "-log", "log.heat", cwd=md)
    from ltau_lmp.evaluation.failure import failure_timeline, write_failure_report

    timeline = failure_timeline(md / "heat_frames.xyz", run / "model.pt", args.halt, args.failure)
    failure = write_failure_report(timeline, out / "failure", halt_step=timeline.predicted_cross, overwrite=True)
    times["heat"] = time.perf_counter() - t

    t = stage("5/5 evaluate LTAU on the labelled sets")
    sh(BIN / "ltau-lmp", "evaluate", "--model", run / "model.pt", "--estimator", run / "estimator",
       "--data-dir", out / "data", "-o", out / "evaluation", "--overwrite")
    times["evaluate"] = time.perf_counter() - t

    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["sets"]
    summary = json.loads((run / "summary.json").read_text())
    test = metrics["test"]
    lead = failure["lead_steps"]
    print("\n" + "=" * 78)
    print(f"ltau_lmp demo finished in {(time.perf_counter() - t_start) / 60:.1f} min  "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print(f"  model: test force RMSE {test['force_rmse_component']:.3f} eV/A per component "
          f"({summary['n_train_atoms']} training atoms, {summary['epochs']} epochs, error logging "
          f"{100 * summary['log_overhead_fraction']:.1f} % of training time)")
    print(f"  LTAU in-domain: Spearman {test['spearman']:.2f}, miscalibration area {test['miscalibration_area']:.3f}")
    if "liquid" in metrics:
        print(f"  out-of-domain (liquid) AUROC: expected error {metrics['liquid']['auroc_expected']:.3f}, "
              f"kNN distance {metrics['liquid']['auroc_distance']:.3f}")
    print(f"  heating run: fix ltau halted at step {timeline.predicted_cross} (max expected error > {args.halt} "
          f"eV/A); the true max error passed {args.failure} eV/A at step {timeline.true_cross}"
          + (f" -> {lead} steps of warning" if lead is not None else ""))
    print("outputs:")
    for label, path in [("data", out / "data"), ("model + estimator", run), ("MD logs and dumps", md),
                        ("failure prediction", out / "failure" / "failure_timeline.png"),
                        ("evaluation table", out / "evaluation" / "table.md"),
                        ("evaluation plots", out / "evaluation")]:
        print(f"  {label:20s} {path}")


if __name__ == "__main__":
    main()
