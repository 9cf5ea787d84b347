"""NequIP / Allegro trained by nequip's own, unchanged trainer as the loop's train stage (``learn.trainer: nequip``).

Each round is one ``nequip-train`` run (nequip 0.19) of the user's nequip-train config with
ltau_lmp's ``LTAUCallback``; ``learn.nequip`` holds

* ``config``: the nequip-train config file (relative to the learn config's folder; its folder is
  hydra's config path, so config groups such as ``model/allegro.yaml`` beside it work);
* ``overrides``: hydra overrides, as on nequip-train's command line (``[model=allegro, epochs=30]``).

The loop composes that config with hydra's compose API and sets what it owns:

* ``data.train_dataset.file_path``: the round's training file, ``data.val_dataset.file_path``:
  the loop's fixed validation file (nequip validates on it; the callback calibrates the
  estimator's ``ood`` p-value on it), both as copies in ``out/data``. The data module must read
  one dataset of each from a file (``nequip.data.dataset.ASEDataset``), and the loop must have a
  validation set (``learn.train.data.val_fraction`` > 0): nequip's training runs need one;
* ``trainer.callbacks``: the config's own, with an ``LTAUCallback`` of the loop in place of any it
  holds (``out_dir`` = ``out/ltau``, options from ``learn.train.error_log`` / ``.estimator``);
* ``hydra.run.dir``: ``out/nequip``.

It runs in a subprocess (``python -m nequip.scripts.train``, the code behind ``nequip-train``):
hydra, Lightning and nequip's global state (dtype, registered fields) stay out of the loop's
process, and a crash ends one round's training, not the loop. ``out`` (replaced if it exists)::

    config.yaml        the complete config of this round: nequip-train -cp OUT -cn config repeats it
    data/              the training and validation files as nequip reads them: only the calculator
                       results every structure of a file has (nequip batches only equal fields)
    nequip-train.log   its output; a failure raises LTAUError with the exception it ended on
    nequip/            hydra's run folder: csv/ (per-epoch metrics), nequip's own log, checkpoints
    ltau/              the callback's: model.ckpt (what pair_coeff and load_model load), estimator/
                       (bound to model.ckpt's content hash), error logs, train_set.xyz,
                       reference_set.xyz, summary.json

Warm start: round r keeps round r-1's model config exactly (``training_module.model`` = the
resolved config stored in its checkpoint: the same architecture and the same normalisation
constants, not new ones from this round's data statistics) and ``WarmStart`` loads that
checkpoint's evaluation model (EMA weights with ``EMALightningModule``: the model LAMMPS ran) into
the new training module before the first step, then starts nequip's EMA from those weights as
``EMALightningModule`` does at construction; the optimizer and its schedule start afresh.
nequip's ``ModelFromCheckpoint`` builder would load the same model, but every checkpoint trained
from it rebuilds its model by loading its predecessor from that absolute path: a chain through
every round that breaks when the run folder moves. Here each round's checkpoint stands alone (and
loads without unpickling when its model is made of parts ltau_lmp knows: doc/nequip.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import lightning

from ltau_lmp.data.config import resolve
from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.estimator.options import EstimatorOptions
from ltau_lmp.integrations.nequip import LTAUCallback
from ltau_lmp.learn.trainers import RoundModel

OPTIONS = ("config", "overrides")
# what the loop sets in the composed config itself (a restart's ckpt_path would resume another training)
OWNED = ("data.train_dataset.file_path", "data.val_dataset.file_path", "ckpt_path", "hydra")
LTAU_TARGET = f"{LTAUCallback.__module__}.{LTAUCallback.__qualname__}"
# the estimator options LTAUCallback takes (the others must keep their defaults)
CALLBACK_ESTIMATOR = ("index", "k", "false_alarm_rate")


def train_nequip(cfg, base: Path, train_file: Path, validation: Path | None, previous: RoundModel | None,
                 out: Path) -> RoundModel:
    """One round's NequIP/Allegro and its estimator (module docstring); ``out`` is replaced."""
    from omegaconf import OmegaConf

    if validation is None:
        raise ConfigError("learn.train.data.val_fraction: trainer nequip needs a validation set (nequip-train "
                          "validates every training; it also calibrates the estimator's ood p-value); set it > 0")
    if previous is not None and not previous.model.is_file():
        raise LTAUError(f"warm start: the previous round's model {previous.model} is missing; set "
                        f"learn.warm_start: false or start a new out_dir")
    where = out.resolve()  # the config's paths: nequip-train runs in its own folder
    data = {"train": where / "data" / "train.xyz", "validation": where / "data" / "validation.xyz"}
    config = nequip_config(cfg, base, data["train"], data["validation"], where, previous)
    if out.exists():  # a training killed after writing its folder but before the manifest recorded it
        shutil.rmtree(out)
    data["train"].parent.mkdir(parents=True)
    consistent_copy(train_file, data["train"])
    consistent_copy(validation, data["validation"])
    OmegaConf.save(config, where / "config.yaml")
    run_nequip_train(where / "config.yaml", where / "nequip-train.log")
    summary = out / "ltau" / "summary.json"
    if not summary.is_file():
        raise LTAUError(f"nequip-train finished without LTAUCallback's outputs ({summary} is missing); see "
                        f"{out / 'nequip-train.log'}")
    result = json.loads(summary.read_text())
    return RoundModel(out / "ltau" / "model.ckpt", out / "ltau" / "estimator", result["epochs"],
                      result["alarm_thresholds"], allow_pickle=True)


