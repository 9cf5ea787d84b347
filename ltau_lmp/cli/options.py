"""Options that several sub-commands share."""

from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--allow-pickle`` and ``--family``: how every command loads a model file (``load_model_option``).

    A MACE ``.model`` is a pickled module, so loading it runs code from the file: the user opts in
    per command. The family list is ``load_model``'s (checked there, keeping ``--help`` free of torch).
    """
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading a pickled model (a MACE .model): it runs code stored in the file, "
                             "so use it only for files you trust")
    parser.add_argument("--family", help="model family (ltau_lmp.model.FAMILIES); default: detected from the file")


def load_model_option(path, args: argparse.Namespace):
    """The model at ``path``, loaded with the options of ``add_model_options``."""
    from ltau_lmp.model import load_model

    return load_model(path, family=args.family, allow_pickle=args.allow_pickle)
