"""The train stage of ``ltau-lmp learn``, one function per model family.

Every family trains on the loop's training file (initial data + labels, extxyz with energies and
forces) with the fixed validation file, logs every training atom's force error each epoch, and
leaves a ``RoundModel``: the model file ``pair_coeff`` loads, the LTAU estimator ``fix ltau``
loads (its ``auto`` thresholds from this training's own error log), both inside ``out``.
``previous`` is the last round's ``RoundModel`` for a warm start (None: from scratch).

``learn.trainer`` picks the family: ``builtin`` (ltau_lmp.training, options ``learn.train``),
``mace`` (mace_run_train via ``ltau-lmp mace-train``, options ``learn.mace``), ``nequip``
(nequip-train with ltau_lmp's Lightning callback, options ``learn.nequip``; its checkpoints are
pickles: ``learn.allow_pickle: true`` says the loop may load the files its own trainer wrote).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ltau_lmp.errors import ConfigError

FAMILIES = ("builtin", "mace", "nequip")


@dataclass
class RoundModel:
    """What a round's training left: the files LAMMPS loads, relative to the run folder when recorded."""

    model: Path            # for `pair_coeff * * ${model} ...` (and ltau_lmp.model.load_model)
    estimator: Path        # for `fix ID all ltau ${estimator} ...`
    epochs: int            # epochs this training ran
    thresholds: dict | None = None  # the estimator's calibrated alarm thresholds
    allow_pickle: bool = False      # a pickled file its own trainer wrote (learn.allow_pickle)

    def load(self):
        """The model as a ``ForceField`` (ltau_lmp.model.load_model), e.g. for frame fingerprints."""
        from ltau_lmp.model import load_model
        return load_model(self.model, allow_pickle=self.allow_pickle)

    def to_json(self, run: Path) -> dict:
        return {"model": str(self.model.relative_to(run)), "estimator": str(self.estimator.relative_to(run)),
                "epochs": self.epochs, "thresholds": self.thresholds, "allow_pickle": self.allow_pickle}

    @classmethod
    def from_json(cls, entry: dict, run: Path) -> "RoundModel":
        return cls(run / entry["model"], run / entry["estimator"], entry["epochs"], entry.get("thresholds"),
                   entry.get("allow_pickle", False))


def train_round(cfg, base: Path, train_file: Path, validation: Path | None, previous: RoundModel | None,
                out: Path) -> RoundModel:
    """Train ``cfg.trainer``'s model on ``train_file`` into ``out`` (replaced if it exists)."""
    if cfg.trainer == "builtin":
        from ltau_lmp.learn.trainers.builtin import train_builtin
        return train_builtin(cfg, base, train_file, validation, previous, out)
    if cfg.trainer == "mace":
        from ltau_lmp.learn.trainers.mace import train_mace
        return train_mace(cfg, base, train_file, validation, previous, out)
    if cfg.trainer == "nequip":
        from ltau_lmp.learn.trainers.nequip import train_nequip
        return train_nequip(cfg, base, train_file, validation, previous, out)
    raise ConfigError(f"learn.trainer: one of {', '.join(FAMILIES)}, got {cfg.trainer!r}")
