"""Model outputs over batches of a data set: the one prediction path of training and evaluation.

Training differentiates through ``predict_batch`` (``create_graph=True``); evaluation and the
estimator build call it without gradients. Both go through ``ltau_lmp.model.evaluate``.
"""

from __future__ import annotations

import numpy as np
import torch

from ltau_lmp.data.datasets import AtomsDataset, Batch
from ltau_lmp.model import evaluate


def predict_batch(model, batch: Batch, create_graph: bool = False):
    """Per-structure energies, forces and latent features of one batch."""
    out = evaluate(model, batch.positions, batch.species, batch.centers, batch.neighbors,
                   batch.shifts, batch.n_local, create_graph=create_graph)
    return batch.structure_energy(out.atom_energy), out.forces, out.latent


@torch.no_grad()
def latent_features(model, dataset: AtomsDataset, batch_size: int = 8) -> np.ndarray:
    """Latent vectors (float32) of every atom of ``dataset``, row = global atom id (no forces needed)."""
    rows = []
    for batch in dataset.batches(batch_size):
        out = evaluate(model, batch.positions, batch.species, batch.centers, batch.neighbors,
                       batch.shifts, batch.n_local, forces=False)
        rows.append(out.latent.numpy().astype(np.float32))
    return np.concatenate(rows)
