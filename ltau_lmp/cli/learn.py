"""Sub-command ``learn``: the active-learning loop (explore with fix ltau, label, retrain, resume)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "learn",
        help="the learning loop: explore with fix ltau, label what it flags, retrain, resume",
        description=(
            "Run the active-learning loop of CONFIG's `learn:` section (examples/si_learn/learn.yaml): each round "
            "trains the model (built-in, MACE or NequIP) on the initial data and every label so far (warm start), "
            "runs every exploration protocol (and its replicas) in LAMMPS with fix ltau (halt auto, dump auto: "
            "thresholds from the training itself), selects the most unusual diverse frames of the protocols that halted, labels them with "
            "the reference calculator (local processes or dask), and resumes each halted protocol from just "
            "before its alarm. Run it again after an interruption: it continues where it stopped."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", type=Path, help="YAML file with a `learn:` section")
    p.add_argument("--quiet", action="store_true", help="no live table, no per-stage messages")
    p.set_defaults(func=_learn)


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _learn(args) -> int:
    from ltau_lmp.learn.config import load_learn_config
    from ltau_lmp.learn.loop import run_learn

    cfg, base = load_learn_config(args.config)
    # SIGTERM (a batch system's time limit, kill) ends the loop like Ctrl-C: the running LAMMPS or
    # labelling children are stopped with it, and a rerun continues from the manifest
    signal.signal(signal.SIGTERM, _terminated)
    manifest = run_learn(cfg, base, progress=not args.quiet)
    final = manifest.data.get("final_round", len(manifest.data["rounds"]) - 1)
    trained = manifest.data["rounds"][final]["stages"]["train"]
    print(f"{len(manifest.data['rounds'])} round(s), {manifest.labels} labels; {manifest.data['stopped']}; "
          f"model {manifest.path.parent / trained['model']}, estimator {manifest.path.parent / trained['estimator']}; "
          f"manifest: {manifest.path}")
    return 0
