"""Error logs replayed from per-epoch checkpoints: the fallback for any trainer that keeps them.

Logging inside the training step (``ltau_lmp.integrations.mace``) costs nothing extra but needs a
hook into the trainer. Replaying needs nothing from the trainer: each checkpoint's weights are
loaded into the final model's architecture and the training set is passed through once, so the
cost is one extra pass per checkpoint. The errors are those of the weights the trainer saved at
the end of each saved epoch (with an EMA, the averaged weights), not those of each step's
forward pass; only saved epochs count (MACE saves every ``--eval_interval`` epochs).

The training set is a list of ``ase.Atoms`` whose ``arrays[REF_FORCES]`` hold the reference
forces; atom ids are positions in the concatenation of the frames, in order. Reference (validation)
frames with reference forces pass through every checkpoint too and fill a validation error log
(ids: positions in the concatenation of the reference frames, reference_set.xyz's order), one
epoch per checkpoint like the training log. The replayed logs and the final model become the same
artefacts as a live run's (``ltau_lmp.pipeline``).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.prediction import predict_frames

REF_FORCES = "REF_forces"
# MACE: {name}_run-{seed}_epoch-{N}[_swa].pt; nequip (Lightning ModelCheckpoint with filename
# "NAME_epoch-{epoch}", auto_insert_metric_name false): NAME_epoch-N.ckpt; per-epoch exports of a
# TorchScript archive (metatrain's checkpoints exported one by one, doc/model_files.md): epoch_N.pt
CHECKPOINT_NAME = re.compile(r"(?:_epoch-|^epoch_)(\d+)(?:_swa)?\.(?:pt|ckpt)$")


def read_training_set(path: str | os.PathLike, forces_key: str = REF_FORCES) -> list[Atoms]:
    """Frames of an extxyz file with their reference forces copied to ``arrays[REF_FORCES]``.

    ``forces_key`` names the per-atom array (MACE's ``--forces_key``); "forces" also finds forces
    that ASE moved into a calculator when reading.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"training file {path}: no such file")
    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as exc:  # ase raises many types for malformed files
        raise FileFormatError(f"{path}: not a readable extxyz file ({type(exc).__name__}: {exc})") from exc
    missing = attach_reference_forces(frames, forces_key)
    if missing is not None:
        raise FileFormatError(f"{path}: frame {missing} has no reference forces under the key {forces_key!r}")
    return frames


def attach_reference_forces(frames: Sequence[Atoms], forces_key: str = REF_FORCES) -> int | None:
    """Copy every frame's reference forces (per-atom array ``forces_key``; "forces" also finds a
    calculator's) to ``arrays[REF_FORCES]``. Returns the first frame without them (then none is
    changed), else None."""
    found = []
    for k, atoms in enumerate(frames):
        if forces_key in atoms.arrays:
            found.append(atoms.arrays[forces_key])
        elif forces_key == "forces" and atoms.calc is not None and "forces" in atoms.calc.results:
            found.append(atoms.calc.results["forces"])
        else:
            return k
    for atoms, forces in zip(frames, found):
        atoms.arrays[REF_FORCES] = np.asarray(forces, dtype=np.float64)
    return None


def force_errors(model, frames: Sequence[Atoms]) -> np.ndarray:
    """‖F_model − F_ref‖ per atom (eV/Å), concatenated in frame order (= training atom ids).

    Computed in the model's dtype, as a training step computes it (``ltau_lmp.prediction``).
    """
    return predict_frames(model, frames, [atoms.arrays[REF_FORCES] for atoms in frames], forces=False).errors


def checkpoint_files(sources: Sequence[str | os.PathLike]) -> list[tuple[int, Path]]:
    """(epoch, path) of per-epoch checkpoints named ``*_epoch-N.pt``, ``.ckpt`` or ``epoch_N.pt``,
    sorted by epoch.

    A directory contributes every file so named; a file must be so named.
    """
    found = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            candidates = sorted(p for p in source.iterdir() if CHECKPOINT_NAME.search(p.name))
        elif source.is_file():
            if not CHECKPOINT_NAME.search(source.name):
                raise ConfigError(f"{source}: not named like a per-epoch checkpoint (*_epoch-N.pt, .ckpt or epoch_N.pt)")
            candidates = [source]
        else:
            raise FileFormatError(f"checkpoint {source}: no such file or directory")
        found += [(int(CHECKPOINT_NAME.search(p.name).group(1)), p) for p in candidates]
    if not found:
        raise ConfigError(f"no per-epoch checkpoints (*_epoch-N.pt, .ckpt or epoch_N.pt) in {', '.join(map(str, sources))}; "
                          f"MACE keeps them with --save_all_checkpoints --keep_checkpoints, nequip with a "
                          f"ModelCheckpoint callback (every_n_epochs 1, save_top_k -1, filename NAME_epoch-{{epoch}}, "
                          f"auto_insert_metric_name false)")
    found.sort()
    epochs = [epoch for epoch, _ in found]
    repeated = sorted({e for e in epochs if epochs.count(e) > 1})
    if repeated:
        raise ConfigError(f"several checkpoints for epoch(s) {repeated} (files of several runs?): "
                          f"{', '.join(str(p) for e, p in found if e in repeated)}")
    return found