def consistent_copy(source: Path, target: Path) -> None:
    """``source`` with only the calculator results that every structure in it has: nequip batches
    structures only when they carry the same fields (the loop's labels have a ``free_energy``, the
    initial data may not)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    frames = read(source, index=":")
    common = set.intersection(*(set(atoms.calc.results) if atoms.calc else set() for atoms in frames))
    for atoms in frames:
        if atoms.calc is not None:
            atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in atoms.calc.results.items() if k in common})
    write(target, frames, format="extxyz")


def nequip_options(options: dict, base: Path) -> tuple[Path, list[str]]:
    """(the nequip-train config file, the hydra overrides) of ``learn.nequip``, checked."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"learn.nequip: unknown key(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    if not options.get("config"):
        raise ConfigError("learn.nequip.config: the nequip-train config file (relative to the learn config's "
                          "folder) is missing")
    path = resolve(str(options["config"]), base).resolve()
    if not path.is_file():
        raise ConfigError(f"learn.nequip.config: {path}: no such file")
    overrides = options.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"learn.nequip.overrides: a list of hydra overrides such as 'epochs=30', "
                          f"'model=allegro', got {overrides!r}")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if any(key == owned or key.startswith(owned + ".") for owned in OWNED):
            raise ConfigError(f"learn.nequip.overrides: {override!r} sets {key}, which the loop sets itself "
                              f"(training and validation files, the run folder inside the round, warm start)")
    return path, overrides


