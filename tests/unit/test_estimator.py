"""LTAUEstimator: hand-computed cases, index backends and recall on real latent spaces."""

import numpy as np
import pytest

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator import ErrorLog, LTAUEstimator, log_midpoints
from ltau_lmp.estimator.index_tuning import build_index
from ltau_lmp.estimator.pdf_table import QUANTISED_TOTAL
from ltau_lmp.pipeline import card_metadata

from helpers.paths import DATA

EDGES = np.array([1.0, 2.0, 4.0, 8.0])


def _separated_points(n, dim=4):
    return (np.eye(n, dim) * 10.0 * (1 + np.arange(n))[:, None]).astype(np.float32)


def _random_pdfs(rng, n, nbins):
    p = rng.random((n, nbins)).astype(np.float32)
    return p / p.sum(axis=1, keepdims=True)


def test_k1_returns_the_neighbours_pdf_exactly():
    rng = np.random.default_rng(0)
    pdfs = _random_pdfs(rng, 3, 3)
    est = LTAUEstimator.build(_separated_points(3), pdfs, EDGES, index="flat", k=1)
    res = est.query(_separated_points(3) + 0.1)
    np.testing.assert_array_equal(res.pdf, est.pdfs.rows(np.arange(3)))
    np.testing.assert_allclose(res.pdf, pdfs, rtol=0, atol=1 / QUANTISED_TOTAL)  # float PDFs are stored quantised
    np.testing.assert_allclose(res.distance, 0.2, rtol=1e-5)


def test_expected_error_is_sum_of_mass_times_log_midpoint():
    pdfs = np.array([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]], dtype=np.float32)
    est = LTAUEstimator.build(_separated_points(2), pdfs, EDGES, index="flat", k=1)
    res = est.query(_separated_points(2))
    mid = np.sqrt([2.0, 8.0, 32.0])
    np.testing.assert_allclose(res.expected, [0.5 * mid[0] + 0.5 * mid[1], 0.25 * mid[1] + 0.75 * mid[2]],
                               rtol=1e-6)
    np.testing.assert_allclose(log_midpoints(EDGES), mid)


