"""Measure LTAU quality of a trained run against the true (Stillinger-Weber) per-atom errors.

    python examples/si/ltau_quality.py [RUN_DIR] [DATA_DIR]

Per set: force RMSE, Spearman(expected error, true per-atom force error), and AUROC of telling the
in-domain test atoms from each other set's atoms by expected error and by mean kNN distance.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr

from ltau_lmp.data.datasets import AtomsDataset, read_frames
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.model import evaluate, load_model


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), via the Mann-Whitney rank sum."""
    ranks = rankdata(np.concatenate([negatives, positives]))
    n0, n1 = len(negatives), len(positives)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def score_set(model, estimator, path: Path) -> dict:
    ds = AtomsDataset(read_frames(path), model.species, model.cutoff)
    errors, latents = [], []
    for b in ds.batches(8):
        out = evaluate(model, b.positions, b.species, b.centers, b.neighbors, b.shifts, b.n_local)
        errors.append(torch.linalg.vector_norm(out.forces - b.forces, dim=1).numpy())
        latents.append(out.latent.numpy().astype(np.float32))
    errors = np.concatenate(errors)
    res = estimator.query(np.concatenate(latents))
    return {"true": errors, "expected": res.expected, "distance": res.distance}


def main(run_dir="examples/si/run", data_dir="examples/si/data") -> dict:
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    torch.set_num_threads(2)
    model = load_model(run_dir / "model.pt")
    estimator = LTAUEstimator.load(run_dir / "estimator")
    sets = {p.stem: score_set(model, estimator, p) for p in sorted(data_dir.glob("*.xyz")) if p.stem != "train"}
    test = sets["test"]
    report = {}
    for name, s in sets.items():
        row = {"force_rmse": float(np.sqrt(np.mean(s["true"] ** 2) / 3)),
               "mean_true_error": float(s["true"].mean()), "mean_expected": float(s["expected"].mean()),
               "spearman": float(spearmanr(s["expected"], s["true"]).statistic)}
        if name != "test":
            row["auroc_expected"] = auroc(test["expected"], s["expected"])
            row["auroc_distance"] = auroc(test["distance"], s["distance"])
        report[name] = row
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:]), indent=1))
