"""The validation error log of the integrations: held-out atoms' errors, one row per training epoch.

A trainer evaluates its validation set at some epochs (MACE every ``--eval_interval``, Lightning
every ``check_val_every_n_epoch``), possibly more than once an epoch (Lightning's
``val_check_interval``), and a metric may see one batch twice (torchmetrics' ``forward`` runs
``update`` twice per batch, so MACE's loss is called twice per validation batch). So the errors of a
validation pass are first kept by atom id (a later pass overwrites an earlier one: the last pass of an
epoch counts), and ``end_epoch`` — called once per *training* epoch, right after the training log's —
moves them into the ``ErrorLog`` and closes its epoch. An epoch without validation leaves a row of
``epoch_stats`` with n = 0, so the two logs' epochs line up (``ltau-lmp diagnose``).

Ids are positions of the atoms in the concatenation of the validation frames, the order of
reference_set.xyz (``ltau_lmp.pipeline.write_artefacts``).
"""

from __future__ import annotations

import time

import numpy as np


class ValidationLogger:
    """Buffers one validation pass's ‖F_pred − F_ref‖ per atom and logs it once per training epoch."""

    def __init__(self, error_log):
        self.error_log = error_log
        self.seconds = 0.0
        self.passes = 0  # validation passes seen (each ``start``)
        self._errors = np.zeros(error_log.n_samples)
        self._seen = np.zeros(error_log.n_samples, dtype=bool)

    def start(self) -> None:
        """A new validation pass: forget the errors of an earlier pass of the same epoch."""
        self._seen[:] = False
        self.passes += 1

    def log(self, atom_ids, predicted, reference) -> np.ndarray:
        """Record the errors of one validation batch (predicted forces as computed by the trainer)."""
        from ltau_lmp.prediction import force_errors

        start = time.perf_counter()
        ids = np.asarray(atom_ids).reshape(-1)
        errors = force_errors(predicted, reference)
        self.record(ids, errors)
        self.seconds += time.perf_counter() - start
        return errors

    def record(self, atom_ids, errors) -> None:
        ids = np.asarray(atom_ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self._errors.size):
            raise ValueError(f"validation atom ids must lie in [0, {self._errors.size}), "
                             f"got [{ids.min()}, {ids.max()}]")
        self._errors[ids] = errors
        self._seen[ids] = True

    @property
    def pending(self) -> int:
        """Atoms with an error waiting for ``end_epoch``."""
        return int(np.count_nonzero(self._seen))

    def end_epoch(self) -> None:
        """Log the errors of this epoch's (last) validation pass, if any, and close the epoch."""
        ids = np.flatnonzero(self._seen)
        self.error_log.update(ids, self._errors[ids])
        self.error_log.end_epoch()
        self._seen[:] = False
