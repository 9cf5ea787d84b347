"""ErrorLog: streaming per-sample histograms of training errors."""

import numpy as np
import pytest

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.estimator import ErrorLog, log_spaced_edges


def test_log_spaced_edges_match_reference_formula():
    np.testing.assert_array_equal(log_spaced_edges(1e-3, 10.0, 4), np.logspace(-3, 1, 5))


@pytest.mark.parametrize("lo,hi,nbins", [(0.0, 1.0, 10), (1.0, 0.5, 10), (1e-3, 1.0, 0), (-1, 1, 3)])
def test_bad_bin_specs_are_rejected(lo, hi, nbins):
    with pytest.raises(ConfigError):
        ErrorLog.log_spaced(3, lo, hi, nbins)


def test_update_bins_and_clamps_into_end_bins():
    log = ErrorLog(3, [1.0, 2.0, 4.0, 8.0])
    log.update([0, 1, 2], [1.5, 2.0, 100.0])      # 2.0 sits on an edge: belongs to the upper bin
    log.update([0, 1], [0.01, 7.99])
    np.testing.assert_array_equal(log.counts, [[2, 0, 0], [0, 1, 1], [0, 0, 1]])
    assert (log.n_clamped_low, log.n_clamped_high) == (1, 1)
    assert log.n_counted == 5


def test_duplicate_ids_in_one_batch_are_all_counted():
    log = ErrorLog(2, [1.0, 2.0, 4.0])
    log.update([1, 1, 1, 0], [1.5, 1.5, 3.0, 3.0])
    np.testing.assert_array_equal(log.counts, [[0, 1], [2, 1]])


def test_skip_epochs_and_window():
    log = ErrorLog(1, [1.0, 2.0, 4.0], skip_epochs=2, stop_epoch=4)
    for epoch in range(6):
        log.update([0], [1.5 if epoch in (2, 3) else 3.0])
        log.end_epoch()
    np.testing.assert_array_equal(log.counts, [[2, 0]])
    assert log.epoch == 6 and log.n_counted == 2


def test_pdfs_are_normalised_and_empty_rows_are_reported():
    log = ErrorLog(2, [1.0, 2.0, 4.0])
    log.update([0, 0, 0, 0], [1.1, 1.2, 1.3, 3.0])
    with pytest.raises(ValueError, match="1 of 2 samples have no counted errors"):
        log.pdfs()
    log.update([1], [3.0])
    np.testing.assert_allclose(log.pdfs(), [[0.75, 0.25], [0.0, 1.0]])


def test_merge_equals_logging_everything_into_one_log():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 4000)
    errors = rng.lognormal(-2, 1.5, 4000)
    whole = ErrorLog.log_spaced(50, 1e-3, 1.0, 20)
    whole.update(ids, errors)
    first, second = ErrorLog.log_spaced(50, 1e-3, 1.0, 20), ErrorLog.log_spaced(50, 1e-3, 1.0, 20)
    first.update(ids[:1500], errors[:1500])
    second.update(ids[1500:], errors[1500:])
    first.merge(second)
    np.testing.assert_array_equal(first.counts, whole.counts)
    assert (first.n_clamped_low, first.n_clamped_high, first.n_counted) == (
        whole.n_clamped_low, whole.n_clamped_high, whole.n_counted)


def test_merge_rejects_incompatible_logs():
    log = ErrorLog.log_spaced(5, 1e-3, 1.0, 10)
    with pytest.raises(ValueError, match="bin edges"):
        log.merge(ErrorLog.log_spaced(5, 1e-3, 2.0, 10))
    with pytest.raises(ValueError, match="samples"):
        log.merge(ErrorLog.log_spaced(6, 1e-3, 1.0, 10))


def test_counts_widen_before_uint16_overflows():
    log = ErrorLog(1, [1.0, 2.0], count_dtype=np.uint16)
    log.update(np.zeros(40000, dtype=np.int64), np.full(40000, 1.5))
    log.end_epoch()
    assert log.counts.dtype == np.uint32
    log.update(np.zeros(40000, dtype=np.int64), np.full(40000, 1.5))
    assert int(log.counts[0, 0]) == 80000


