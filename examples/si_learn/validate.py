"""How good is each round's model along the loop's own protocols? Fresh runs, SW as the truth.

    python examples/si_learn/validate.py [--rounds 0 -1] [--stride 100]

Reruns every protocol of learn.yaml from its data file with the model of each given round (never
halting, a frame every --stride steps), labels the frames with Stillinger-Weber and prints the
99th percentile and max of each frame's true max force error, and LTAU's largest expected error.
Writes doc/validation/learn.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "learn.yaml")
    parser.add_argument("--rounds", type=int, nargs="+", default=[0, -1], help="rounds (-1: the last)")
    parser.add_argument("--stride", type=int, default=100)
    parser.add_argument("--json", type=Path, default=ROOT / "doc" / "validation" / "learn.json")
    args = parser.parse_args()
    from ltau_lmp.learn.config import load_learn_config
    from ltau_lmp.data.config import resolve
    from ltau_lmp.learn.validate import validate_round

    cfg, base = load_learn_config(args.config)
    run = resolve(cfg.out_dir, base)
    manifest = json.loads((run / "manifest.json").read_text())
    trained = [rnd["round"] for rnd in manifest["rounds"] if "train" in rnd["stages"]]
    out = {"config": str(args.config), "stopped": manifest["stopped"], "rounds": {}}
    for r in dict.fromkeys(trained[k] for k in args.rounds):
        res = validate_round(cfg, base, r, run / "validation" / f"{r:03d}", stride=args.stride)
        labels = sum((rnd["stages"].get("label") or {}).get("labelled", 0) for rnd in manifest["rounds"][:r])
        out["rounds"][r] = {"labels_before": labels, "protocols": res}
        every = np.concatenate([np.array(p["true_max"]) for p in res.values()])
        print(f"round {r} ({labels} labels): true max force error per frame, p99 {np.quantile(every, 0.99):.3f}, "
              f"max {every.max():.3f} eV/A over {every.size} frames; " + "; ".join(
                  f"{name} p99 {np.quantile(p['true_max'], 0.99):.3f}, LTAU expected max {max(p['expected_max']):.3f}"
                  for name, p in res.items()))
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
