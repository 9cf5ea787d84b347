"""The evidence for a finished learning loop (doc/validation.md, "Learning loop"). SW is the truth.

    python examples/si_learn/validate.py [--config learn.yaml] [--stride 100] [--scratch-epochs 120]

1. the loop per round: labels, seconds per stage, bookkeeping share, steps each protocol reached;
2. fresh validation runs of every protocol (never halting, a frame every --stride steps, SW
   labels): the per-frame true max force error of round 0's model, the loop's final model
   (warm-started round after round), the same labels trained from scratch, and the random
   baseline: as many frames drawn uniformly from the loop's own exploration trajectories,
   labelled and trained from scratch the same way;
3. calibration of the final estimator warm-started vs from scratch on the same data
   (miscalibration area, AUROC of the ood p-value) on the labelled sets of examples/si/data
   (generated if missing) and on the final model's validation-run frames.
Writes doc/validation/learn.json; every step reuses what an earlier run of it left.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SETS = ROOT / "examples" / "si" / "data"


def round_rows(manifest: dict) -> list[dict]:
    from ltau_lmp.learn.summary import bookkeeping_seconds

    rows = []
    for rnd in manifest["rounds"]:
        stages = rnd["stages"]
        total = sum(s["seconds"] for s in stages.values())
        overhead = bookkeeping_seconds(stages)
        rows.append({
            "round": rnd["round"], "labels_trained": stages["train"]["labels"],
            "labelled": (stages.get("label") or {}).get("labelled", 0),
            "seconds": {name: s["seconds"] for name, s in stages.items()}, "total_seconds": total,
            "bookkeeping_seconds": overhead, "bookkeeping_share": overhead / total if overhead is not None else None,
            "protocols": {name: {"status": p["status"], "final_step": p["final_step"], "halt_step": p["halt_step"],
                                 "frames": p["frames"]}
                          for name, p in ((stages.get("explore") or {}).get("protocols") or {}).items()}})
    return rows


def p99(result: dict) -> dict:
    every = np.concatenate([np.array(p["true_max"]) for p in result.values()])
    return {"p99": float(np.quantile(every, 0.99)), "max": float(every.max()), "frames": int(every.size),
            "per_protocol_p99": {name: float(np.quantile(p["true_max"], 0.99)) for name, p in result.items()}}


def calibration(model, sets: dict[str, Path], out: Path) -> dict:
    from ltau_lmp.evaluation.evaluate import run_evaluation

    report = run_evaluation(model.load(), model.estimator, sets, out, in_domain="test", progress=False,
                            overwrite=True)
    return {name: {k: row.get(k) for k in ("miscalibration_area", "auroc_ood", "auroc_distance", "spearman",
                                             "n_atoms")}
            for name, row in report["sets"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "learn.yaml")
    parser.add_argument("--stride", type=int, default=100, help="validation runs: a frame every N steps")
    parser.add_argument("--scratch-epochs", type=int, default=120, help="epochs of the from-scratch trainings")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline's draw")
    parser.add_argument("--json", type=Path, default=ROOT / "doc" / "validation" / "learn.json")
    args = parser.parse_args()
    from ase.io import write

    from ltau_lmp.data.config import resolve
    from ltau_lmp.data.generate import generate, load_generate_config
    from ltau_lmp.learn.baseline import random_labels, train_from_scratch
    from ltau_lmp.learn.config import load_learn_config
    from ltau_lmp.learn.label import collect_labels
    from ltau_lmp.learn.loop import labels_before
    from ltau_lmp.learn.trainers import RoundModel
    from ltau_lmp.learn.validate import validate_model

    cfg, base = load_learn_config(args.config)
    run = resolve(cfg.out_dir, base)
    manifest = json.loads((run / "manifest.json").read_text())
    if not manifest.get("stopped"):
        raise SystemExit(f"{run}: the loop has not ended yet (run examples/si_learn/demo.py first)")
    final = manifest["final_round"]
    models = {"round 0": RoundModel.from_json(manifest["rounds"][0]["stages"]["train"], run),
              "loop (warm start)": RoundModel.from_json(manifest["rounds"][final]["stages"]["train"], run)}
    labels = labels_before(run, final)
    out = {"config": str(args.config.relative_to(ROOT)), "stopped": manifest["stopped"], "final_round": final,
           "labels": len(labels), "rounds": round_rows(manifest), "seconds": {}}
    print("| round | labels trained | labelled | train s | explore s | select + label s | bookkeeping | steps reached |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in out["rounds"]:
        sec = row["seconds"]
        share = "" if row["bookkeeping_share"] is None else f"{row['bookkeeping_seconds']:.1f} s ({100 * row['bookkeeping_share']:.1f} %)"
        print(f"| {row['round']} | {row['labels_trained']} | {row['labelled']} | {sec['train']:.0f} | "
              f"{sec.get('explore', 0):.0f} | {sec.get('select', 0) + sec.get('label', 0):.1f} | {share} | "
              + ", ".join(f"{n} {p['status']} {p['halt_step'] if p['status'] == 'halted' else p['final_step']}"
                          for n, p in row["protocols"].items()) + " |", flush=True)

    t = time.perf_counter()
    models["loop labels, from scratch"] = _cached(run, "selected_scratch", lambda: train_from_scratch(
        cfg, base, run, "selected_scratch", labels, args.scratch_epochs))
    out["seconds"]["train selected from scratch"] = time.perf_counter() - t
    t = time.perf_counter()
    drawn = random_labels(cfg, run, manifest, len(labels), seed=args.seed, progress=False)
    models["random labels, from scratch"] = _cached(run, "random_scratch", lambda: train_from_scratch(
        cfg, base, run, "random_scratch", drawn, args.scratch_epochs))
    out["seconds"]["label + train random from scratch"] = time.perf_counter() - t
    out["random_labels"] = len(drawn)

    out["validation"] = {}
    for name, model in models.items():
        t = time.perf_counter()
        folder = run / "validation" / {"round 0": "round0", "loop (warm start)": "final",
                                       "loop labels, from scratch": "selected_scratch",
                                       "random labels, from scratch": "random_scratch"}[name]
        res = validate_model(cfg, base, model, folder, stride=args.stride)
        out["validation"][name] = {**p99(res), "protocols": res}
        out["seconds"][f"validate {name}"] = time.perf_counter() - t
        v = out["validation"][name]
        print(f"{name}: p99 of the per-frame true max force error {v['p99']:.3f} eV/A (max {v['max']:.3f}, "
              f"{v['frames']} frames; " + ", ".join(f"{k} {x:.3f}" for k, x in v["per_protocol_p99"].items()) + ")",
              flush=True)

    if not (SETS / "test.xyz").is_file():
        gen, data_dir = load_generate_config(ROOT / "examples" / "si" / "config.yaml")
        generate(gen, data_dir)
    sets = {p.stem: p for p in sorted(SETS.glob("*.xyz")) if p.stem != "train"}
    frames = [atoms for p in (run / "validation" / "final").glob("*/labels") for atoms in collect_labels(p)]
    sets["loop validation runs"] = run / "validation" / "final_frames.xyz"
    write(sets["loop validation runs"], frames, format="extxyz")
    out["calibration"] = {name: calibration(models[name], sets, run / "calibration" / key)
                          for name, key in (("loop (warm start)", "warm"), ("loop labels, from scratch", "scratch"))}
    for name, rows in out["calibration"].items():
        print(f"{name}: " + "; ".join(f"{s} miscal {r['miscalibration_area']:.3f}"
                                      + (f" auroc_ood {r['auroc_ood']:.3f}" if r.get("auroc_ood") is not None else "")
                                      for s, r in rows.items()), flush=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


def _cached(run: Path, name: str, train):
    """The model trained into RUN/baselines/NAME by an earlier run of this script, else train it."""
    from ltau_lmp.learn.trainers import RoundModel

    record = run / "baselines" / name / "model.json"
    if record.is_file():
        return RoundModel.from_json(json.loads(record.read_text()), run)
    model = train()
    record.write_text(json.dumps(model.to_json(run)))
    return model


if __name__ == "__main__":
    main()