def replay_models(model, checkpoints: Sequence[str | os.PathLike]) -> Iterator[tuple[int, Path, object]]:
    """(epoch, checkpoint, the model with that checkpoint's weights) for each checkpoint, in epoch
    order; the model yielded is valid until the next one is drawn.

    Checkpoints hold the weights of the module the trainer optimised (``model.trainable``), read
    with ``weights_only=True`` and loaded by ``model.load_checkpoint``: a state dict, alone or under
    "model" (MACE's layout), or a nequip Lightning checkpoint, whose live weights (not EMA) are
    taken, the weights of that epoch's training steps. A checkpoint that is itself a TorchScript
    archive (a per-epoch export) is loaded as a model and must be of ``model``'s kind (family,
    species, latent width). ``model`` is not modified.
    """
    from ltau_lmp.model import load_model
    from ltau_lmp.model.torchscript import is_torchscript

    work = copy.deepcopy(model)
    device = next(work.trainable.parameters()).device
    for epoch, path in checkpoint_files(checkpoints):
        if is_torchscript(path):
            epoch_model = load_model(path, map_location=device)
            mine, theirs = model.card, epoch_model.card
            if (theirs.family, theirs.species, theirs.latent_dim) != (mine.family, mine.species, mine.latent_dim):
                raise FileFormatError(f"checkpoint {path}: a {theirs.family} model of species {list(theirs.species)} "
                                      f"and latent width {theirs.latent_dim}, not one of the model's kind "
                                      f"({mine.family}, {list(mine.species)}, {mine.latent_dim})")
            yield epoch, path, epoch_model
            continue
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises many types for damaged files
            raise FileFormatError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from exc
        try:
            work.load_checkpoint(payload)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise FileFormatError(f"checkpoint {path}: its weights do not fit the model "
                                  f"({str(exc).splitlines()[0]})") from exc
        yield epoch, path, work


def replay_errors(model, checkpoints: Sequence[str | os.PathLike],
                  frames: Sequence[Atoms]) -> Iterator[tuple[int, Path, np.ndarray]]:
    """(epoch, checkpoint, per-atom force errors over ``frames``) for each checkpoint, in epoch
    order (checkpoints as ``replay_models`` reads them)."""
    for epoch, path, epoch_model in replay_models(model, checkpoints):
        yield epoch, path, force_errors(epoch_model, frames)


def _check_log(log, frames: Sequence[Atoms], what: str) -> None:
    n_atoms = sum(len(atoms) for atoms in frames)
    if log.n_samples != n_atoms:
        raise ConfigError(f"the {what} error log has {log.n_samples} samples but the {what} set {n_atoms} atoms")


def replay(model, checkpoints: Sequence[str | os.PathLike], frames: Sequence[Atoms], error_log,
           reference_frames: Sequence[Atoms] = (), validation_log=None):
    """Fill ``error_log`` (an ``ErrorLog`` over the atoms of ``frames``) with one epoch per checkpoint.

    With ``validation_log`` (an ``ErrorLog`` over the atoms of ``reference_frames``, which must carry
    ``arrays[REF_FORCES]``), the reference frames pass through every checkpoint too and fill it, one
    epoch per checkpoint, the same epochs as ``error_log``."""
    _check_log(error_log, frames, "training")
    if validation_log is not None:
        _check_log(validation_log, reference_frames, "reference")
        missing = [k for k, atoms in enumerate(reference_frames) if REF_FORCES not in atoms.arrays]
        if missing:
            raise ConfigError(f"reference frame {missing[0]} has no reference forces: no validation error log")
    ids = np.arange(error_log.n_samples)
    for _, _, epoch_model in replay_models(model, checkpoints):
        error_log.update(ids, force_errors(epoch_model, frames))
        error_log.end_epoch()
        if validation_log is not None:
            validation_log.update(np.arange(validation_log.n_samples), force_errors(epoch_model, reference_frames))
            validation_log.end_epoch()
    return error_log
