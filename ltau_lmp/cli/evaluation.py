"""Sub-commands ``evaluate`` (metrics and figures on labelled sets), ``diagnose`` (scores from a training
run's error logs, weights for retraining) and ``select`` (active learning)."""

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
        "diagnose",
        help="per-atom and per-structure scores from a training run's error log; weights for retraining",
        description=(
            "Read a training run's error logs (RUN: the output folder of `ltau-lmp train`, `mace-train`, "
            "`replay` or the nequip callback) and score every training atom and structure: the fraction of "
            "logged epochs with force error above a tolerance, the mean and spread of the error over epochs "
            "(dataset cartography), the train-validation gap epoch by epoch, and the structures that stay "
            "above the tolerance at every epoch (candidates for mislabelled data). With --weights, also a "
            "copy of the training structures with a per-structure loss weight in info['config_weight'] "
            "(read by MACE and the built-in trainer)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", type=Path, help="training run folder (holds error_log.npz)")
    p.add_argument("--tol", type=float, default=0.1, help="absolute force-error tolerance, eV/Angstrom")
    p.add_argument("--relative", type=float,
                   help="tolerance relative to each atom's reference force norm instead (e.g. 0.2)")
    p.add_argument("--weights", action="store_true", help="write train_set_weighted.xyz with per-structure weights")
    p.add_argument("--max-ratio", type=float, default=3.0, help="largest weight / smallest weight")
    p.add_argument("-o", "--output", type=Path, help="output folder (default: RUN-diagnose beside RUN)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier diagnose output")
    p.set_defaults(func=_diagnose)

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


def _diagnose(args) -> int:
    from ltau_lmp.evaluation.diagnose import diagnose, write_report
    from ltau_lmp.outputs import output_dir

    out = args.output or args.run.parent / f"{args.run.name}-diagnose"
    if not (args.run / "error_log.npz").is_file():
        raise ConfigError(f"{args.run}: no error_log.npz (give the output folder of ltau-lmp train, mace-train, "
                          f"replay or the nequip callback)")
    with output_dir(out, "diagnose", args.overwrite) as tmp:
        report = diagnose(args.run, None if args.relative else args.tol, args.relative, args.max_ratio,
                          tmp / "train_set_weighted.xyz" if args.weights else None)
        write_report(report, tmp)
    fa = report["fraction_above"]
    tol = (f"{args.relative:g} x |F_ref|" if args.relative else
           f"{args.tol:g} eV/Angstrom (bin edge {report['tolerance']['snapped_edges'][0]:.4g})")
    print(f"{report['atoms']:,} training atoms in {report['structures']:,} structures, {report['epochs_logged']} "
          f"epochs logged; tolerance {tol}")
    print(f"fraction of epochs above it: mean {fa['mean']:.3f}, 95th percentile {fa['p95']:.3f}; "
          f"{report['persistently_hard_atoms']:,} atoms above it at every epoch, {report['never_above_atoms']:,} never")
    if "validation" in report:
        gap = [g for g in report["gap"].get("gap_rms", []) if g is not None]
        last = f"; RMS gap at the last validated epoch {gap[-1]:+.4g} eV/Angstrom" if gap else ""
        print(f"validation: {report['validation']['atoms']:,} atoms, fraction of epochs above the tolerance: mean "
              f"{report['validation']['fraction_above']['mean']:.3f}{last}")
    hard = report["hard_structures"]
    print(f"{len(hard)} structure(s) hold persistently hard atoms (candidates for mislabelled data)" +
          "".join(f"\n  {h['file']} [{h['index']}]: {h['persistent_atoms']} of {h['atoms']} atoms, mean error "
                  f"{h['mean_error']:.3g}" for h in hard[:10]) + ("\n  ..." if len(hard) > 10 else ""))
    if args.weights:
        print(f"weights ({report['weights']['rule']}): {report['weights']['min']:.3g} - {report['weights']['max']:.3g}, "
              f"written as info['config_weight'] to {out / 'train_set_weighted.xyz'}")
    print(f"wrote {out}: diagnose.json, atoms.csv, structures.csv, cartography.png" +
          (", gap.png" if report["gap"]["epoch"] else ""))
    return 0


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
