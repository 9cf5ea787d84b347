"""The artefact pipeline: per-atom training errors in, "model + estimator + thresholds + provenance" out.

Every trainer goes the same way: ``ErrorLogger`` feeds each training step's ‖F_pred − F_ref‖ into
an ``ErrorLog`` (the built-in trainer, ``mace-train``, the nequip callback; ``replay`` fills the log
from checkpoints instead), then ``write_artefacts`` turns the final model and the log into the
output folder. It is the one writer of that folder's contents:

    error_log.npz               the per-atom error histograms (``ErrorLog.save``)
    validation_error_log.npz    the same for the held-out atoms (ids: positions in reference_set.xyz),
                                where the trainer evaluated them during training
    descriptors.npy             the final model's latents of the training atoms (row = atom id)
    reference_descriptors.npy   the latents of the held-out atoms (with reference frames)
    estimator/                  the LTAU estimator, calibrated on the held-out atoms when given;
                                metadata: the model's card (``card_metadata``), units, provenance
    train_set.xyz, reference_set.xyz   the frames in id order (``save_frames``)
    summary.json                the caller's summary + model card, structure counts, the error
                                log's summary and the alarm thresholds

The model file itself is each trainer's own format (``model.pt``, nequip's ``model.ckpt``,
MACE's ``.model``), written or named by the caller and recorded in the provenance. The caller owns
the folder: a temporary sibling from ``ltau_lmp.outputs.output_dir``, renamed into place at the end.
Latents come from ``ltau_lmp.prediction.predict_frames``, the one prediction path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.options import EstimatorOptions
from ltau_lmp.prediction import BATCH_SIZE, force_errors, predict_frames


def card_metadata(card) -> dict:
    """Estimator metadata naming the model whose latent features it indexes, as plain data:
    ``model_hash`` (what ``LTAUEstimator.check_model`` compares) and the whole card as a dict
    (``model_card``: family, species, cutoff, receptive field, latent, dtype, ... shown by
    ``ltau-lmp info``). Every builder that has the model passes it:
    ``LTAUEstimator.build(..., metadata={**card_metadata(model.card), ...})``."""
    return {"model_hash": card.model_hash, "model_card": card.to_dict()}


class ErrorLogger:
    """Feeds per-atom force errors ‖F_pred − F_ref‖ (eV/Angstrom) into an ``ErrorLog``.

    Works with any trainer: after each loss evaluation call ``log(atom_ids, predicted, reference)``
    with the predicted forces of the loss's forward pass (detached here), the reference forces and
    each atom's stable global id; ``end_epoch()`` after each epoch. ``seconds`` accumulates the
    time spent, so the logging overhead can be reported.
    """

    def __init__(self, error_log):
        self.error_log = error_log
        self.seconds = 0.0

    def log(self, atom_ids, predicted, reference) -> np.ndarray:
        start = time.perf_counter()
        errors = force_errors(predicted, reference)
        self.error_log.update(np.asarray(atom_ids), errors)
        self.seconds += time.perf_counter() - start
        return errors

    def end_epoch(self) -> None:
        self.error_log.end_epoch()


@dataclass
class Artefacts:
    """What ``write_artefacts`` built and wrote."""

    estimator: LTAUEstimator
    summary: dict                            # as written to summary.json
    descriptors: np.ndarray                  # (n_atoms, latent_dim) float32
    reference_descriptors: np.ndarray | None


def write_artefacts(directory: str | Path, model, frames: Sequence, error_log, options: EstimatorOptions, *,
                    reference_frames: Sequence = (), provenance: dict | None = None, summary: dict | None = None,
                    save_frames: bool = True, batch_size: int = BATCH_SIZE, validation_log=None) -> Artefacts:
    """Build the estimator from ``model``'s latents over ``frames`` (the training set in atom-id
    order) and ``error_log``, and write the artefacts (module docstring) into ``directory``.

    ``options``: ``EstimatorOptions`` (index kind, k, false-alarm rate, ...). ``reference_frames``:
    held-out in-domain structures (a validation set) that calibrate the ``ood`` p-value and the
    alarm thresholds; without them the estimator has neither. ``provenance``: recorded in the
    estimator's metadata (model file, epochs, training file, ...); ``summary``: the caller's part of
    summary.json. ``save_frames``: also write train_set.xyz / reference_set.xyz. ``validation_log``:
    an ``ErrorLog`` over the atoms of ``reference_frames`` (in order), filled during training with
    the same epochs as ``error_log`` (``ltau-lmp diagnose`` reads the train-validation gap from both).
    """
    from ase.io import write

    directory = Path(directory)
    card = model.card
    descriptors = predict_frames(model, frames, forces=False, batch_size=batch_size).latent
    reference = (predict_frames(model, reference_frames, forces=False, batch_size=batch_size).latent
                 if len(reference_frames) else None)
    try:
        estimator = LTAUEstimator.build(
            descriptors, error_log, options=options, reference_descriptors=reference,
            structures=np.repeat(np.arange(len(frames)), [len(atoms) for atoms in frames]),
            metadata={**card_metadata(card), "units": "eV/Angstrom", "error": "per-atom force error norm",
                      **(provenance or {})})
    except ValueError as exc:  # e.g. atoms without counted errors (no epoch after skip_epochs)
        raise LTAUError(f"cannot build the LTAU estimator: {exc}") from exc
    error_log.save(directory / "error_log.npz")
    if validation_log is not None:
        n_reference = sum(len(atoms) for atoms in reference_frames)
        if validation_log.n_samples != n_reference:
            raise LTAUError(f"the validation error log has {validation_log.n_samples} samples but the reference "
                            f"frames {n_reference} atoms")
        validation_log.save(directory / "validation_error_log.npz")
    np.save(directory / "descriptors.npy", descriptors)
    if reference is not None:
        np.save(directory / "reference_descriptors.npy", reference)
    estimator.save(directory / "estimator")
    if save_frames:
        write(directory / "train_set.xyz", list(frames), format="extxyz")
        if reference is not None:
            write(directory / "reference_set.xyz", list(reference_frames), format="extxyz")
    summary = {**(summary or {}), "model_card": card.to_dict(), "structures": len(frames),
               "reference_structures": len(reference_frames), "error_log": error_log.summary(),
               "validation_error_log": None if validation_log is None else validation_log.summary(),
               "alarm_thresholds": estimator.alarm_thresholds}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1))
    return Artefacts(estimator, summary, descriptors, reference)
