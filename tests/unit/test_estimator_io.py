"""Estimator files: bit-exact round trip and a clear error for every kind of damage."""

import json
import shutil

import numpy as np
import pytest

from ltau_lmp.errors import FileFormatError
from ltau_lmp.estimator import LTAUEstimator


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    p = rng.random((400, 10)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    est = LTAUEstimator.build(x, p, np.logspace(-3, 1, 11), index="hnsw", k=5,
                              metadata={"model_hash": "abc123", "units": "eV/Angstrom"})
    path = est.save(tmp_path_factory.mktemp("est") / "estimator")
    return est, path, x


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_is_bit_exact(saved, mmap):
    est, path, x = saved
    back = LTAUEstimator.load(path, mmap=mmap)
    for name, array in est.pdfs.arrays().items():
        np.testing.assert_array_equal(back.pdfs.arrays()[name], array)
        assert back.pdfs.arrays()[name].dtype == array.dtype
    np.testing.assert_array_equal(back.bin_edges, est.bin_edges)
    assert back.summary() == est.summary()
    a, b = est.query(x[:50] + 0.01), back.query(x[:50] + 0.01)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_array_equal(a.expected, b.expected)
    np.testing.assert_array_equal(a.distance, b.distance)
    np.testing.assert_array_equal(a.interval(), b.interval())


def test_flat_index_round_trip_with_mmap(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    est = LTAUEstimator.build(x, np.full((100, 2), 0.5, np.float32), [1.0, 2.0, 3.0], index="flat")
    back = LTAUEstimator.load(est.save(tmp_path / "e"), mmap=True)
    np.testing.assert_array_equal(back.query(x).neighbors, est.query(x).neighbors)


def test_save_overwrites_atomically(saved, tmp_path):
    est, path, _ = saved
    target = tmp_path / "e"
    est.save(target)
    est.save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_missing_directory_and_files(saved, tmp_path):
    _, path, _ = saved
    with pytest.raises(FileFormatError, match="estimator directory not found"):
        LTAUEstimator.load(tmp_path / "nothing")
    for name in ("meta.json", "pdf_blocks.npy", "pdf_totals.npy", "index.faiss"):
        bad = _copy(path, tmp_path / name)
        (bad / name).unlink()
        with pytest.raises(FileFormatError, match=f"{name}: missing"):
            LTAUEstimator.load(bad)


def test_bad_meta(saved, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="meta.json: not valid JSON"):
        LTAUEstimator.load(bad)
    bad = _copy(path, tmp_path / "v")
    _edit_meta(bad, version=99)
    with pytest.raises(FileFormatError, match="version 99 is not supported"):
        LTAUEstimator.load(bad)
    bad = _copy(path, tmp_path / "f")
    _edit_meta(bad, format="something-else")
    with pytest.raises(FileFormatError, match="not an ltau estimator"):
        LTAUEstimator.load(bad)


@pytest.mark.parametrize("name", ["pdf_indptr.npy", "pdf_columns.npy", "pdf_blocks.npy", "pdf_totals.npy",
                                  "index.faiss", "bin_edges.npy"])
def test_truncated_files(saved, tmp_path, name):
    _, path, _ = saved
    bad = _copy(path, tmp_path)
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=f"{name}: checksum does not match"):
        LTAUEstimator.load(bad)
    with pytest.raises(FileFormatError, match=f"{name}: (unreadable|not a readable)"):
        LTAUEstimator.load(bad, verify=False)


def test_flipped_byte_is_caught_by_checksum(saved, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path)
    data = bytearray((bad / "pdf_blocks.npy").read_bytes())
    data[-5] ^= 0xFF
    (bad / "pdf_blocks.npy").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="pdf_blocks.npy: checksum"):
        LTAUEstimator.load(bad)


def test_inconsistent_shapes_and_dtypes(saved, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path / "dim")
    _edit_meta(bad, dim=16)
    with pytest.raises(FileFormatError, match="dimension 8, meta.json says 400 of dimension 16"):
        LTAUEstimator.load(bad)
    bad = _copy(path, tmp_path / "dtype")
    np.save(bad / "pdf_blocks.npy", np.load(bad / "pdf_blocks.npy").astype(np.float32))
    with pytest.raises(FileFormatError, match=r"PDF table blocks must be a 2-D uint16 array, got float32"):
        LTAUEstimator.load(bad, verify=False)
    bad = _copy(path, tmp_path / "rows")
    np.save(bad / "pdf_totals.npy", np.load(bad / "pdf_totals.npy")[:300])
    with pytest.raises(FileFormatError, match=r"indptr has 401 values for 300 rows"):
        LTAUEstimator.load(bad, verify=False)
    bad = _copy(path, tmp_path / "sum")
    np.save(bad / "pdf_blocks.npy", np.load(bad / "pdf_blocks.npy") * 3)
    with pytest.raises(FileFormatError, match=r"row 0's masses sum to 151200, its total is 50400"):
        LTAUEstimator.load(bad, verify=False)
    bad = _copy(path, tmp_path / "edges")
    np.save(bad / "bin_edges.npy", np.load(bad / "bin_edges.npy")[::-1].copy())
    with pytest.raises(FileFormatError, match="strictly increasing"):
        LTAUEstimator.load(bad, verify=False)


@pytest.mark.parametrize("kind,options", [("ivf", {"nlist": 8}), ("ivfpq", {"nlist": 4, "pq_m": 4, "nbits": 4})])
def test_inverted_list_indexes_round_trip_memory_mapped(tmp_path, kind, options):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    est = LTAUEstimator.build(x, np.full((600, 2), 0.5, np.float32), [1.0, 2.0, 3.0], index=kind,
                              index_options=options)
    back = LTAUEstimator.load(est.save(tmp_path / "e"), mmap=True)
    assert back.index.options == est.index.options
    np.testing.assert_array_equal(back.query(x[:50]).neighbors, est.query(x[:50]).neighbors)
