"""Options of ``ltau-lmp train`` (the ``train:`` section of a YAML config), all documented here;
its ``error_log`` and ``estimator`` sections are the records every builder shares
(``ltau_lmp.estimator.options``).

Relative paths are relative to the config file's folder.  Unknown keys raise ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ltau_lmp.data.config import from_dict, load_section, resolve
from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions

SCHEDULES = ("plateau", "cosine", "none")


@dataclass
class DataOptions:
    train: str = "data/train.xyz"  # labelled extxyz training file (energy + forces)
    val_fraction: float = 0.1  # fraction of training structures held out for validation
    val: str = ""  # an explicit validation file instead (its structures validate and calibrate; val_fraction ignored)
    test: dict[str, str] = field(default_factory=dict)  # name -> extxyz, scored after training
    # extxyz info key of an optional per-structure loss weight (MACE's key; absent = 1.0; "" = ignore
    # weights): weights multiply the structure's energy and force squared errors in the training loss
    # (ltau_lmp.training.trainer.batch_loss); validation, early stopping and the error log are unweighted
    config_weight_key: str = "config_weight"

    def validate(self, where: str) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{where}.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class ModelOptions:
    """Hyper-parameters of ``ltau_lmp.model.LocalForceField``."""

    species: list[str] = field(default_factory=list)  # chemical symbols; empty = those in the data
    cutoff: float = 4.0  # Angstrom; Stillinger-Weber Si needs >= 3.77
    n_basis: int = 8  # radial sine basis functions
    n_radial: int = 8  # learned radial channels
    max_l: int = 3  # highest angular order (3-body power spectrum)
    hidden: list[int] = field(default_factory=lambda: [64])  # hidden MLP widths before the latent
    latent_dim: int = 32  # width of the latent layer = LTAU descriptor dimension
    dtype: str = "float64"  # float64 | float32 model precision


@dataclass
class TrainConfig:
    """The ``train:`` section of a config file."""

    out_dir: str = "run"  # model.pt, error_log.npz, estimator/, metrics.csv, summary.json go here
    seed: int = 0  # seeds weights, the validation split and the batch shuffling
    threads: int = 0  # torch CPU threads; 0 = torch's default
    epochs: int = 100  # maximum number of epochs
    batch_size: int = 4  # structures per mini-batch
    lr: float = 3e-3  # Adam learning rate
    schedule: str = "plateau"  # plateau (ReduceLROnPlateau on val loss) | cosine | none
    lr_factor: float = 0.5  # plateau: LR multiplier on a plateau
    lr_patience: int = 5  # plateau: epochs without improvement before reducing the LR
    min_lr: float = 1e-5  # lower LR bound (plateau) / final LR (cosine)
    early_stopping: int = 20  # stop after this many epochs without val improvement; 0 = never
    energy_weight: float = 1.0  # weight of the per-atom energy MSE (eV^2/atom^2)
    force_weight: float = 1.0  # weight of the force-component MSE ((eV/Angstrom)^2)
    init_model: str = ""  # warm start: a built-in model.pt to continue from (its architecture; `model:` ignored)
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    error_log: ErrorLogOptions = field(default_factory=ErrorLogOptions)  # bins, skipped epochs (ltau_lmp.estimator.options)
    estimator: EstimatorOptions = field(default_factory=EstimatorOptions)  # index, k, false-alarm rate, ...

    def validate(self, where: str) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}: epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError(f"{where}: lr must be > 0 and min_lr >= 0")
        if self.energy_weight < 0 or self.force_weight < 0 or self.energy_weight + self.force_weight == 0:
            raise ConfigError(f"{where}: loss weights must be >= 0 and not both 0")
        if self.error_log.skip_epochs >= self.epochs:
            raise ConfigError(f"{where}.error_log.skip_epochs ({self.error_log.skip_epochs}) must be "
                              f"smaller than epochs ({self.epochs})")


def load_train_config(path: str | Path) -> tuple[TrainConfig, Path]:
    """Config from the ``train:`` section of ``path`` and the folder relative paths refer to."""
    return from_dict(TrainConfig, load_section(path, "train"), "train"), Path(path).resolve().parent


def config_from_dict(data: dict) -> TrainConfig:
    """Config from a mapping (tests, notebooks); paths are taken relative to the working folder."""
    return from_dict(TrainConfig, data, "train")


__all__ = ["TrainConfig", "load_train_config", "config_from_dict", "resolve"]
