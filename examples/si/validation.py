"""LTAU vs a 5-member deep ensemble on the silicon sets: quality and cost, side by side.

    python examples/si/validation.py [--run examples/si/run] [--data examples/si/data] [--out doc/validation]

Needs the default pipeline's outputs (examples/si/run.sh or `make demo`). Member 0 of the
ensemble is the pipeline's model (the one LTAU watches); members 1-4 are trained with the same
config and other seeds (a few minutes each on 2 cores; reused when already there). Writes
ensemble.json, calibration/ROC figures, and prints the markdown table used in doc/validation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def train_members(config: Path, run: Path, n_members: int) -> list[Path]:
    from ltau_lmp.training.config import load_train_config
    from ltau_lmp.training.trainer import train

    paths = [run / "model.pt"]
    for seed in range(1, n_members):
        out = run / "ensemble" / f"seed{seed}"
        if not (out / "model.pt").exists():
            cfg, base = load_train_config(config)
            cfg.seed, cfg.out_dir, cfg.data.test = seed, str(out), {}
            train(cfg, base)
        paths.append(out / "model.pt")
    return paths


def best_time(fn, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cost_per_step(model, estimator, n_extra_members: int) -> dict:
    """Seconds per MD step of 4096 Si atoms: one model force call vs one LTAU evaluation."""
    from ase.build import bulk

    from ltau_lmp.model import evaluate, neighbor_list, species_indices

    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(8)
    atoms.rattle(0.05, seed=0)
    c, n, s = (torch.from_numpy(a) for a in neighbor_list(atoms, model.cutoff))
    pos, spec = torch.from_numpy(atoms.positions.copy()), torch.from_numpy(species_indices(atoms, model.species))
    latent = evaluate(model, pos, spec, c, n, s, len(atoms)).latent.numpy().astype(np.float32)
    model_s = best_time(lambda: evaluate(model, pos, spec, c, n, s, len(atoms)))

    def ltau():
        res = estimator.query(latent)
        res.interval(0.05, 0.95)

    ltau_s = best_time(ltau)
    return {"atoms": len(atoms), "model_force_call_s": model_s, "ensemble_extra_s": n_extra_members * model_s,
            "ltau_s": ltau_s, "ltau_over_ensemble_extra": ltau_s / (n_extra_members * model_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "config.yaml")
    parser.add_argument("--run", type=Path, default=HERE / "run")
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=HERE.parent.parent / "doc" / "validation")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--in-domain", default="test")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from ltau_lmp.data.datasets import read_frames
    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.evaluation import DEFAULT_LEVELS, auroc, interval_coverage, miscalibration_area, spearman
    from ltau_lmp.evaluation.ensemble import ensemble_coverage, ensemble_forces, ensemble_sigma, ensemble_uncertainty
    from ltau_lmp.evaluation.evaluate import discover_sets, predict_set
    from ltau_lmp.evaluation.plots import plot_calibration, plot_roc
    from ltau_lmp.model import load_model

    models = [load_model(p) for p in train_members(args.config, args.run, args.members)]
    estimator = LTAUEstimator.load(args.run / "estimator")
    sets = discover_sets(args.data)
    rows, scores, calib = {}, {}, {}
    for name, path in sets.items():
        frames = read_frames(path)
        member_forces, reference = ensemble_forces(models, frames)
        true_error = np.linalg.norm(member_forces[0] - reference, axis=1)
        ltau = predict_set(models[0], estimator, path)
        np.testing.assert_allclose(ltau.true_error, true_error, rtol=1e-10)
        sigma = ensemble_sigma(member_forces)
        ens = ensemble_uncertainty(member_forces)
        scores[name] = {"ltau": ltau.expected, "ltau_distance": ltau.distance, "ensemble": ens}
        ltau_cov = interval_coverage(ltau.pdf, estimator.bin_edges, true_error)
        ens_cov = ensemble_coverage(sigma, true_error, DEFAULT_LEVELS)
        calib[f"{name} LTAU"], calib[f"{name} ensemble"] = (DEFAULT_LEVELS, ltau_cov), (DEFAULT_LEVELS, ens_cov)
        rows[name] = {
            "atoms": int(true_error.size), "mean_true_error": float(true_error.mean()),
            "spearman_ltau": spearman(ltau.expected, true_error), "spearman_ensemble": spearman(ens, true_error),
            "miscal_ltau": miscalibration_area(DEFAULT_LEVELS, ltau_cov),
            "miscal_ensemble": miscalibration_area(DEFAULT_LEVELS, ens_cov),
        }
    ref = scores[args.in_domain]
    for name in sets:
        if name != args.in_domain:
            rows[name].update({key: auroc(ref[src], scores[name][src]) for key, src in (
                ("auroc_ltau", "ltau"), ("auroc_ltau_distance", "ltau_distance"), ("auroc_ensemble", "ensemble"))})
    cost = cost_per_step(models[0], estimator, args.members - 1)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_calibration({k: v for k, v in calib.items() if k.startswith(args.in_domain + " ")},
                     args.out / "calibration_ltau_vs_ensemble.png", title="In-domain calibration: LTAU vs ensemble")
    others = [n for n in sets if n != args.in_domain]
    plot_roc({f"{n} LTAU": (ref["ltau"], scores[n]["ltau"]) for n in others}
             | {f"{n} ensemble": (ref["ensemble"], scores[n]["ensemble"]) for n in others},
             args.out / "roc_ltau_vs_ensemble.png", title="Out-of-domain detection: LTAU vs ensemble")
    (args.out / "ensemble.json").write_text(json.dumps({"sets": rows, "cost_per_step": cost}, indent=2))
    columns = ["atoms", "spearman_ltau", "spearman_ensemble", "miscal_ltau", "miscal_ensemble",
               "auroc_ltau", "auroc_ltau_distance", "auroc_ensemble"]
    print("| set | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join("" if c not in row else f"{row[c]:.3g}" for c in columns) + " |")
    print(f"\ncost per step, {cost['atoms']} atoms: model force call {cost['model_force_call_s'] * 1e3:.1f} ms, "
          f"ensemble extra ({args.members - 1} calls) {cost['ensemble_extra_s'] * 1e3:.1f} ms, "
          f"LTAU {cost['ltau_s'] * 1e3:.2f} ms -> ratio {cost['ltau_over_ensemble_extra']:.4f}")


if __name__ == "__main__":
    main()
