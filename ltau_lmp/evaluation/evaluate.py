"""``ltau-lmp evaluate``: how good are the LTAU predictions on labelled data sets?

For each labelled extxyz set the model predicts forces and latent features, the true
per-atom force error ‖F_model − F_ref‖ is known from the labels, and the estimator predicts
that error's distribution. Written: metrics.json, table.md and PNG figures (error scatter,
calibration, P(err < tol) reliability, ROC of in-domain vs every other set). With a calibrated
estimator also the AUROC of the ood p-value and, per set, the fraction of atoms over the
estimator's recommended alarm thresholds (on the in-domain set: the measured false-alarm rate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.prediction import predict_frames


@dataclass
class SetPrediction:
    """Per-atom truth and prediction for one data set."""

    true_error: np.ndarray   # (n,) eV/Å
    expected: np.ndarray     # (n,) eV/Å
    pdf: np.ndarray          # (n, nbins)
    distance: np.ndarray     # (n,)
    ood: np.ndarray | None   # (n,) conformal p-value; None when the estimator has no reference
    latent: np.ndarray       # (n, d) float32


def predict_set(model, estimator, path) -> SetPrediction:
    """The model's force errors on the labelled set at ``path`` and the estimator's prediction of them."""
    from ltau_lmp.data.datasets import read_frames

    frames = read_frames(path)
    prediction = predict_frames(model, frames, [atoms.get_forces() for atoms in frames], forces=False)
    res = estimator.query(prediction.latent)
    return SetPrediction(prediction.errors, res.expected, res.pdf, res.distance,
                         res.ood if estimator.has_ood_reference else None, prediction.latent)


COLUMN_UNITS = {
    "n_atoms": "count",
    "mean_true_error": "eV/Å",
    "mean_predicted_error": "eV/Å",
    "spearman": "unitless",
    "pearson_log": "unitless",
    "spearman_distance": "unitless",
    "miscalibration_area": "unitless",
    "pit_miscalibration_area": "unitless",
    "tol": "eV/Å",
    "fraction_below_tol": "fraction",
    "ece_below_tol": "probability",
    "median_distance": "latent units",
    "force_rmse_component": "eV/Å",
    "alarm_rate_expected": "fraction",
    "alarm_rate_ood": "fraction",
    "auroc_expected": "unitless",
    "auroc_distance": "unitless",
    "auroc_ood": "unitless",
}


def results_table(sets: dict[str, dict]) -> str:
    """table.md: :func:`~ltau_lmp.evaluation.metrics.summary_table` with each column's unit in its
    header ("mean_true_error (eV/Å)"), so the table can be read without metrics.json's key list."""
    from ltau_lmp.evaluation import metrics

    return metrics.summary_table({name: {f"{k} ({COLUMN_UNITS[k]})" if k in COLUMN_UNITS else k: v
                                         for k, v in row.items()} for name, row in sets.items()})


def discover_sets(data_dir: Path, exclude=("train",)) -> dict[str, Path]:
    """Every ``<name>.xyz`` in a data directory except the training set."""
    if not Path(data_dir).is_dir():
        raise ConfigError(f"{data_dir}: no such data folder (--data-dir takes the folder of labelled <name>.xyz "
                          f"sets that `ltau-lmp generate` wrote)")
    sets = {p.stem: p for p in sorted(Path(data_dir).glob("*.xyz")) if p.stem not in exclude}
    if not sets:
        raise ConfigError(f"{data_dir}: no labelled .xyz data sets found")
    return sets


def run_evaluation(model, estimator_path, sets: dict[str, Path], out_dir, in_domain: str = "test",
                   tol: float = 0.1, progress: bool = True, overwrite: bool = False) -> dict:
    """Score every set, write metrics.json / table.md / figures; returns the metrics dict.

    ``model``: a loaded model of any family (the caller decides how a file may be loaded).
    ``out_dir`` is written as a temporary sibling renamed at the end; an existing one is replaced
    only when it is an earlier evaluation and ``overwrite`` is given (checked before any work).
    """
    from ltau_lmp.outputs import check_dir, output_dir

    from tqdm.auto import tqdm

    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.estimator.calibration import alarm
    from ltau_lmp.evaluation import metrics, plots

    if in_domain not in sets:
        raise ConfigError(f"in-domain set {in_domain!r} is not among the data sets ({', '.join(sets)})")
    out_dir = check_dir(out_dir, "evaluate", overwrite)
    estimator = LTAUEstimator.load(estimator_path)
    estimator.check_model(model.card, "the evaluated model")
    preds = {name: predict_set(model, estimator, path)
             for name, path in tqdm(sets.items(), desc="evaluating sets", disable=not progress)}
    edges = estimator.bin_edges
    ref = preds[in_domain]
    thresholds = estimator.alarm_thresholds
    report = {"in_domain": in_domain, "tol": tol, "alarm_thresholds": thresholds, "sets": {}}
    calibration = {}
    for name, p in preds.items():
        row = metrics.summarize(p.true_error, p.expected, p.pdf, edges, p.distance, tol=tol)
        row["force_rmse_component"] = float(np.sqrt(np.mean(p.true_error ** 2) / 3))
        if thresholds is not None:
            row["alarm_rate_expected"] = float(np.mean(alarm(thresholds, "expected", p.expected)))
            row["alarm_rate_ood"] = float(np.mean(alarm(thresholds, "ood", p.ood)))
        if name != in_domain:
            row["auroc_expected"] = metrics.auroc(ref.expected, p.expected)
            row["auroc_distance"] = metrics.auroc(ref.distance, p.distance)
            if ref.ood is not None:  # small p = unusual: -p ranks like a distance
                row["auroc_ood"] = metrics.auroc(-ref.ood, -p.ood)
        report["sets"][name] = row
        calibration[name] = (metrics.DEFAULT_LEVELS, metrics.interval_coverage(p.pdf, edges, p.true_error))
    with output_dir(out_dir, "evaluate", overwrite) as tmp:
        figures = {
            "error_scatter": plots.plot_error_scatter(ref.true_error, ref.expected, tmp / "error_scatter.png",
                                                      title=f"{in_domain}: predicted vs true force error"),
            "error_scatter_all": plots.plot_error_scatter_sets(
                {n: (p.true_error, p.expected) for n, p in preds.items()}, tmp / "error_scatter_all.png",
                title="all sets: predicted vs true force error"),
            "calibration": plots.plot_calibration(calibration, tmp / "calibration.png"),
            "reliability": plots.plot_reliability(
                {n: (metrics.pdf_cdf(p.pdf, edges, np.full(len(p.true_error), tol)), p.true_error < tol)
                 for n, p in preds.items()}, tmp / "reliability.png", tol=tol),
        }
        others = [n for n in preds if n != in_domain]
        if others:
            figures["roc_expected"] = plots.plot_roc(
                {n: (ref.expected, preds[n].expected) for n in others}, tmp / "roc_expected.png",
                title=f"Out-of-domain detection by expected error ({in_domain} = negatives)")
            figures["roc_distance"] = plots.plot_roc(
                {n: (ref.distance, preds[n].distance) for n in others}, tmp / "roc_distance.png",
                title=f"Out-of-domain detection by kNN distance ({in_domain} = negatives)")
        report["figures"] = {k: str(out_dir / Path(v).name) for k, v in figures.items()}  # where they end up
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2))
        (tmp / "table.md").write_text(results_table(report["sets"]) + "\n")
    return report
