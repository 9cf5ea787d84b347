"""The learning loop on silicon, end to end: cold-crystal data -> ltau-lmp learn (learn.yaml).

    python examples/si_learn/demo.py [--out examples/si_learn/run]      # make demo-learn

Generates the initial frames (SW, 300 K crystal) and the 216-atom starting cell, then runs the
loop; run it again after an interruption and it continues. Prints the per-round summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "learn.yaml")
    args = parser.parse_args()
    from ase.build import bulk
    from ase.io import write

    from ltau_lmp.data.generate import generate, load_generate_config
    from ltau_lmp.learn.config import load_learn_config
    from ltau_lmp.learn.loop import run_learn

    base = args.config.resolve().parent
    gen, data_dir = load_generate_config(args.config)
    if not (data_dir / "initial.xyz").is_file():
        generate(gen, data_dir)
    if not (base / "si216.data").is_file():
        write(base / "si216.data", bulk("Si", "diamond", a=5.431, cubic=True) * (3, 3, 3), format="lammps-data",
              atom_style="atomic", masses=True)
    cfg, base = load_learn_config(args.config)
    manifest = run_learn(cfg, base)
    for rnd in manifest.data["rounds"]:
        stages = rnd["stages"]
        explore = stages.get("explore", {}).get("protocols", {})
        print(f"round {rnd['round']}: " + "; ".join(
            f"{name} {res['status']} after {res['steps_run']} steps" for name, res in explore.items())
              + f"; labelled {stages.get('label', {}).get('labelled', 0)}; "
              + ", ".join(f"{s} {stages[s]['seconds']:.0f} s" for s in stages))
    print(f"stopped: {manifest.data['stopped']}")


if __name__ == "__main__":
    main()
