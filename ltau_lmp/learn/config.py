"""The ``learn:`` section of a config file: everything one ``ltau-lmp learn`` run needs.

Relative paths are relative to the config file's folder. Unknown keys are errors. A complete,
commented example: examples/si_learn/learn.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ltau_lmp.data.config import from_dict, load_section
from ltau_lmp.errors import ConfigError
from ltau_lmp.training.config import TrainConfig


@dataclass
class Protocol:
    """One exploration: a LAMMPS input template and its variables (ltau_lmp.learn.explore)."""

    name: str = ""
    template: str = ""                                 # LAMMPS input file (relative to the config)
    variables: dict[str, str] = field(default_factory=dict)  # passed as -var NAME VALUE
    steps: int = 1000
    ranks: int = 1
    replicas: int = 1                                  # runs from the same state, velocities drawn afresh

    def validate(self, where: str) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{where}.name: give a name of letters, digits, '-' and '_' (got {self.name!r})")
        if not self.template:
            raise ConfigError(f"{where}.template: the LAMMPS input template is missing")
        if self.steps < 1 or self.ranks < 1 or self.replicas < 1:
            raise ConfigError(f"{where}: steps, ranks and replicas must be >= 1")


@dataclass
class Reference:
    """The reference (labelling) calculator: any ASE calculator by import path and keyword arguments."""

    calculator: str = "ltau_lmp.data.reference:LAMMPSCalculator"
    kwargs: dict[str, object] = field(default_factory=dict)


@dataclass
class Labelling:
    """Where the reference calculations run (ltau_lmp.learn.label)."""

    executor: str = "local"        # local (processes on this machine) | dask (dask.distributed)
    workers: int = 2               # local processes / LocalCluster workers
    address: str = ""              # dask: a scheduler address; "" = a LocalCluster
    retries: int = 2               # further attempts of a failed reference calculation

    def validate(self, where: str) -> None:
        if self.executor not in ("local", "dask"):
            raise ConfigError(f"{where}.executor: 'local' or 'dask', got {self.executor!r}")
        if self.workers < 1 or self.retries < 0:
            raise ConfigError(f"{where}: workers must be >= 1 and retries >= 0")


@dataclass
class Selection:
    """How many flagged frames are labelled (ltau_lmp.evaluation.select: diverse, most unusual)."""

    per_protocol: int = 8          # frames per protocol and round
    per_round: int = 24            # frames per round, all protocols
    pool: int = 4                  # candidates = pool x frames, the highest predicted errors

    def validate(self, where: str) -> None:
        if min(self.per_protocol, self.per_round, self.pool) < 1:
            raise ConfigError(f"{where}: per_protocol, per_round and pool must be >= 1")


@dataclass
class Stop:
    """When the loop ends: whichever comes first."""

    quiet_rounds: int = 1          # consecutive rounds in which every protocol completed without halting
    max_rounds: int = 10
    max_labels: int = 1000

    def validate(self, where: str) -> None:
        if min(self.quiet_rounds, self.max_rounds, self.max_labels) < 1:
            raise ConfigError(f"{where}: quiet_rounds, max_rounds and max_labels must be >= 1")


@dataclass
class LearnConfig:
    """The ``learn:`` section (module docstring)."""

    out_dir: str = "learn"                             # the run folder: manifest.json, rounds/NNN/...
    initial_data: str = ""                             # labelled extxyz the first model trains on
    trainer: str = "builtin"                           # model family: builtin | mace | nequip (ltau_lmp.learn.trainers)
    train: TrainConfig = field(default_factory=TrainConfig)  # the built-in trainer's options (`train:` section);
    # seed and data.val_fraction draw the validation structures, error_log / estimator serve every trainer
    mace: dict[str, object] = field(default_factory=dict)    # trainer mace: mace_run_train options (no dashes)
    nequip: dict[str, object] = field(default_factory=dict)  # trainer nequip: nequip-train config (trainers/nequip.py)
    allow_pickle: bool = False                         # trainer nequip: load the checkpoints it writes (pickles)
    warm_start: bool = True                            # each retraining continues from the previous model
    launcher: str = "mpirun -np {ranks}"               # how LAMMPS is started ({ranks}); srun works too
    protocols: list[Protocol] = field(default_factory=list)
    reference: Reference = field(default_factory=Reference)
    labelling: Labelling = field(default_factory=Labelling)
    selection: Selection = field(default_factory=Selection)
    stop: Stop = field(default_factory=Stop)

    def validate(self, where: str) -> None:
        if not self.initial_data:
            raise ConfigError(f"{where}.initial_data: the labelled extxyz the first model trains on is missing")
        from ltau_lmp.learn.trainers import FAMILIES

        if self.trainer not in FAMILIES:
            raise ConfigError(f"{where}.trainer: one of {', '.join(FAMILIES)}, got {self.trainer!r}")
        if self.trainer == "mace" and not self.mace:
            raise ConfigError(f"{where}.mace: trainer mace needs its mace_run_train options (name, model, r_max, ...)")
        if self.trainer == "nequip" and not self.nequip:
            raise ConfigError(f"{where}.nequip: trainer nequip needs its nequip-train configuration")
        if self.trainer == "nequip" and not self.allow_pickle:
            raise ConfigError(f"{where}.allow_pickle: nequip checkpoints are a pickle format; set allow_pickle: true "
                              f"to let the loop load the ones its own training writes (templates need "
                              f"`pair_style ltau allow_pickle yes` only for model parts ltau_lmp does not know)")
        if self.trainer == "nequip" and not self.train.data.val_fraction and not self.train.data.val:
            raise ConfigError(f"{where}.train.data: nequip-train needs validation structures; give val_fraction > 0 "
                              f"or an explicit val file")
        if not self.protocols:
            raise ConfigError(f"{where}.protocols: give at least one exploration protocol")
        names = [p.name for p in self.protocols]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.protocols: names must be distinct, got {names}")
        if "{ranks}" not in self.launcher:
            raise ConfigError(f"{where}.launcher: must contain {{ranks}} (e.g. 'mpirun -np {{ranks}}', "
                              f"'srun -n {{ranks}}'), got {self.launcher!r}")


def load_learn_config(path: str | Path) -> tuple[LearnConfig, Path]:
    """The ``learn:`` section of ``path`` and the folder its relative paths refer to."""
    return from_dict(LearnConfig, load_section(path, "learn"), "learn"), Path(path).resolve().parent
