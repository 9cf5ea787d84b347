"""Sub-commands ``evaluate`` (metrics and figures on labelled sets) and ``select`` (active learning)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltau_lmp.cli.options import add_model_options, load_model_option
from ltau_lmp.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score LTAU predictions against true force errors on labelled data sets",
        description=(
            "For each labelled extxyz set (reference energies and forces), compare the per-atom error "
            "distribution predicted by LTAU with the model's true force error: rank correlation, "
            "interval calibration, P(error < tol) reliability, and out-of-domain detection (AUROC) of every "
            "set against the in-domain one. Writes metrics.json, table.md and PNG figures."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model file (ltau-lmp train, MACE .model, ...)")
    add_model_options(p)
    p.add_argument("--estimator", required=True, type=Path, help="estimator directory")
    p.add_argument("--set", action="append", default=[], metavar="NAME=FILE",
                   help="a labelled extxyz data set (repeatable)")
    p.add_argument("--data-dir", type=Path, help="take every <name>.xyz in this directory except train.xyz")
    p.add_argument("--in-domain", default="test", help="name of the in-domain set (negatives for AUROC)")
    p.add_argument("--tol", type=float, default=0.1, help="tolerance for P(error < tol), eV/Angstrom")
    p.add_argument("-o", "--output", required=True, type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation at --output")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "select", help="pick diverse high-uncertainty frames from fix ltau dumps for labelling",
        description=(
            "Read extended-XYZ frames dumped by fix ltau, take the N x POOL frames with the highest "
            "predicted error and pick N of them by farthest-point sampling in the model's latent space, "
            "so the selection is both uncertain and diverse. Writes unlabelled extxyz for reference "
            "calculations (e.g. ltau_lmp.data.reference.reference_calculation)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dumps", nargs="+", type=Path, help="fix ltau dump files")
    p.add_argument("--model", required=True, type=Path, help="model file that ran the simulation")
    add_model_options(p)
    p.add_argument("-n", "--frames", type=int, default=10, help="frames to select")
    p.add_argument("--pool", type=int, default=4, help="candidate pool = frames x pool highest-error frames")
    p.add_argument("-o", "--output", required=True, type=Path, help="output extxyz")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier selection at --output")
    p.set_defaults(func=_select)


def _parse_sets(args) -> dict[str, Path]:
    from ltau_lmp.evaluation.evaluate import discover_sets

    sets = discover_sets(args.data_dir) if args.data_dir else {}
    for item in args.set:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"--set expects NAME=FILE, got {item!r}")
        sets[name] = Path(file)
    if not sets:
        raise ConfigError("give data sets with --set NAME=FILE or --data-dir DIR")
    return sets


def _evaluate(args) -> int:
    from ltau_lmp.evaluation.evaluate import run_evaluation

    from ltau_lmp.outputs import check_dir

    sets = _parse_sets(args)
    check_dir(args.output, "evaluate", args.overwrite)  # before the model is loaded
    report = run_evaluation(load_model_option(args.model, args), args.estimator, sets, args.output,
                            in_domain=args.in_domain, tol=args.tol, overwrite=args.overwrite)
    print((args.output / "table.md").read_text())
    print(f"metrics: {args.output / 'metrics.json'}; figures: {', '.join(report['figures'].values())}")
    return 0


def _select(args) -> int:
    from ltau_lmp.evaluation.select import run_selection

    from ltau_lmp.evaluation.select import earlier_selection
    from ltau_lmp.outputs import check_file

    check_file(args.output, "select", args.overwrite, earlier_selection)  # before the model is loaded
    frames = run_selection(args.dumps, load_model_option(args.model, args), args.frames, args.output, args.pool,
                           overwrite=args.overwrite)
    if len(frames) < args.frames:
        print(f"ltau-lmp select: warning: the dumps hold only {plural(len(frames), 'frame')}, fewer than the "
              f"{args.frames} requested: all of them were selected", file=sys.stderr)
        count = f"{len(frames)} of the {args.frames} requested frames"
    else:
        count = plural(len(frames), "frame")
    print(f"wrote {count} to {args.output}: " +
          ", ".join(f"{a.info['source']} (max {a.info['ltau_max']:.3g})" for a in frames))
    return 0


def plural(n: int, noun: str) -> str:
    """``1 frame``, ``2 frames``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