def nequip_config(cfg, base: Path, train_file: Path, validation: Path, out: Path, previous: RoundModel | None):
    """The complete nequip-train config of one round (an omegaconf DictConfig, unresolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

    path, overrides = nequip_options(cfg.nequip, base)
    estimator, defaults = cfg.train.estimator, EstimatorOptions()
    changed = [f.name for f in fields(EstimatorOptions)
               if f.name not in CALLBACK_ESTIMATOR and getattr(estimator, f.name) != getattr(defaults, f.name)]
    if changed:
        raise ConfigError(f"learn.train.estimator.{changed[0]}: LTAUCallback builds the estimator with "
                          f"{', '.join(CALLBACK_ESTIMATOR)} only; leave {', '.join(changed)} at the default")
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            config = compose(config_name=path.stem, overrides=overrides)
    except Exception as exc:  # hydra's and omegaconf's many error types: a bad override, an unknown group option
        raise ConfigError(f"learn.nequip: hydra could not compose {path} with overrides {overrides}: {exc}") from exc
    for key, value in (("data.train_dataset", train_file), ("data.val_dataset", validation)):
        dataset = OmegaConf.select(config, key)
        if not isinstance(dataset, DictConfig) or "file_path" not in dataset:
            raise ConfigError(f"learn.nequip.config: {path} has no {key}.file_path; the loop trains and validates "
                              f"on one file each: give {key} as one dataset read from a file "
                              f"(nequip.data.dataset.ASEDataset)")
        dataset.file_path = str(value)
    run = config.get("run")
    if "train" not in (list(run) if isinstance(run, ListConfig) else [run]):
        raise ConfigError(f"learn.nequip.config: {path}'s run list has no 'train'")
    epochs = OmegaConf.select(config, "trainer.max_epochs", throw_on_resolution_failure=False)
    skip = cfg.train.error_log.skip_epochs
    if isinstance(epochs, int) and 0 <= epochs <= skip:
        raise ConfigError(f"learn.train.error_log.skip_epochs ({skip}) must be smaller than nequip's "
                          f"trainer.max_epochs ({epochs}): no epoch would be logged")
    callbacks = [c for c in OmegaConf.select(config, "trainer.callbacks", default=None) or []
                 if not (isinstance(c, DictConfig) and c.get("_target_") == LTAU_TARGET)]
    if previous is not None:
        callbacks.append({"_target_": f"{__name__}.{WarmStart.__qualname__}",
                          "checkpoint": str(previous.model.resolve()), "allow_pickle": cfg.allow_pickle})
    callbacks.append({"_target_": LTAU_TARGET, "out_dir": str(out / "ltau"), **asdict(cfg.train.error_log),
                      **{name: getattr(estimator, name) for name in CALLBACK_ESTIMATOR}})
    with open_dict(config):
        config.trainer.callbacks = callbacks
        if previous is not None:
            config.training_module.model = model_config(previous.model)
        config.hydra = {"run": {"dir": str(out / "nequip")}}
    return config


def model_config(checkpoint: Path) -> dict:
    """The resolved model config a nequip checkpoint was trained with (read without unpickling)."""
    import torch

    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["model"]
    except Exception as exc:  # torch's many error types; or not nequip's layout
        raise LTAUError(f"warm start: cannot read the model config of {checkpoint} "
                        f"({type(exc).__name__}: {exc})") from exc


def run_nequip_train(config_file: Path, log: Path) -> None:
    """``nequip-train -cp DIR -cn NAME`` in a subprocess of this Python, its output into ``log``."""
    cmd = [sys.executable, "-m", "nequip.scripts.train", "-cp", str(config_file.parent), "-cn", config_file.stem]
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=config_file.parent).returncode
    if code:
        raise LTAUError(f"nequip-train failed (exit status {code}): {last_exception(log)}; its output: {log}")


def last_exception(log: Path) -> str:
    """The exception the run ended on, with the ones it was raised from (Python's chained tracebacks
    in ``log``), in a line; without a traceback the log's last line."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    causes = []
    for block in "\n".join(lines).split("Traceback (most recent call last):")[1:]:
        rows = [row for row in block.splitlines() if row.strip()
                and not row.startswith(("The above exception", "During handling"))]
        # the frames are indented; the exception's text starts at the first line that is not, up to a log record
        start = next((i for i, row in enumerate(rows) if not row[0].isspace()), len(rows))
        end = next((i for i, row in enumerate(rows) if i > start and re.match(r"\[\d{4}-", row)), len(rows))
        if start < end:
            causes.append(" ".join(row.strip() for row in rows[start:end]))
    if not causes:
        return lines[-1] if lines else "no output"
    return causes[-1] + "".join(f" (raised from {cause})" for cause in reversed(causes[:-1]))


class WarmStart(lightning.Callback):
    """Starts a nequip training from a checkpoint's evaluation model (the module docstring's warm start).

    ``checkpoint``: a nequip checkpoint of the same model config; ``allow_pickle``: load it through
    nequip's unpickling loader where ltau_lmp cannot rebuild it (``ltau_lmp.model.load_model``)."""

    def __init__(self, checkpoint: str, allow_pickle: bool = False):
        super().__init__()
        self.checkpoint = checkpoint
        self.allow_pickle = allow_pickle

    def setup(self, trainer, pl_module, stage: str) -> None:
        from ltau_lmp.model import load_model

        if stage != "fit":
            return
        weights = load_model(self.checkpoint, allow_pickle=self.allow_pickle).graph_model.state_dict()
        try:
            LTAUCallback._model(pl_module).load_state_dict(weights)
        except RuntimeError as exc:
            raise LTAUError(f"warm start: the weights of {self.checkpoint} do not fit this training's model "
                            f"({exc})") from exc
        ema = getattr(pl_module, "ema", None)
        if ema is not None:  # EMALightningModule: its average starts from these weights (its first update copies)
            ema.num_updates = 0
            ema.update_parameters(pl_module.model)