def test_bad_updates_raise():
    log = ErrorLog(3, [1.0, 2.0])
    with pytest.raises(ValueError, match="ids must lie"):
        log.update([3], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        log.update([0], [np.nan])
    with pytest.raises(ValueError, match="differ in length"):
        log.update([0, 1], [1.0])


def test_save_load_round_trip(tmp_path):
    log = ErrorLog.log_spaced(10, 1e-3, 1.0, 8, skip_epochs=1)
    log.end_epoch()
    log.update(np.arange(10), np.linspace(1e-4, 2, 10))
    path = log.save(tmp_path / "log.npz")
    back = ErrorLog.load(path)
    np.testing.assert_array_equal(back.counts, log.counts)
    np.testing.assert_array_equal(back.bin_edges, log.bin_edges)
    assert back.summary() == log.summary()


def test_corrupt_error_logs_are_named(tmp_path):
    path = ErrorLog.log_spaced(4, 1e-3, 1.0, 8).save(tmp_path / "log.npz")
    with pytest.raises(FileFormatError, match="not found"):
        ErrorLog.load(tmp_path / "nope.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FileFormatError, match="truncated.npz: unreadable"):
        ErrorLog.load(truncated)
    other = tmp_path / "other.npz"
    np.savez(other, counts=np.zeros((2, 2), np.uint32))
    with pytest.raises(FileFormatError, match="missing array"):
        ErrorLog.load(other)
    inconsistent = ErrorLog.log_spaced(4, 1e-3, 1.0, 8)
    inconsistent.update([0], [0.1])
    inconsistent.n_counted = 7
    with pytest.raises(FileFormatError, match="corrupted"):
        ErrorLog.load(inconsistent.save(tmp_path / "bad.npz"))


def test_error_log_format_and_version_are_checked(tmp_path):
    import json

    path = ErrorLog.log_spaced(4, 1e-3, 1.0, 8).save(tmp_path / "log.npz")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(str(arrays["header"]))
    for change, message in (({"version": 99}, "error log version 99 is not supported"),
                            ({"format": "other"}, "not an ltau error log \\(format 'other'\\)")):
        np.savez(tmp_path / "edited.npz", **{**arrays, "header": np.array(json.dumps({**header, **change}))})
        with pytest.raises(FileFormatError, match=message):
            ErrorLog.load(tmp_path / "edited.npz")


def test_epoch_aggregates(tmp_path):
    """One row per epoch, skipped epochs included: the training curve; saved, merged, and absent
    from logs written before it (they still load)."""
    from ltau_lmp.estimator.errorlog import epoch_curve

    log = ErrorLog.log_spaced(4, skip_epochs=1)
    batches = [np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.05, 0.05, 0.1, 0.2])]
    for errors in batches:
        log.update(np.arange(2), errors[:2])    # two batches per epoch
        log.update(np.arange(2, 4), errors[2:])
        log.end_epoch()
    curve = epoch_curve(log.epoch_stats)
    np.testing.assert_allclose(curve["mean"], [0.25, 0.1])
    np.testing.assert_allclose(curve["rms"], [np.sqrt(np.mean(b ** 2)) for b in batches])
    np.testing.assert_allclose(curve["max"], [0.4, 0.2])
    assert log.n_counted == 4                   # the histograms skip epoch 0, the curve does not
    back = ErrorLog.load(log.save(tmp_path / "log.npz"))
    np.testing.assert_array_equal(back.epoch_stats, log.epoch_stats)
    np.testing.assert_allclose(epoch_curve(back.merge(log).epoch_stats)["mean"], [0.25, 0.1])
    with np.load(tmp_path / "log.npz") as data:
        np.savez(tmp_path / "old.npz", **{k: data[k] for k in ("counts", "bin_edges", "header")})
    assert ErrorLog.load(tmp_path / "old.npz").epoch_stats.shape == (0, 4)
