"""Sub-command ``train``: fit the force field, log per-atom errors, build the LTAU estimator."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the built-in force field with per-atom error logging and build its LTAU estimator",
        description=(
            "Train ltau_lmp's local force field on labelled extxyz data, logging every training atom's "
            "force error every epoch, then build the LTAU estimator from the final model's latent "
            "features; the validation atoms calibrate its out-of-domain p-value and the recommended "
            "alarm thresholds (printed). Writes model.pt, error_log.npz, descriptors.npy, "
            "reference_descriptors.npy, estimator/, metrics.csv and summary.json into the config's out_dir. CONFIG is a YAML file with a `train:` section "
            "(every option is documented in examples/si/config.yaml)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config file")
    p.add_argument("-o", "--out-dir", help="override the config's out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier training output in out_dir")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--seed", type=int, help="override the config's seed (e.g. for ensemble members)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import json
    import os

    from ltau_lmp.estimator.calibration import describe_thresholds
    from ltau_lmp.training.config import load_train_config
    from ltau_lmp.training.trainer import train

    cfg, base = load_train_config(args.config)
    if args.out_dir:
        cfg.out_dir = os.path.abspath(args.out_dir)
    if args.epochs:
        cfg.epochs = args.epochs
    if args.seed is not None:
        cfg.seed = args.seed
    cfg.validate("train")
    result = train(cfg, base, show_progress=not args.no_progress, overwrite=args.overwrite)
    s = result.summary
    print(json.dumps({"out_dir": str(result.out_dir), "epochs": s["epochs"],
                      "train_seconds": round(s["train_seconds"], 1), "test": s["test"],
                      "alarm_thresholds": s["alarm_thresholds"]}, indent=1))
    print(describe_thresholds(s["alarm_thresholds"], remedy="set train.data.val_fraction > 0"))
    return 0
