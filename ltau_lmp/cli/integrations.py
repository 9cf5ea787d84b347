"""Sub-commands ``mace-train`` and ``replay``: LTAU for models trained by other trainers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltau_lmp.cli.options import add_model_options, load_model_option
from ltau_lmp.errors import ConfigError


def _add_log_options(p: argparse.ArgumentParser) -> None:
    """Error-log and estimator options, with the defaults and meaning of ``ltau-lmp train``'s."""
    from ltau_lmp.estimator.index import KIND_CHOICES
    from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions

    log, est = ErrorLogOptions(), EstimatorOptions()
    p.add_argument("--lo", type=float, default=log.lo, help="lowest error bin edge (eV/Angstrom)")
    p.add_argument("--hi", type=float, default=log.hi, help="highest error bin edge (eV/Angstrom)")
    p.add_argument("--nbins", type=int, default=log.nbins, help="log-spaced error bins")
    p.add_argument("--skip-epochs", type=int, default=log.skip_epochs, help="first epochs not counted")
    p.add_argument("--index", default=est.index, choices=KIND_CHOICES, help="estimator search backend")
    p.add_argument("-k", "--neighbors", type=int, default=est.k, help="neighbours averaged per query")
    p.add_argument("--false-alarm-rate", type=float, default=est.false_alarm_rate,
                   help="in-domain false-alarm rate per evaluation of all watched atoms (halt auto)")


