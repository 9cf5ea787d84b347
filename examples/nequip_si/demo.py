"""LTAU for a NequIP (or Allegro) model trained by nequip's own trainer, end to end (`make demo-nequip`).

    python examples/nequip_si/demo.py [--out runs/nequip_demo] [--model nequip|allegro] [--epochs 30] [--ranks 2]

Runs in the nequip environment (`make setup-nequip`; .venv-nequip/bin/python).
1. reference data: Stillinger-Weber silicon (data.yaml: crystal 300-1200 K for training,
   validation and test; liquid out of domain)
2. `nequip-train` with nequip_si.yaml: nequip's unchanged trainer, with LTAUCallback logging
   every training atom's force error each epoch; at the end it saves ltau/model.ckpt and builds
   the LTAU estimator from that model's latent features
3. evaluation of LTAU on the labelled sets (calibration, Spearman, out-of-domain ROC)
4. LAMMPS NVT with pair_style ltau (the checkpoint) + fix ltau on N MPI ranks
Each stage is the command a user would type; the commands are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "examples" / "si"))
from demo import sh, stage  # noqa: E402  (the silicon demo's command runner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "nequip_demo")
    parser.add_argument("--model", choices=["nequip", "allegro"], default="nequip")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks of the NVT run")
    parser.add_argument("--steps", type=int, default=200, help="NVT steps")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, work, md = out / "data", out / args.model, out / "md"
    md.mkdir(exist_ok=True)
    times, t_start = {}, time.perf_counter()

    t = stage("1/4 reference data (LAMMPS, Stillinger-Weber)")
    config = yaml.safe_load((HERE / "data.yaml").read_text())
    config["generate"]["out_dir"] = str(data)
    (out / "generate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sh(BIN / "ltau-lmp", "generate", out / "generate.yaml", "--overwrite")  # a rerun replaces the earlier outputs
    times["generate"] = time.perf_counter() - t

    t = stage(f"2/4 nequip-train ({args.model}) with LTAUCallback: every training atom's force error, every epoch")
    sh(BIN / "nequip-train", "-cp", HERE, "-cn", "nequip_si", f"model={args.model}", f"epochs={args.epochs}",
       f"train_file={data / 'train.xyz'}", f"val_file={data / 'valid.xyz'}", f"hydra.run.dir={work}",
       "overwrite_ltau=true")  # a rerun replaces the ltau/ folder of the earlier one
    times["train"] = time.perf_counter() - t
    model, estimator = work / "ltau" / "model.ckpt", work / "ltau" / "estimator"

    t = stage("3/4 evaluate LTAU on the labelled sets")
    sh(BIN / "ltau-lmp", "evaluate", "--model", model, "--estimator", estimator,
       "--data-dir", data, "-o", out / "evaluation", "--overwrite")
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["sets"]
    times["evaluate"] = time.perf_counter() - t

    for old in md.iterdir():  # fix ltau appends to its log: start fresh
        old.unlink()
    t = stage(f"4/4 NVT: pair_style ltau ({args.model} checkpoint) + fix ltau on {args.ranks} MPI ranks")
    sh(BIN / "mpirun", "-np", args.ranks, BIN / "ltau-lmp", "run", ROOT / "lammps_inputs" / "in.si_ltau",
       "-var", "model", model, "-var", "estimator", estimator,
       "-var", "cells", 3, "-var", "steps", args.steps, "-var", "out", "nvt", "-log", "log.nvt", cwd=md)
    times["nvt"] = time.perf_counter() - t

    train = json.loads((work / "ltau" / "summary.json").read_text())
    summary = {"times_s": times, "sets": metrics, "train": train}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    test = metrics["test"]
    print("\n" + "=" * 78)
    print(f"{args.model} + LTAU demo finished in {(time.perf_counter() - t_start) / 60:.1f} min  "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print(f"  {args.model}: test force RMSE {test['force_rmse_component']:.3f} eV/A per component")
    print(f"  LTAU logging: {1000 * train['log_seconds'] / train['epochs']:.1f} ms per epoch = "
          f"{100 * train['log_seconds'] / sum(train['epoch_seconds']):.2f} % of an epoch "
          f"(+ {train['setup_seconds']:.2f} s once for the ids)")
    print(f"  LTAU in-domain: Spearman {test['spearman']:.2f}, miscalibration area {test['miscalibration_area']:.3f}")
    print(f"  out-of-domain (liquid) AUROC: expected error {metrics['liquid']['auroc_expected']:.3f}, "
          f"kNN distance {metrics['liquid']['auroc_distance']:.3f}")
    print(f"outputs: {out} (summary.json, evaluation/, md/, {args.model}/ltau/)")


if __name__ == "__main__":
    main()
