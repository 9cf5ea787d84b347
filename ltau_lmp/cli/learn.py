"""Sub-command ``learn``: the active-learning loop (explore with fix ltau, label, retrain, resume)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "learn",
        help="the learning loop: explore with fix ltau, label what it flags, retrain, resume",
        description=(
            "Run the active-learning loop of CONFIG's `learn:` section (examples/si/learn.yaml): each round "
            "trains the built-in model on the initial data and every label so far (warm start), runs every "
            "exploration protocol in LAMMPS with fix ltau (halt auto, dump auto: thresholds from the training "
            "itself), selects the most unusual diverse frames of the protocols that halted, labels them with "
            "the reference calculator (local processes or dask), and resumes each halted protocol from just "
            "before its alarm. Run it again after an interruption: it continues where it stopped."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", type=Path, help="YAML file with a `learn:` section")
    p.add_argument("--quiet", action="store_true", help="no per-stage messages")
    p.set_defaults(func=_learn)


def _learn(args) -> int:
    from ltau_lmp.learn.config import load_learn_config
    from ltau_lmp.learn.loop import run_learn

    cfg, base = load_learn_config(args.config)
    manifest = run_learn(cfg, base, progress=not args.quiet)
    rounds = len(manifest.data["rounds"])
    print(f"{rounds} round(s), {manifest.labels} labels; {manifest.data['stopped']}; manifest: {manifest.path}")
    return 0
