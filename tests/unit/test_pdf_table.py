"""PDF table: exact counts, quantised floats within 1e-3 of the dense answers, >= 4x smaller,
clear errors, and version-1 estimator directories (pdfs.npy) still loading with their old answers."""

import json
import shutil

import numpy as np
import pytest
from scipy import sparse

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.estimator import LTAUEstimator, log_midpoints, log_spaced_edges
from ltau_lmp.estimator.histogram import pdf_cdf_at, pdf_quantiles
from ltau_lmp.estimator.io import sha256_file
from ltau_lmp.estimator import pdf_table
from ltau_lmp.estimator.pdf_table import QUANTISED_TOTAL, DensePDFTable, PDFTable

EDGES = log_spaced_edges(1e-3, 10.0, 100)


@pytest.fixture(autouse=True)
def mix_from_blocks(monkeypatch):
    """These tables are small: mix them from their blocks, not from the dense copy small tables use."""
    monkeypatch.setattr(pdf_table, "DENSE_MIX_BYTES", 0)


def test_small_tables_mix_from_a_dense_copy_with_the_same_answers(monkeypatch):
    rng = np.random.default_rng(40)
    table = PDFTable.from_counts(_epoch_counts(rng, 500))
    neighbors, weights = rng.integers(0, 500, (64, 10)), rng.dirichlet(np.ones(10), 64)
    from_blocks = table.mix(neighbors, weights)
    monkeypatch.setattr(pdf_table, "DENSE_MIX_BYTES", 32 << 20)
    np.testing.assert_allclose(table.mix(neighbors, weights), from_blocks, rtol=1e-5, atol=1e-7)
    assert table._dense is not None


def _epoch_counts(rng, n, epochs=100, edges=EDGES):
    """Integer histograms like a real error log's: each row's errors over ``epochs`` epochs,
    log-normal (sigma 0.5) around its own median (log-normal around 0.05)."""
    median = np.exp(rng.normal(np.log(0.05), 0.7, (n, 1)))
    errors = median * np.exp(0.5 * rng.standard_normal((n, epochs)))
    nbins = edges.size - 1
    bins = np.clip(np.searchsorted(edges, errors, side="right") - 1, 0, nbins - 1) + nbins * np.arange(n)[:, None]
    return np.bincount(bins.ravel(), minlength=n * nbins).reshape(n, nbins)


def _smooth_pdfs(rng, n, edges=EDGES):
    """Float PDFs over every bin: a log-normal density (sigma 0.5) per row, as the benchmarks once used."""
    mid = np.log(log_midpoints(edges))
    mu = rng.normal(np.log(0.05), 0.7, (n, 1))
    p = np.exp(-0.5 * ((mid - mu) / 0.5) ** 2)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _dense_masses(table):
    """The table's integer masses as a dense (n, nbins) array (tests only)."""
    n = table.n_entries
    out = np.zeros((n * table.ncols, table.block), np.int64)
    rows = np.repeat(np.arange(n), np.diff(table.indptr))
    out[rows * table.ncols + table.columns] = table.blocks
    return out.reshape(n, -1)[:, :table.nbins]


def _mixing(rng, n_entries, n=500, k=10):
    neighbors = rng.integers(0, n_entries, (n, k))
    weights = rng.random((n, k)) + 0.1
    return neighbors, weights / weights.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# building: exact counts, quantised floats
# --------------------------------------------------------------------------------------------

def test_counts_are_stored_exactly():
    counts = _epoch_counts(np.random.default_rng(0), 2000)
    table = PDFTable.from_counts(counts.astype(np.uint32))
    assert table.source == "counts"
    np.testing.assert_array_equal(_dense_masses(table), counts)
    np.testing.assert_array_equal(table.totals, 100)
    assert table.blocks.dtype == np.uint16 and table.columns.dtype == np.uint8 and table.totals.dtype == np.uint16
    np.testing.assert_allclose(table.rows(np.arange(50)), counts[:50] / 100, rtol=1e-6)
    table.check()


