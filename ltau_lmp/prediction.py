"""Model outputs over frames: the one prediction path of evaluation, replay, selection and the
artefact writer (``ltau_lmp.pipeline``).

``predict_frames`` passes ``ase.Atoms`` frames through a model of any family, ``batch_size``
frames concatenated into one graph (no pair crosses frames, so every atom's outputs are those of
its frame alone), on the model's device, through ``ltau_lmp.model.evaluate``; it returns per-atom
forces, latent features (float32, the estimator's descriptors) and, with reference forces, the
per-atom force errors, all concatenated in frame order (= training atom ids). Frames need no
labels. ``force_errors`` is the one formula of ‖F_pred − F_ref‖: the training step's logger
(``pipeline.ErrorLogger``), replay and evaluation use it.

The training step differentiates through ``predict_batch`` (``create_graph=True``) on the
trainer's labelled ``AtomsDataset`` batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ltau_lmp.data.datasets import Batch
from ltau_lmp.model import neighbor_list, species_indices
from ltau_lmp.model.contract import ModelOutput, evaluate

BATCH_SIZE = 8  # frames per model call


class Prediction(NamedTuple):
    """Per-atom outputs over frames, concatenated in frame order."""

    forces: np.ndarray | None   # (n, 3) in the model's dtype; None when not asked for
    errors: np.ndarray | None   # (n,) ‖F_pred − F_ref‖ (eV/Å) in the model's dtype; None without references
    latent: np.ndarray          # (n, latent_dim) float32


def predict_batch(model, batch: Batch, create_graph: bool = False):
    """Per-structure energies, forces and latent features of one training batch."""
    out = evaluate(model, batch.positions, batch.species, batch.centers, batch.neighbors,
                   batch.shifts, batch.n_local, create_graph=create_graph)
    return batch.structure_energy(out.atom_energy), out.forces, out.latent


def force_errors(predicted: torch.Tensor, reference) -> np.ndarray:
    """‖F_pred − F_ref‖ per atom (eV/Å), computed in the predicted forces' dtype and device (as a
    training step computes it), as a numpy array."""
    reference = torch.as_tensor(reference, dtype=predicted.dtype, device=predicted.device)
    return torch.linalg.vector_norm(predicted.detach() - reference, dim=1).cpu().numpy()


def frame_outputs(model, frames: Sequence, forces: bool = True,
                  batch_size: int = BATCH_SIZE) -> Iterator[tuple[slice, ModelOutput]]:
    """(frames of the batch, ``evaluate`` output) for every ``batch_size`` frames, each batch one
    graph of their periodic neighbour lists (images through shifts), on the model's device."""
    card = model.card
    species = list(card.species)
    device = next(model.parameters()).device
    for start in range(0, len(frames), batch_size):
        part = slice(start, min(start + batch_size, len(frames)))
        positions, kinds, centers, neighbors, shifts, offset = [], [], [], [], [], 0
        for atoms in frames[part]:
            c, n, s = neighbor_list(atoms, card.cutoff)
            positions.append(atoms.positions)
            kinds.append(species_indices(atoms, species))
            centers.append(c + offset)
            neighbors.append(n + offset)
            shifts.append(s)
            offset += len(atoms)
        inputs = (np.concatenate(positions).astype(np.float64), np.concatenate(kinds), np.concatenate(centers),
                  np.concatenate(neighbors), np.concatenate(shifts))
        yield part, evaluate(model, *(torch.as_tensor(x, device=device) for x in inputs), offset, forces=forces)


@torch.no_grad()
def predict_frames(model, frames: Sequence, reference_forces: Sequence | None = None, forces: bool = True,
                   batch_size: int = BATCH_SIZE) -> Prediction:
    """Forces, force errors against ``reference_forces`` (one (n_atoms, 3) array per frame) and
    float32 latent features of every atom of ``frames``."""
    if reference_forces is not None and len(reference_forces) != len(frames):
        raise ValueError(f"{len(reference_forces)} reference force arrays for {len(frames)} frames")
    forces_out, errors, latent = [], [], []
    for part, out in frame_outputs(model, frames, forces=forces or reference_forces is not None,
                                   batch_size=batch_size):
        if forces:
            forces_out.append(out.forces.cpu().numpy())
        if reference_forces is not None:
            errors.append(force_errors(out.forces, np.concatenate(reference_forces[part])))
        latent.append(out.latent.cpu().numpy().astype(np.float32))
    latent = np.concatenate(latent) if latent else np.empty((0, model.card.latent_dim), np.float32)
    return Prediction(np.concatenate(forces_out) if forces_out else None,
                      np.concatenate(errors) if errors else None, latent)