def test_knn_average_of_pdfs_and_expected():
    pdfs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    points = np.array([[0.0], [1.0], [10.0]], dtype=np.float32)
    est = LTAUEstimator.build(points, pdfs, EDGES, index="flat", k=2)
    res = est.query(np.array([[0.4]], dtype=np.float32))
    np.testing.assert_allclose(res.pdf, [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(res.distance, [(0.4 + 0.6) / 2], rtol=1e-6)
    np.testing.assert_allclose(res.expected, [(np.sqrt(2) + np.sqrt(8)) / 2], rtol=1e-6)


def test_distance_weighting_option():
    pdfs = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    points = np.array([[0.0], [1.0]], dtype=np.float32)
    est = LTAUEstimator.build(points, pdfs, EDGES, index="flat", k=2, weighting="distance")
    res = est.query(np.array([[0.25]], dtype=np.float32))
    np.testing.assert_allclose(res.pdf, [[0.75, 0.25, 0.0]], rtol=1e-6)


def _two_bin_result():
    pdfs = np.array([[0.5, 0.5]], dtype=np.float32)
    est = LTAUEstimator.build(np.zeros((1, 2), np.float32), pdfs, [1.0, 2.0, 4.0], index="flat", k=1)
    return est.query(np.zeros((1, 2), np.float32))


@pytest.mark.parametrize("q,value", [(0.0, 1.0), (0.25, 1.5), (0.5, 2.0), (0.75, 3.0), (1.0, 4.0)])
def test_quantiles_at_and_between_bin_edges(q, value):
    np.testing.assert_allclose(_two_bin_result().quantile(q), [value])


@pytest.mark.parametrize("tol,p", [(0.5, 0.0), (1.0, 0.0), (1.5, 0.25), (2.0, 0.5), (3.0, 0.75),
                                   (4.0, 1.0), (9.0, 1.0)])
def test_prob_below_interpolates_inside_bins(tol, p):
    np.testing.assert_allclose(_two_bin_result().prob_below(tol), [p])


def test_quantile_skips_empty_bins():
    pdfs = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
    est = LTAUEstimator.build(np.zeros((1, 1), np.float32), pdfs, EDGES, index="flat", k=1)
    res = est.query(np.zeros((1, 1), np.float32))
    np.testing.assert_allclose(res.interval(0.25, 0.75), [[5.0, 7.0]])
    np.testing.assert_allclose(res.prob_below(4.0), [0.0])


def test_build_from_error_log_equals_build_from_its_pdfs():
    rng = np.random.default_rng(3)
    log = ErrorLog.log_spaced(200, 1e-3, 10.0, 30)
    for _ in range(5):
        log.update(np.arange(200), rng.lognormal(-2, 1, 200))
        log.end_epoch()
    x = rng.normal(size=(200, 8)).astype(np.float32)
    a = LTAUEstimator.build(x, log, index="flat").query(x[:20])
    b = LTAUEstimator.build(x, log.pdfs(), log.bin_edges, index="flat").query(x[:20])
    assert (a.estimator.pdfs.source, b.estimator.pdfs.source) == ("counts", "quantised")
    # counts c / 5 are stored exactly either way (c, total 5 or 10080 c, total 50400): rounding apart
    np.testing.assert_allclose(a.expected, b.expected, rtol=1e-12)
    np.testing.assert_allclose(a.pdf, b.pdf, rtol=1e-6)


def test_chunked_query_equals_one_shot():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    est = LTAUEstimator.build(x, _random_pdfs(rng, 500, 12), np.logspace(-3, 1, 13), index="flat")
    q = rng.normal(size=(333, 6)).astype(np.float32)
    whole, chunked = est.query(q), est.query(q, chunk_size=50)
    np.testing.assert_array_equal(whole.neighbors, chunked.neighbors)
    np.testing.assert_allclose(whole.expected, chunked.expected)
    np.testing.assert_allclose(whole.interval(), chunked.interval())


def test_bad_inputs_are_rejected():
    x = np.zeros((3, 2), np.float32)
    pdfs = np.full((3, 2), 0.5, np.float32)
    with pytest.raises(ConfigError, match="needs bin_edges"):
        LTAUEstimator.build(x, pdfs)
    with pytest.raises(ConfigError, match="do not sum to 1"):
        LTAUEstimator.build(x, pdfs * 2, [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="2 descriptors but 3"):
        LTAUEstimator.build(x[:2], pdfs, [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="k must lie"):
        LTAUEstimator.build(x, pdfs, [1.0, 2.0, 3.0], k=4)
    with pytest.raises(ConfigError, match="unknown index kind"):
        LTAUEstimator.build(x, pdfs, [1.0, 2.0, 3.0], index="annoy")
    est = LTAUEstimator.build(x, pdfs, [1.0, 2.0, 3.0], k=1)
    with pytest.raises(ConfigError, match=r"shape \(n, 2\)"):
        est.query(np.zeros((1, 3), np.float32))
    with pytest.raises(ConfigError, match="NaN"):
        est.query(np.full((1, 2), np.nan, np.float32))


def _clustered(rng, n, dim, n_clusters=50):
    centers = rng.normal(scale=5.0, size=(n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32)


def _recall_at_10(vectors, queries, kind, **options):
    exact = build_index(vectors, "flat").search(queries, 10)[1]
    approx = build_index(vectors, kind, options).search(queries, 10)[1]
    return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])


def test_hnsw_recall_on_clustered_data():
    rng = np.random.default_rng(5)
    data = _clustered(rng, 20_000, 32)
    assert _recall_at_10(data[1000:], data[:1000], "hnsw") >= 0.9


def test_hnsw_recall_on_real_nequip_descriptors():
    """13,500 3BPA latent vectors (NequIP) as the index; the GAP-20 carbon structure's
    features cannot serve as queries here (other model), so hold out 3BPA atoms instead."""
    data = np.load(DATA / "3bpa" / "descriptors.npy")
    rng = np.random.default_rng(6)
    held_out = rng.choice(len(data), 1000, replace=False)
    keep = np.setdiff1d(np.arange(len(data)), held_out)
    assert _recall_at_10(data[keep], data[held_out], "hnsw") >= 0.9


def test_gap20_descriptors_self_query_is_exact():
    data = np.load(DATA / "gap20" / "descriptors_sample_215.npy")
    rng = np.random.default_rng(7)
    est = LTAUEstimator.build(data, _random_pdfs(rng, len(data), 20), np.logspace(-3, 1, 21), index="hnsw", k=1)
    res = est.query(data)
    assert np.mean(res.neighbors[:, 0] == np.arange(len(data))) >= 0.97
    np.testing.assert_allclose(res.distance[res.neighbors[:, 0] == np.arange(len(data))], 0.0, atol=1e-3)


def test_ivfpq_backend_finds_most_true_neighbours():
    rng = np.random.default_rng(8)
    data = _clustered(rng, 8_000, 16)
    assert _recall_at_10(data[500:], data[:500], "ivfpq", nlist=32, pq_m=16, nbits=4, nprobe=8) >= 0.6


def test_index_options_are_validated():
    with pytest.raises(ConfigError, match="unknown option"):
        build_index(np.zeros((10, 4), np.float32), "hnsw", {"efSearch": 3})
    with pytest.raises(ConfigError, match="must divide"):
        build_index(np.zeros((10, 6), np.float32), "ivfpq", {"pq_m": 4, "nlist": 1})


def test_auto_index_kind_follows_size():
    small = build_index(np.zeros((10, 4), np.float32), "auto")
    assert small.kind == "flat"


def test_ivf_backend_recall_on_real_nequip_descriptors():
    data = np.load(DATA / "3bpa" / "descriptors.npy")
    rng = np.random.default_rng(9)
    held_out = rng.choice(len(data), 1000, replace=False)
    keep = np.setdiff1d(np.arange(len(data)), held_out)
    assert _recall_at_10(data[keep], data[held_out], "ivf", nprobe=8) >= 0.9


def test_search_options_change_without_rebuilding():
    rng = np.random.default_rng(10)
    index = build_index(rng.normal(size=(500, 4)).astype(np.float32), "hnsw")
    index.set_search_options(ef_search=64)
    assert index.options["ef_search"] == 64
    assert _faiss_ef_search(index) == 64
    with pytest.raises(ConfigError, match="unknown option"):
        index.set_search_options(nprobe=3)


def _faiss_ef_search(index):
    from ltau_lmp.estimator.index import hnsw_flat

    return hnsw_flat(index.cpu_index).hnsw.efSearch


def _card(hash_char, latent_dim=3):
    from ltau_lmp.model import ModelCard

    return ModelCard(family="ltau_local", species=("Si",), cutoff=4.0, num_layers=1, receptive_field=4.0,
                     latent_dim=latent_dim, latent="test", dtype="float64", model_hash=hash_char * 64)


def test_check_model_refuses_another_models_latent_space(tmp_path):
    descriptors = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    pdfs, edges = np.full((20, 2), 0.5), np.array([0.01, 0.1, 1.0])
    est = LTAUEstimator.build(descriptors, pdfs, bin_edges=edges, k=2, metadata=card_metadata(_card("a")))
    est.check_model(_card("a"))
    with pytest.raises(ConfigError, match=r"built for model aaaaaaaaaaaa, not for m.pt "
                                          r"\(ltau_local model bbbbbbbbbbbb\): rebuild"):
        est.check_model(_card("b"), "m.pt")
    with pytest.raises(ConfigError, match="3-dimensional latent features but this model has latent_dim 4"):
        est.check_model(_card("a", latent_dim=4))
    bare = LTAUEstimator.build(descriptors, pdfs, bin_edges=edges, k=2)  # no card: only the width is known
    bare.check_model(_card("b"))
    with pytest.raises(ConfigError, match="latent_dim 4"):
        bare.check_model(_card("b", latent_dim=4))
    # the card travels with the file and is what `info` shows first
    back = LTAUEstimator.load(est.save(tmp_path / "est"))
    assert back.metadata == {**card_metadata(_card("a")), "model_binding": "checked"}
    assert back.summary()["model_card"] == _card("a").to_dict() and back.model_binding == "checked"
    assert bare.summary()["model_card"] is None and bare.summary()["model_binding"] == "unchecked"


def test_card_metadata_must_describe_the_descriptors():
    descriptors = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    pdfs, edges = np.full((20, 2), 0.5), np.array([0.01, 0.1, 1.0])
    with pytest.raises(ConfigError, match="3-dimensional but the model card says latent_dim 5"):
        LTAUEstimator.build(descriptors, pdfs, bin_edges=edges, k=2, metadata=card_metadata(_card("a", 5)))
    with pytest.raises(ConfigError, match="model_hash differs from the model card"):
        LTAUEstimator.build(descriptors, pdfs, bin_edges=edges, k=2,
                            metadata={**card_metadata(_card("a")), "model_hash": "c" * 64})