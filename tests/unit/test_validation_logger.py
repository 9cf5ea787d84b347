"""The integrations' validation error log (ltau_lmp/integrations/validation.py): one row per training
epoch, the last validation pass of an epoch counts, a batch seen twice counts once."""

import numpy as np
import torch

from ltau_lmp.estimator import ErrorLog
from ltau_lmp.estimator.errorlog import epoch_curve
from ltau_lmp.integrations.validation import ValidationLogger


def forces(errors):
    """Predicted forces whose error norms against zero reference forces are ``errors``."""
    out = torch.zeros(len(errors), 3, dtype=torch.float64)
    out[:, 1] = torch.as_tensor(errors)
    return out


def test_one_row_per_training_epoch_last_pass_counts():
    log = ErrorLog.log_spaced(4, lo=0.01, hi=10.0, nbins=30)
    validation = ValidationLogger(log)
    # epoch 0: a pass whose batch is seen twice (torchmetrics' forward calls update twice), then
    # a second pass over the same atoms: only the second counts, each atom once
    validation.start()
    for _ in range(2):
        validation.log([2, 0], forces([0.5, 0.5]), np.zeros((2, 3)))
    validation.start()
    validation.log([3, 1], forces([0.1, 0.2]), np.zeros((2, 3)))
    validation.log([0, 2], forces([0.3, 0.4]), np.zeros((2, 3)))
    assert validation.pending == 4
    validation.end_epoch()
    validation.end_epoch()  # epoch 1: no validation
    validation.start()
    validation.log([1, 0, 3, 2], forces([1.0, 2.0, 3.0, 4.0]), np.zeros((4, 3)))
    validation.end_epoch()
    assert log.epoch == 3 and validation.passes == 3
    curve = epoch_curve(log.epoch_stats)
    np.testing.assert_array_equal(curve["n"], [4, 0, 4])
    np.testing.assert_allclose(log.epoch_stats[0], [4, 1.0, 0.30, 0.4])
    np.testing.assert_allclose(log.epoch_stats[2], [4, 10.0, 30.0, 4.0])
    assert np.isnan(curve["mean"][1])
    expected = np.zeros_like(log.counts)
    for atom, errors in enumerate([(0.3, 2.0), (0.2, 1.0), (0.4, 4.0), (0.1, 3.0)]):
        for e in errors:
            expected[atom, log.bin_index(np.array([e]))[0]] += 1
    np.testing.assert_array_equal(log.counts, expected)


def test_skipped_epochs_keep_their_row():
    log = ErrorLog.log_spaced(2, skip_epochs=1)
    validation = ValidationLogger(log)
    for value in (0.5, 0.7):
        validation.start()
        validation.log([0, 1], forces([value, value]), np.zeros((2, 3)))
        validation.end_epoch()
    np.testing.assert_array_equal(epoch_curve(log.epoch_stats)["n"], [2, 2])
    assert log.n_counted == 2 and np.all(log.totals() == 1)