def test_counts_beyond_uint16_are_quantised():
    counts = _epoch_counts(np.random.default_rng(1), 50) * 5000  # up to ~10^5 per bin
    assert counts.max() > 65535
    table = PDFTable.from_counts(counts)
    assert table.source == "quantised"
    np.testing.assert_array_equal(table.totals, QUANTISED_TOTAL)
    cdf = np.cumsum(counts, axis=1) / counts.sum(axis=1, keepdims=True)
    assert np.abs(np.cumsum(_dense_masses(table), axis=1) / QUANTISED_TOTAL - cdf).max() <= 0.5 / QUANTISED_TOTAL


@pytest.mark.parametrize("kind", ["histograms", "smooth", "random"])
def test_quantised_cdf_is_within_half_a_quantum_at_every_edge(kind):
    rng = np.random.default_rng(2)
    pdfs = {"histograms": (_epoch_counts(rng, 300) / 100).astype(np.float32), "smooth": _smooth_pdfs(rng, 300),
            "random": rng.random((300, 100)).astype(np.float32)}[kind]
    pdfs /= pdfs.sum(axis=1, keepdims=True)
    table = PDFTable.from_pdfs(pdfs)
    masses = _dense_masses(table)
    assert masses.min() >= 0 and np.all(masses.sum(axis=1) == QUANTISED_TOTAL)
    cdf = np.cumsum(pdfs, axis=1, dtype=np.float64)
    cdf /= cdf[:, -1:]
    assert np.abs(np.cumsum(masses, axis=1) / QUANTISED_TOTAL - cdf).max() <= 0.5 / QUANTISED_TOTAL + 1e-12


