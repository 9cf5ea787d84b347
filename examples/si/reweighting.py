"""Does re-weighting the training data by its loss trajectories help? Measured, side by side.

    python examples/si/reweighting.py [--seeds 0 1] [--epochs 120] [--tol 0.05] [--max-ratio 3]

For each seed: the built-in model is trained on the silicon data (examples/si/config.yaml, SW
labels) as it is; `ltau-lmp diagnose` scores every training structure by the fraction of its
atoms' logged epochs above --tol and writes per-structure weights (w = 1 + (max_ratio - 1) x that
fraction, mean 1); the same model, seed, split and epochs are trained again on the weighted file.
Both are scored on the in-domain test set and the out-of-domain sets: force RMSE per component,
95th / 99th percentile of the per-atom force-error norm, the train-validation RMS gap at the last
epoch, and LTAU's own in-domain Spearman and miscalibration area (`ltau-lmp evaluate`). Writes
doc/validation/reweighting.json and prints the table of doc/validation.md. A negative result is a
result: the numbers are printed whichever way they go.

Generates the data first when examples/si/data is missing (`ltau-lmp generate`, ~15 s); each
training run takes ~2 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OOD = ("liquid", "amorphous", "vacancy", "surface", "compressed")


def ensure_data(data: Path) -> None:
    from ltau_lmp.data.generate import generate, load_generate_config

    if not (data / "train.xyz").is_file():
        cfg, _ = load_generate_config(HERE / "config.yaml")
        generate(cfg, data)


def train_run(out: Path, seed: int, epochs: int, train_file: Path, data: Path) -> Path:
    from ltau_lmp.training.config import load_train_config
    from ltau_lmp.training.trainer import train

    if not (out / "model.pt").is_file():
        cfg, base = load_train_config(HERE / "config.yaml")
        cfg.seed, cfg.epochs, cfg.out_dir = seed, epochs, str(out)
        cfg.data.train, cfg.data.test = str(train_file), {}
        train(cfg, base, show_progress=False)
    return out


def scores(run: Path, data: Path, out: Path) -> dict:
    """Test-set accuracy and LTAU quality of one run."""
    from ltau_lmp.estimator.errorlog import epoch_curve
    from ltau_lmp.estimator import ErrorLog
    from ltau_lmp.evaluation.evaluate import predict_set, run_evaluation
    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.model import load_model

    model = load_model(run / "model.pt")
    sets = {name: data / f"{name}.xyz" for name in ("test", *OOD) if (data / f"{name}.xyz").is_file()}
    report = run_evaluation(model, run / "estimator", sets, out, progress=False, overwrite=True)
    estimator = LTAUEstimator.load(run / "estimator")
    row = {}
    for name in sets:
        errors = predict_set(model, estimator, sets[name]).true_error
        row[name] = {"force_rmse_component": float(np.sqrt(np.mean(errors ** 2) / 3)),
                     "p95": float(np.quantile(errors, 0.95)), "p99": float(np.quantile(errors, 0.99))}
    test = report["sets"]["test"]
    row["ltau_in_domain"] = {"spearman": test["spearman"], "miscalibration_area": test["miscalibration_area"]}
    train_rms = epoch_curve(ErrorLog.load(run / "error_log.npz").epoch_stats)["rms"]
    val_file = run / "validation_error_log.npz"
    if val_file.is_file():
        val_rms = epoch_curve(ErrorLog.load(val_file).epoch_stats)["rms"]
        row["gap_rms_last_epoch"] = float(val_rms[-1] - train_rms[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reweighting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--tol", type=float, default=0.05, help="diagnose tolerance, eV/Angstrom")
    parser.add_argument("--max-ratio", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=ROOT / "doc" / "validation" / "reweighting.json")
    args = parser.parse_args()
    from ltau_lmp.evaluation.diagnose import diagnose, write_report
    from ltau_lmp.outputs import output_dir

    ensure_data(args.data)
    results = {"tol": args.tol, "max_ratio": args.max_ratio, "epochs": args.epochs, "seeds": {}}
    for seed in args.seeds:
        base = train_run(args.out / f"seed{seed}" / "baseline", seed, args.epochs, args.data / "train.xyz", args.data)
        weighted_file = args.out / f"seed{seed}" / "train_weighted.xyz"
        with output_dir(args.out / f"seed{seed}" / "diagnose", "diagnose", overwrite=True) as tmp:
            report = diagnose(base, tolerance=args.tol, max_ratio=args.max_ratio, weights_out=tmp / "weighted.xyz")
            write_report(report, tmp)
            (tmp / "weighted.xyz").replace(weighted_file)
        weighted = train_run(args.out / f"seed{seed}" / "weighted", seed, args.epochs, weighted_file, args.data)
        results["seeds"][seed] = {
            "diagnose": {"fraction_above": report["fraction_above"], "weights": report["weights"],
                         "hard_structures": len(report["hard_structures"])},
            "baseline": scores(base, args.data, args.out / f"seed{seed}" / "eval_baseline"),
            "weighted": scores(weighted, args.data, args.out / f"seed{seed}" / "eval_weighted")}
        print(json.dumps(results["seeds"][seed], indent=1), flush=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| set, quantity | " + " | ".join(f"seed {s}: baseline → weighted" for s in results["seeds"]) + " |",
             "|---|" + "---:|" * len(results["seeds"])]
    runs = results["seeds"].values()
    sets = [name for name in ("test", *OOD) if name in next(iter(runs))["baseline"]]
    for name in sets:
        for key, label in (("force_rmse_component", "force RMSE"), ("p95", "p95 |ΔF|"), ("p99", "p99 |ΔF|")):
            lines.append(f"| {name}, {label} (eV/Å) | " + " | ".join(
                f"{r['baseline'][name][key]:.4f} → {r['weighted'][name][key]:.4f}" for r in runs) + " |")
    for key, label in (("spearman", "LTAU in-domain Spearman"), ("miscalibration_area", "LTAU miscalibration area")):
        lines.append(f"| {label} | " + " | ".join(
            f"{r['baseline']['ltau_in_domain'][key]:.3f} → {r['weighted']['ltau_in_domain'][key]:.3f}" for r in runs) + " |")
    if all("gap_rms_last_epoch" in r["baseline"] for r in runs):
        lines.append("| train-validation RMS gap, last epoch (eV/Å) | " + " | ".join(
            f"{r['baseline']['gap_rms_last_epoch']:+.4f} → {r['weighted']['gap_rms_last_epoch']:+.4f}" for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