def _options(args):
    from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions

    return (ErrorLogOptions(lo=args.lo, hi=args.hi, nbins=args.nbins, skip_epochs=args.skip_epochs),
            EstimatorOptions(index=args.index, k=args.neighbors, false_alarm_rate=args.false_alarm_rate))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mace-train",
        help="train a MACE model with MACE's own trainer, logging per-atom errors, and build its LTAU estimator",
        description=(
            "Run MACE's training (mace_run_train, unchanged) while logging every training atom's force "
            "error from each training step, then build the LTAU estimator from the final model's latent "
            "features (invariant node features of all interaction layers). Options of this command come "
            "first, then `--` and the mace_run_train arguments, e.g. `ltau-lmp mace-train --skip-epochs 20 "
            "-- --name si --train_file train.xyz --r_max 4.0 ...`. MACE's validation configurations calibrate "
            "the out-of-domain p-value and the recommended alarm thresholds (printed), and their errors at each "
            "of MACE's validations (--eval_interval) fill validation_error_log.npz. Writes error_log.npz, "
            "descriptors.npy, estimator/, train_set.xyz, reference_set.xyz, reference_descriptors.npy and "
            "summary.json into --out-dir (default WORK_DIR/ltau). Needs extxyz training data, one head, one "
            "process, no --lbfgs."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out-dir", type=Path, help="output directory (default: MACE's --work_dir/ltau)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier mace-train output in --out-dir")
    _add_log_options(p)
    p.add_argument("mace_args", nargs=argparse.REMAINDER, metavar="-- MACE_ARGS",
                   help="mace_run_train arguments, after --")
    p.set_defaults(func=_mace_train)

    p = sub.add_parser(
        "replay",
        help="an error log and LTAU estimator from per-epoch checkpoints (any trainer that keeps them)",
        description=(
            "Rebuild the per-atom training-error log by passing the training set through every per-epoch "
            "checkpoint (MACE: --save_all_checkpoints --keep_checkpoints, files *_epoch-N.pt; nequip: a "
            "ModelCheckpoint callback writing NAME_epoch-N.ckpt, see doc/nequip.md), then build "
            "the LTAU estimator from MODEL's latent features. MODEL gives the architecture and the final "
            "weights; checkpoints hold state dicts of it. Errors are those of the saved weights (MACE: EMA "
            "weights if the trainer averaged; nequip: the live weights). With --reference-file whose frames "
            "carry reference forces (--forces-key), they pass through every checkpoint too: "
            "validation_error_log.npz, one epoch per checkpoint. Writes the same files as mace-train "
            "into --out-dir."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help="final model file (ltau_lmp, MACE .model, nequip .ckpt / .nequip.zip)")
    p.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint files or directories")
    p.add_argument("--train-file", type=Path, required=True,
                   help="extxyz training set, in training order (mace-train writes train_set.xyz)")
    p.add_argument("--forces-key", default="REF_forces", help="per-atom array of the reference forces")
    p.add_argument("--reference-file", type=Path,
                   help="extxyz of held-out in-domain structures (e.g. the validation set; mace-train writes "
                        "reference_set.xyz): they calibrate the ood p-value and the alarm thresholds, and, "
                        "with reference forces, fill the validation error log")
    add_model_options(p)
    p.add_argument("-o", "--out-dir", type=Path, required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier replay output in --out-dir")
    _add_log_options(p)
    p.set_defaults(func=_replay)


def _mace_train(args) -> int:
    from ltau_lmp.estimator.calibration import describe_thresholds
    from ltau_lmp.integrations.mace import train_with_ltau

    mace_args = args.mace_args[1:] if args.mace_args[:1] == ["--"] else args.mace_args
    if not mace_args:
        raise ConfigError("give the mace_run_train arguments after `--`")
    log_options, estimator_options = _options(args)
    result = train_with_ltau(mace_args, out_dir=args.out_dir, error_log=log_options,
                             estimator=estimator_options, overwrite=args.overwrite)
    print(json.dumps({"out_dir": str(result.out_dir), "model_file": str(result.model_path),
                      "model_hash": result.model_hash, "atoms": result.error_log.n_samples,
                      "epochs": result.error_log.epoch,
                      "validation_atoms": None if result.validation_log is None else result.validation_log.n_samples},
                     indent=1))
    print(describe_thresholds(result.estimator.alarm_thresholds,
                              remedy="MACE had no validation configurations: give --valid_fraction or --valid_file"))
    return 0


def _replay(args) -> int:
    from ltau_lmp.data.datasets import read_extxyz
    from ltau_lmp.estimator.calibration import describe_thresholds
    from ltau_lmp.integrations.replay import attach_reference_forces, read_training_set, replay
    from ltau_lmp.outputs import check_dir, output_dir
    from ltau_lmp.pipeline import write_artefacts

    log_options, estimator_options = _options(args)
    estimator_options.validate("estimator")
    log_options.validate("error_log")
    check_dir(args.out_dir, "replay", args.overwrite)
    model = load_model_option(args.model, args)
    frames = read_training_set(args.train_file, args.forces_key)
    reference = read_extxyz(args.reference_file, "reference file") if args.reference_file else []
    validation_log, no_validation = None, "no --reference-file"
    if reference:
        missing = attach_reference_forces(reference, args.forces_key)
        if missing is None:
            validation_log = log_options.new_log(sum(len(a) for a in reference))
        else:
            no_validation = f"reference frame {missing} has no forces under {args.forces_key!r}"
    log = replay(model, args.checkpoints, frames, log_options.new_log(sum(len(a) for a in frames)),
                 reference_frames=reference, validation_log=validation_log)
    with output_dir(args.out_dir, "replay", args.overwrite) as tmp:
        estimator = write_artefacts(
            tmp, model, frames, log, estimator_options, reference_frames=reference, validation_log=validation_log,
            provenance={"model_file": str(args.model), "epochs": log.epoch,
                        "skip_epochs": log_options.skip_epochs, "replayed": True},
            summary={"model_file": str(args.model), "epochs": log.epoch,
                     "checkpoints": [str(p) for p in args.checkpoints]}).estimator
    print(json.dumps({"out_dir": str(args.out_dir), "model_hash": model.card.model_hash,
                      "atoms": log.n_samples, "epochs": log.epoch,
                      "validation_atoms": None if validation_log is None else validation_log.n_samples,
                      **({} if validation_log is not None else {"no_validation_log": no_validation})}, indent=1))
    print(describe_thresholds(estimator.alarm_thresholds, remedy="give --reference-file"))
    return 0