@pytest.mark.parametrize("epochs", [1, 3, 7, 12, 100])
def test_counts_over_epochs_dividing_the_quantised_total_stay_exact(epochs):
    counts = _epoch_counts(np.random.default_rng(3), 200, epochs=epochs)
    table = PDFTable.from_pdfs((counts / epochs).astype(np.float32))
    np.testing.assert_array_equal(_dense_masses(table), counts * (QUANTISED_TOTAL // epochs))


def test_wide_tables_use_uint16_block_columns():
    rng = np.random.default_rng(4)
    edges = np.logspace(-3, 1, 3001)
    table = PDFTable.from_counts(_epoch_counts(rng, 100, edges=edges))
    assert table.columns.dtype == np.uint16 and table.columns.max() >= 256
    neighbors, weights = _mixing(rng, 100, n=20, k=3)
    dense = table.rows(np.arange(100))
    np.testing.assert_allclose(table.mix(neighbors, weights), np.einsum("nk,nkb->nb", weights, dense[neighbors]),
                               rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------
# reading: mix, expected, check
# --------------------------------------------------------------------------------------------

def test_mix_equals_the_dense_product():
    rng = np.random.default_rng(5)
    counts = _epoch_counts(rng, 3000)
    table, dense = PDFTable.from_counts(counts), DensePDFTable((counts / 100).astype(np.float32))
    neighbors, weights = _mixing(rng, 3000, n=700)
    mixed = table.mix(neighbors, weights)
    assert mixed.shape == (700, 100) and mixed.dtype == np.float32
    np.testing.assert_allclose(mixed, dense.mix(neighbors, weights), rtol=1e-5, atol=1e-8)
    assert table.mix(neighbors[:0], weights[:0]).shape == (0, 100)


@pytest.mark.parametrize("kind", ["counts", "histograms", "smooth"])
def test_answers_match_the_dense_table_to_1e_3(kind):
    """Expected errors, quantiles and P(err < tol) of mixed PDFs: table vs dense float32 (the
    version-1 computation), on realistic rows: counts (exact), float histograms and smooth float
    PDFs (quantised)."""
    rng = np.random.default_rng(6)
    counts = _epoch_counts(rng, 4000)
    pdfs = _smooth_pdfs(rng, 4000) if kind == "smooth" else (counts / 100).astype(np.float32)
    table = PDFTable.from_counts(counts) if kind == "counts" else PDFTable.from_pdfs(pdfs)
    dense = DensePDFTable(pdfs)
    mid = log_midpoints(EDGES)
    np.testing.assert_allclose(table.expected(mid), dense.expected(mid), rtol=1e-3)
    neighbors, weights = _mixing(rng, 4000, n=2000)
    a, b = table.mix(neighbors, weights), dense.mix(neighbors, weights)
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    np.testing.assert_allclose(pdf_quantiles(a, EDGES, levels), pdf_quantiles(b, EDGES, levels), rtol=1e-3)
    for tol in (0.01, 0.05, 0.2):
        pa, pb = pdf_cdf_at(a, EDGES, tol), pdf_cdf_at(b, EDGES, tol)
        np.testing.assert_allclose(pa, pb, rtol=1e-3, atol=1e-5)


def test_expected_and_check_cover_every_chunk():
    rng = np.random.default_rng(7)
    counts = _epoch_counts(rng, 40_000, edges=np.logspace(-3, 1, 21))  # > 2 chunks of rows
    table = PDFTable.from_counts(counts)
    values = rng.random(20)
    np.testing.assert_allclose(table.expected(values), counts @ values / counts.sum(axis=1), rtol=1e-12)
    table.check()
    table.blocks[-1, 0] += 1
    with pytest.raises(ConfigError, match="row 39999's masses sum to 101, its total is 100"):
        table.check()


def test_compression_of_count_histograms_is_at_least_4x():
    counts = _epoch_counts(np.random.default_rng(8), 20_000)
    table = PDFTable.from_counts(counts)
    ratio = counts.size * 4 / table.nbytes
    assert ratio >= 4.0
    assert table.describe() == (f"blocks of 8 bins, uint16 counts: {table.blocks.shape[0] / 20_000:.1f} blocks/row, "
                                f"{table.nbytes / 20_000:.1f} B/row, {ratio:.1f}x smaller than dense float32")


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_pdfs_and_counts_are_refused():
    good = np.full((3, 4), 0.25, np.float32)
    for pdfs, message in [(good[0], "non-empty 2-D"), (good[:0], "non-empty 2-D"), (good * 2, "do not sum to 1"),
                          (good - 0.5, "negative, NaN or infinite"), (np.where(good > 0, np.nan, 0), "NaN"),
                          (good.astype(np.complex64), "real numbers")]:
        with pytest.raises(ConfigError, match=message):
            PDFTable.from_pdfs(pdfs)
    counts = np.array([[1, 2], [0, 0], [0, 0]])
    with pytest.raises(ConfigError, match=r"2 of 3 rows have no counted errors \(first: 1\)"):
        PDFTable.from_counts(counts)
    with pytest.raises(ConfigError, match="non-negative"):
        PDFTable.from_counts(-counts)
    with pytest.raises(ConfigError, match="integer"):
        PDFTable.from_counts(counts + 0.5)


def test_inconsistent_tables_are_refused():
    table = PDFTable.from_counts(_epoch_counts(np.random.default_rng(9), 30))
    arrays = table.arrays()
    cases = [
        ({"blocks": arrays["blocks"].astype(np.int32)}, "blocks must be a 2-D uint16 array, got int32"),
        ({"columns": arrays["columns"].astype(np.int64)}, "columns must be a 1-D uint8 or uint16 array"),
        ({"totals": arrays["totals"][:-1]}, "indptr has 31 values for 29 rows"),
        ({"columns": arrays["columns"][:-1]}, "block columns for blocks of shape"),
        ({"indptr": arrays["indptr"][::-1].copy()}, "indptr must rise from 0"),
        ({"columns": np.full_like(arrays["columns"], 13)}, "block column 13 beyond the 13 blocks of 100 bins"),
        ({"totals": np.zeros_like(arrays["totals"])}, "row 0 has total 0"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            PDFTable(**{**arrays, **change}, nbins=100, source="counts")
    with pytest.raises(ConfigError, match="masses must be 'counts' or 'quantised', got 'floats'"):
        PDFTable(**arrays, nbins=100, source="floats")
    padded = {**arrays, "blocks": arrays["blocks"].copy(), "columns": arrays["columns"].copy()}
    padded["columns"][0], padded["blocks"][0, -1] = 12, 1  # bin 103 of 100
    with pytest.raises(ConfigError, match="masses in bins past the last"):
        PDFTable(**padded, nbins=100, source="counts").check(np.arange(30))
    with pytest.raises(ConfigError, match=r"neighbour ids must lie in \[0, 30\), got \[-1, 3\]"):
        table.mix(np.array([[-1, 3]]), np.array([[0.5, 0.5]]))


# --------------------------------------------------------------------------------------------
# estimator files: version 2 written, version 1 read
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    pdfs = _smooth_pdfs(rng, 600)
    est = LTAUEstimator.build(x, pdfs, EDGES, index="flat", k=5, metadata={"model_hash": "abc"},
                              reference_descriptors=rng.normal(size=(300, 8)).astype(np.float32))
    return est, pdfs, x, tmp_path_factory.mktemp("pdf_table")


def _write_version_1(est, pdfs, path):
    """An estimator directory as version 1 wrote it (ltau_lmp before the PDF table): pdfs.npy."""
    import faiss

    path.mkdir()
    files = {"pdfs": "pdfs.npy", "bin_edges": "bin_edges.npy", "index": "index.faiss",
             "reference_distances": "reference_distances.npy"}
    np.save(path / files["pdfs"], np.ascontiguousarray(pdfs, dtype=np.float32))
    np.save(path / files["bin_edges"], est.bin_edges)
    faiss.write_index(est.index.cpu_index, str(path / files["index"]))
    np.save(path / files["reference_distances"], est.reference_distances)
    meta = {"format": "ltau-estimator", "version": 1, "n_entries": est.n_entries, "dim": est.dim, "nbins": est.nbins,
            "index": {"kind": est.index.kind, "options": est.index.options}, "k": est.k,
            "weighting": est.weighting, "metadata": est.metadata, "alarm_thresholds": est.alarm_thresholds,
            "files": files, "sha256": {key: sha256_file(path / name) for key, name in files.items()}}
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def test_save_writes_version_2(built):
    est, _, _, root = built
    path = est.save(root / "v2")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["version"] == 2 and meta["pdf_table"] == {"masses": "quantised"}
    assert sorted(meta["files"]) == ["bin_edges", "index", "pdf_blocks", "pdf_columns", "pdf_indptr", "pdf_totals",
                                     "reference_distances"]
    assert not (path / "pdfs.npy").exists()
    back = LTAUEstimator.load(path)
    assert isinstance(back.pdfs, PDFTable) and isinstance(back.pdfs.blocks, np.memmap)
    assert back.summary()["pdf_table"] == est.summary()["pdf_table"]


@pytest.mark.parametrize("mmap", [True, False])
def test_version_1_directory_loads_and_answers_as_before(built, mmap):
    est, pdfs, x, root = built
    path = root / f"v1_{mmap}"
    if not path.exists():
        _write_version_1(est, pdfs, path)
    old = LTAUEstimator.load(path, mmap=mmap)
    assert isinstance(old.pdfs, DensePDFTable) and old.summary()["pdf_table"].startswith("dense float32")
    res = old.query(x[:200] + 0.01)
    # version 1's arithmetic: a float32 (n x entries) weight matrix times the dense table
    n, k = res.neighbors.shape
    mixing = sparse.csr_matrix((res.weights.astype(np.float32).ravel(), res.neighbors.ravel(),
                                np.arange(0, n * k + 1, k)), shape=(n, est.n_entries))
    np.testing.assert_array_equal(res.pdf, np.asarray(mixing @ pdfs, dtype=np.float32))
    entry_expected = np.asarray(pdfs @ log_midpoints(EDGES).astype(np.float32), np.float64)
    np.testing.assert_array_equal(res.expected, np.einsum("nk,nk->n", res.weights, entry_expected[res.neighbors]))
    np.testing.assert_array_equal(res.ood, est.query(x[:200] + 0.01).ood)
    # and within 1e-3 of the table it was built as
    new = est.query(x[:200] + 0.01)
    np.testing.assert_array_equal(res.neighbors, new.neighbors)
    np.testing.assert_allclose(res.expected, new.expected, rtol=1e-3)
    np.testing.assert_allclose(res.interval(), new.interval(), rtol=1e-3)


def test_version_1_estimator_saved_again_is_version_2(built, tmp_path):
    est, pdfs, x, _ = built
    old = LTAUEstimator.load(_write_version_1(est, pdfs, tmp_path / "v1"))
    again = LTAUEstimator.load(old.save(tmp_path / "v1", overwrite=True))
    assert json.loads((tmp_path / "v1" / "meta.json").read_text())["version"] == 2
    for name, array in est.pdfs.arrays().items():  # the same quantisation as at build
        np.testing.assert_array_equal(again.pdfs.arrays()[name], array)


def test_damaged_version_1_files_are_named(built, tmp_path):
    est, pdfs, _, _ = built
    v1 = _write_version_1(est, pdfs, tmp_path / "v1")
    for name, change, message in [
        ("f64", lambda p: p.astype(np.float64), r"pdfs.npy: expected float32 \(600, 100\), got float64"),
        ("rows", lambda p: p[:300], r"pdfs.npy: expected float32 \(600, 100\), got float32 \(300, 100\)"),
        ("sums", lambda p: p * 3, "pdfs.npy: rows do not sum to 1"),
    ]:
        bad = shutil.copytree(v1, tmp_path / name)
        np.save(bad / "pdfs.npy", change(np.load(bad / "pdfs.npy")))
        with pytest.raises(FileFormatError, match=message):
            LTAUEstimator.load(bad, verify=False)
    bad = shutil.copytree(v1, tmp_path / "flip")
    data = bytearray((bad / "pdfs.npy").read_bytes())
    data[-5] ^= 0xFF
    (bad / "pdfs.npy").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="pdfs.npy: checksum does not match"):
        LTAUEstimator.load(bad)


def test_corrupted_table_files_are_refused(built, tmp_path):
    est, _, _, root = built
    path = root / "v2" if (root / "v2").exists() else est.save(root / "v2")
    bad = shutil.copytree(path, tmp_path / "columns")
    np.save(bad / "pdf_columns.npy", np.load(bad / "pdf_columns.npy") + 20)
    with pytest.raises(FileFormatError, match="pdf_columns.npy: checksum does not match"):
        LTAUEstimator.load(bad)
    with pytest.raises(FileFormatError, match=f"{bad}: PDF table: block column .* beyond the 13 blocks"):
        LTAUEstimator.load(bad, verify=False)
    bad = shutil.copytree(path, tmp_path / "totals")
    np.save(bad / "pdf_totals.npy", np.load(bad / "pdf_totals.npy") - 1)
    with pytest.raises(FileFormatError,
                       match=r"PDF table \(pdf_\*.npy\): row 0's masses sum to 50400, its total is 50399"):
        LTAUEstimator.load(bad, verify=False)
    bad = shutil.copytree(path, tmp_path / "masses")
    meta = json.loads((bad / "meta.json").read_text())
    del meta["pdf_table"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="missing field.*pdf_table"):
        LTAUEstimator.load(bad)
    bad = shutil.copytree(path, tmp_path / "version")
    meta = json.loads((bad / "meta.json").read_text())
    meta["version"] = 3
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="version 3 is not supported .this ltau_lmp reads version 1 or 2."):
        LTAUEstimator.load(bad)
