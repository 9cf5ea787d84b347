"""Fixtures shared by the unit tests."""

import numpy as np
import pytest

from ltau_lmp.estimator import ErrorLog


@pytest.fixture()
def error_log_and_descriptors(tmp_path):
    """``write(epochs)`` puts into tmp_path errors.npz, the error log of 300 training atoms over
    ``epochs`` epochs, and train.npy, their 8-dimensional descriptors, all drawn from one generator
    seeded 0; it returns (the log's path, the descriptors, the generator for further draws)."""
    def write(epochs: int):
        rng = np.random.default_rng(0)
        log = ErrorLog.log_spaced(300, 1e-3, 10.0, 40)
        for _ in range(epochs):
            log.update(np.arange(300), rng.lognormal(-2.5, 0.7, 300))
            log.end_epoch()
        log_path = log.save(tmp_path / "errors.npz")
        desc = rng.normal(size=(300, 8)).astype(np.float32)
        np.save(tmp_path / "train.npy", desc)
        return log_path, desc, rng
    return write
