"""``index="auto"``: candidates tuned on held-out atoms (reference atoms or whole training structures),
exact search kept where nothing beats it, the choice and its reason recorded and reloaded."""

import numpy as np
import pytest

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator import index as index_module
from ltau_lmp.estimator import index_tuning as tuning
from ltau_lmp.estimator.index import DEFAULT_KIND
from ltau_lmp.estimator.index_tuning import AUTO_RECALL, SMALL_RECALL, build_index

pytest.importorskip("faiss")


def _clustered(rng, n, dim=16, n_clusters=40, intrinsic=4):
    """Gaussian clusters on a low-dimensional subspace, like real latent spaces."""
    basis = np.linalg.qr(rng.normal(size=(dim, intrinsic)))[0].T
    centers = rng.normal(scale=4.0, size=(n_clusters, intrinsic))
    low = centers[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, intrinsic))
    return (low @ basis + rng.normal(scale=0.05, size=(n, dim))).astype(np.float32)


@pytest.fixture
def small_limit(monkeypatch):
    """auto's large regime on a few thousand points: the same code path as above the real limit, fast."""
    monkeypatch.setattr(tuning, "SMALL_LIMIT", 1000)
    return 1000


def _structures(n, size=50):
    return np.arange(n) // size


def _recall(found, exact):
    return float(np.mean((found[:, :, None] == exact[:, None, :]).any(axis=2)))


def test_auto_is_the_default_and_exact_without_held_out_atoms_below_the_limit():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20_000, 4)).astype(np.float32)
    auto = build_index(data, use_gpu=False)
    assert DEFAULT_KIND == "auto"
    assert auto.kind == "flat" and auto.options["auto"] is True
    assert "no held-out atoms" in auto.options["choice"]
    queries = rng.normal(size=(50, 4)).astype(np.float32)
    exact = build_index(data, "flat", use_gpu=False)
    for got, want in zip(auto.search(queries, 10), exact.search(queries, 10)):
        np.testing.assert_array_equal(got, want)


def test_above_the_limit_auto_refuses_without_held_out_atoms_and_says_how_to_give_them(small_limit):
    rng = np.random.default_rng(1)
    assert build_index(_clustered(rng, small_limit - 1), use_gpu=False).kind == "flat"
    data = _clustered(rng, 3 * small_limit)
    with pytest.raises(ConfigError, match="reference_descriptors.*structures.*index flat"):
        build_index(data, use_gpu=False)
    index = build_index(data, use_gpu=False, structures=_structures(len(data), 20))
    assert index.kind in ("ivf", "hnsw") and index.options["auto"] is True
    assert index.options["target_recall"] == AUTO_RECALL


def test_recall_measured_at_build_reaches_target_and_holds_for_new_points(small_limit):
    rng = np.random.default_rng(2)
    data = _clustered(rng, 6000)
    index = build_index(data[1000:], use_gpu=False, structures=_structures(5000))
    assert index.options["recall_at_10"] >= index.options["target_recall"] == AUTO_RECALL
    exact = build_index(data[1000:], "flat", use_gpu=False).search(data[:1000], 10)[1]
    assert _recall(index.search(data[:1000], 10)[1], exact) >= 0.95  # points not in the index


def test_auto_choice_is_reproducible_and_survives_save_and_load(small_limit, tmp_path):
    rng = np.random.default_rng(3)
    data = _clustered(rng, 2500)
    pdfs = rng.dirichlet(np.ones(8), size=len(data)).astype(np.float32)
    edges = np.logspace(-3, 0, 9)
    # given options: no race between candidates, whose outcome depends on measured speeds
    est = LTAUEstimator.build(data, pdfs, edges, use_gpu=False, structures=_structures(len(data)),
                              index_options={"nlist": 32})
    again = LTAUEstimator.build(data, pdfs, edges, use_gpu=False, structures=_structures(len(data)),
                                index_options={"nlist": 32})
    for index in (est.index, again.index):  # the measured speed, and the choice quoting it, differ
        assert index.options.pop("queries_per_cpu_s")["ivf"] > 0 and "queries/CPU-s" in index.options.pop("choice")
    assert est.index.options == again.index.options
    est.save(tmp_path / "est")
    back = LTAUEstimator.load(tmp_path / "est", use_gpu=False)
    assert (back.index.kind, back.index.options) == (est.index.kind, est.index.options)
    assert back.summary()["index"]["recall_at_10"] == est.index.options["recall_at_10"]
    queries = _clustered(rng, 200)
    np.testing.assert_array_equal(back.query(queries).neighbors, est.query(queries).neighbors)
    np.testing.assert_array_equal(again.query(queries).neighbors, est.query(queries).neighbors)


def test_given_options_override_auto_and_explicit_kinds_keep_their_defaults(small_limit):
    rng = np.random.default_rng(4)
    data = _clustered(rng, 2000)
    fixed = build_index(data, "auto", {"nprobe": 3}, use_gpu=False)
    assert fixed.options["nprobe"] == 3 and fixed.options["target_recall"] is None
    assert "recall not measured" in fixed.options["choice"] and "recall_at_10" not in fixed.options
    measured = build_index(data, "auto", {"nprobe": 3}, use_gpu=False, structures=_structures(len(data)))
    assert 0.0 < measured.options["recall_at_10"] <= 1.0  # measured, not tuned
    tuned = build_index(data, "ivf", {"nlist": 16, "target_recall": 0.999}, use_gpu=False,
                        structures=_structures(len(data)))
    assert tuned.options["recall_at_10"] >= 0.999
    plain = build_index(data, "ivf", {"nlist": 16}, use_gpu=False)
    assert plain.options == {"nlist": 16, "nprobe": 8, "quantizer": "flat", "target_recall": None, "pca": None,
                             "k_factor": 2}


def test_changing_nprobe_drops_the_stale_recall(small_limit):
    index = build_index(_clustered(np.random.default_rng(5), 2000), "ivf", {"target_recall": 0.9}, use_gpu=False,
                        structures=_structures(2000))
    index.set_search_options(nprobe=1)
    assert index.options["nprobe"] == 1 and index.options["target_recall"] is None
    assert "recall_at_10" not in index.options


@pytest.mark.parametrize("kind,options,message", [
    ("auto", {"recall_at_10": 0.9}, "recorded by the build"),
    ("auto", {"auto": False}, "recorded by the build"),
    ("auto", {"nprobe": 2, "target_recall": 0.9}, "not both"),
    ("auto", {"target_recall": 1.5}, r"target_recall must lie in \(0, 1\]"),
    ("auto", {"quantizer": "pq"}, "quantizer must be 'flat' or 'hnsw'"),
    ("auto", {"nlist": 0}, "nlist must be a positive integer"),
    ("auto", {"ef_search": 8}, "unknown option"),
    ("ivf", {"nprobe": None}, "needs a target_recall"),
    ("hnsw", {"ef_search": None}, "needs a target_recall"),
    ("hnsw", {"ef_search": 20, "target_recall": 0.9}, "not both"),
    ("hnsw", {"target_recall": 0.9}, "tuned on at least 200 held-out atoms"),
    ("ivf", {"target_recall": 0.9}, "tuned on at least 200 held-out atoms"),
    ("ivf", {"pca": 16}, r"pca .* must be an integer in \[1, 15\]"),
])
def test_bad_options_are_refused_clearly(small_limit, kind, options, message):
    data = _clustered(np.random.default_rng(6), 1500)
    with pytest.raises(ConfigError, match=message):
        build_index(data, kind, options, use_gpu=False)


def test_rebuild_only_options_cannot_change_after_build(small_limit):
    index = build_index(_clustered(np.random.default_rng(7), 3000), use_gpu=False, structures=_structures(3000))
    for option in ("target_recall", "nlist", "quantizer", "pca", "recall_at_10", "choice"):
        with pytest.raises(ConfigError, match="without rebuilding"):
            index.set_search_options(**{option: 1})


def test_auto_uses_an_hnsw_quantizer_for_many_lists_and_reloads_it(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "SMALL_LIMIT", 100)
    monkeypatch.setattr(tuning, "AUTO_HNSW_QUANTIZER_NLIST", 32)
    rng = np.random.default_rng(8)
    data = _clustered(rng, 2000)
    est = LTAUEstimator.build(data, rng.dirichlet(np.ones(4), size=len(data)).astype(np.float32),
                              np.logspace(-3, 0, 5), use_gpu=False, index_options={"nprobe": None},
                              structures=_structures(len(data)))
    assert (est.index.options["nlist"], est.index.options["quantizer"]) == (62, "hnsw")
    assert est.index.options["recall_at_10"] >= AUTO_RECALL
    est.save(tmp_path / "est")
    back = LTAUEstimator.load(tmp_path / "est", use_gpu=False)  # memory-mapped
    queries = _clustered(rng, 100)
    np.testing.assert_array_equal(back.query(queries).neighbors, est.query(queries).neighbors)


@pytest.mark.parametrize("kind", ["auto", "ivf", "hnsw"])
def test_search_parameter_is_tuned_on_the_reference_atoms_when_there_are_enough(small_limit, kind):
    """The recorded recall is that of the held-out reference atoms themselves (all of them are
    used below ``RECALL_QUERIES``), and nprobe / ef_search is the smallest whose recall reaches
    the target on them with confidence: mean - RECALL_Z standard errors (ef_search from k = 10:
    HNSW never searches a narrower beam)."""
    rng = np.random.default_rng(9)
    data = _clustered(rng, 6000)
    reference, entries = data[:500], data[500:]
    options = None if kind == "auto" else {"target_recall": AUTO_RECALL}
    index = build_index(entries, kind, options, use_gpu=False, tuning_queries=reference)
    assert index.options["recall_queries"] == "reference"
    exact = build_index(entries, "flat", use_gpu=False).search(reference, 10)[1]
    assert index.options["recall_at_10"] == round(_recall(index.search(reference, 10)[1], exact), 4)  # no ties here
    assert index.options["recall_at_10"] >= AUTO_RECALL
    assert _recall_bound(index.search(reference, 10)[1], exact) >= AUTO_RECALL
    tuned = index_module.TUNED[index.kind]
    if index.options[tuned] > (1 if index.kind == "ivf" else 10):
        index.set_search_options(**{tuned: index.options[tuned] - 1})
        assert _recall_bound(index.search(reference, 10)[1], exact) < AUTO_RECALL


def _recall_bound(found, exact):
    per_query = (found[:, :, None] == exact[:, None, :]).any(axis=2).mean(axis=1)
    return per_query.mean() - tuning.RECALL_Z * per_query.std() / np.sqrt(len(per_query))


@pytest.mark.parametrize("data_kind", ["clustered", "even"])
def test_auto_races_hnsw_against_ivf_on_the_reference_and_keeps_the_faster(small_limit, tmp_path, data_kind):
    """Both candidates reach the target on the reference atoms; the kept one is the faster by the
    rule (HNSW only with ``HNSW_MARGIN``); the estimator reloads with the same choice."""
    rng = np.random.default_rng(12)
    data = _clustered(rng, 4000) if data_kind == "clustered" else rng.normal(size=(4000, 16)).astype(np.float32)
    pdfs, edges = rng.dirichlet(np.ones(4), size=3500).astype(np.float32), np.logspace(-3, 0, 5)
    est = LTAUEstimator.build(data[500:], pdfs, edges, use_gpu=False, reference_descriptors=data[:500])
    options = est.index.options
    rates = options["queries_per_cpu_s"]
    assert set(rates) == {"ivf", "hnsw"} and min(rates.values()) > 0
    by_speed = rates["hnsw"] > tuning.HNSW_MARGIN * rates["ivf"]
    alone = f"{'ivf' if est.index.kind == 'hnsw' else 'hnsw'} did not reach the target" in options["choice"]
    assert (est.index.kind == "hnsw") == by_speed or alone
    assert options["auto"] is True and options["recall_at_10"] >= AUTO_RECALL
    est.save(tmp_path / "est")
    back = LTAUEstimator.load(tmp_path / "est", use_gpu=False)
    assert (back.index.kind, back.index.options) == (est.index.kind, options)
    np.testing.assert_array_equal(back.query(data[:100]).neighbors, est.query(data[:100]).neighbors)


def test_too_few_reference_atoms_fall_back_to_held_out_structures(small_limit):
    rng = np.random.default_rng(10)
    data = _clustered(rng, 3000)
    few = tuning.MIN_TUNING_QUERIES - 1
    with pytest.raises(ConfigError, match="held-out"):
        build_index(data[few:], use_gpu=False, tuning_queries=data[:few])
    index = build_index(data[few:], use_gpu=False, tuning_queries=data[:few], structures=_structures(3000 - few))
    assert index.options["recall_queries"] == "held-out structures"
    assert index.options["recall_at_10"] >= AUTO_RECALL


def test_estimator_build_tunes_on_its_reference_and_checks_it_first(small_limit):
    rng = np.random.default_rng(11)
    data = _clustered(rng, 3000)
    pdfs, edges = rng.dirichlet(np.ones(4), size=2500).astype(np.float32), np.logspace(-3, 0, 5)
    est = LTAUEstimator.build(data[500:], pdfs, edges, use_gpu=False, reference_descriptors=data[:500])
    assert est.index.options["recall_queries"] == "reference" and est.has_ood_reference
    assert est.index.kind in ("ivf", "hnsw") and set(est.index.options["queries_per_cpu_s"]) == {"ivf", "hnsw"}
    with pytest.raises(ConfigError, match=r"reference descriptors: descriptors must have shape \(n, 16\)"):
        LTAUEstimator.build(data[500:], pdfs, edges, use_gpu=False, reference_descriptors=data[:500, :8])


@pytest.mark.parametrize("kind,options", [("ivf", {"nlist": 32, "nprobe": 3}),
                                          ("ivf", {"nlist": 32, "nprobe": 2, "quantizer": "hnsw"}),
                                          ("hnsw", {"M": 16, "ef_search": 12})])
def test_locality_ordered_search_gives_faiss_own_answers_in_query_order(kind, options):
    """Batches from ``LOCALITY_MIN_QUERIES`` are searched sorted by latent locality and put back:
    the same neighbours and distances as faiss's plain search, row for row."""
    rng = np.random.default_rng(13)
    data = _clustered(rng, 3000)
    queries = _clustered(rng, 500)
    index = build_index(data, kind, options, use_gpu=False)
    assert len(queries) >= index_module.LOCALITY_MIN_QUERIES
    dist, ids = index.search(queries, 10)
    plain_sq, plain_ids = index.cpu_index.search(queries, 10)
    np.testing.assert_array_equal(ids, plain_ids)
    np.testing.assert_allclose(dist, np.sqrt(np.maximum(plain_sq, 0)), rtol=1e-6)
    order = np.argsort(queries[:, 0])  # another batch order: each query's answer does not depend on it
    np.testing.assert_array_equal(index.search(queries[order], 10)[1], plain_ids[order])


def test_hnsw_nodes_stored_in_locality_order_answer_as_the_graph_built_in_row_order():
    """The HNSW graph is built in row order and only its storage is permuted (an id map gives row
    ids back): one thread (a deterministic build), the answers of faiss's own HNSW, id for id."""
    import faiss

    rng = np.random.default_rng(14)
    data, queries = _clustered(rng, 3000), _clustered(rng, 300)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index = build_index(data, "hnsw", {"M": 16, "ef_search": 20}, use_gpu=False)
        plain = faiss.IndexHNSWFlat(data.shape[1], 16)
        plain.hnsw.efConstruction = index.options["ef_construction"]
        plain.add(data)
    finally:
        faiss.omp_set_num_threads(threads)
    plain.hnsw.efSearch = 20
    stored = faiss.vector_to_array(index.cpu_index.id_map)
    assert sorted(stored) == list(range(len(data))) and not np.array_equal(stored, np.arange(len(data)))
    np.testing.assert_array_equal(index.search(queries, 10)[1], plain.search(queries, 10)[1])


def test_held_out_structures_are_left_out_while_tuning_and_in_the_index_after(small_limit):
    """Without reference atoms, whole structures are held out: the candidates are tuned on atoms the
    index did not hold, then those atoms are added (every row is an entry, found as itself)."""
    rng = np.random.default_rng(20)
    data = _clustered(rng, 4000)
    structures = _structures(len(data), 40)
    held, n_held = tuning.held_out_structures(structures, len(data))
    assert n_held >= 1 and set(np.unique(structures[held])).isdisjoint(np.unique(structures[~held]))
    assert tuning.MIN_TUNING_QUERIES <= held.sum() <= tuning.HELD_OUT_FRACTION * len(data)
    index = build_index(data, use_gpu=False, structures=structures)
    assert index.ntotal == len(data) and index.options["recall_queries"] == "held-out structures"
    assert f"of {n_held} held-out training structure" in index.options["choice"]
    rows = np.flatnonzero(held)[:50]
    np.testing.assert_array_equal(index.search(data[rows], 1)[1][:, 0], rows)
    with pytest.raises(ConfigError, match="one structure id per descriptor row"):
        build_index(data, use_gpu=False, structures=structures[:-1])


def test_tuning_stops_at_the_cost_ceiling_and_says_so(small_limit, monkeypatch):
    """Latents that fill 32 dimensions evenly: no IVF reaches recall 0.999 scanning 10 % of its
    lists; auto stops there, warns, and the choice names the ceiling and the recall reached."""
    monkeypatch.setattr(tuning, "AUTO_RECALL", 0.999)
    rng = np.random.default_rng(21)
    data = rng.normal(size=(4000, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match="not reached within the cost ceiling"):
        index = build_index(data, "auto", {"nlist": 64}, use_gpu=False, structures=_structures(len(data)))
    assert index.options["nprobe"] == tuning.ceiling_value("ivf", index.options) == 7
    assert index.options["recall_at_10"] < 0.999
    assert f"recall@10 {index.options['recall_at_10']:.3f}" in index.options["choice"]


@pytest.mark.parametrize("speedup,kind", [(1e9, "flat"), (0.0, "approximate")])
def test_small_estimators_keep_exact_search_unless_beaten_at_recall_099(monkeypatch, speedup, kind):
    monkeypatch.setattr(tuning, "SMALL_SPEEDUP", speedup)
    rng = np.random.default_rng(22)
    data = _clustered(rng, 5000)
    index = build_index(data[500:], use_gpu=False, tuning_queries=data[:500])
    assert set(index.options["queries_per_cpu_s"]) == {"flat", "ivf", "hnsw"}
    if kind == "flat":
        assert index.kind == "flat" and f"auto needs recall {SMALL_RECALL}" in index.options["choice"]
    else:
        assert index.kind in ("ivf", "hnsw") and index.options["recall_at_10"] >= SMALL_RECALL
        assert "x exact search" in index.options["choice"]


def test_vectors_far_from_the_origin_keep_their_exact_neighbours():
    """Latents with a large common offset (MACE's: norm ~15, neighbours ~0.01 apart): exact search
    in float32 loses its neighbours to rounding unless the vectors are centred."""
    rng = np.random.default_rng(23)
    offset = rng.normal(size=64).astype(np.float32) * 2.0
    data = offset + 0.01 * rng.normal(size=(5000, 64)).astype(np.float32)
    queries = offset + 0.01 * rng.normal(size=(200, 64)).astype(np.float32)
    found = build_index(data, "flat", use_gpu=False).search(queries, 10)[1]
    truth = np.argsort(((queries[:, None, :].astype(np.float64) - data[None].astype(np.float64)) ** 2).sum(-1),
                       axis=1)[:, :10]
    assert _recall(found, truth) >= 0.999


def test_high_dimensional_latents_get_a_pca_ivf_with_exact_reranking(small_limit, monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "PCA_MIN_DIM", 32)
    rng = np.random.default_rng(24)
    data = _clustered(rng, 6000, dim=48, intrinsic=6)
    pdfs, edges = rng.dirichlet(np.ones(4), size=5500).astype(np.float32), np.logspace(-3, 0, 5)
    est = LTAUEstimator.build(data[500:], pdfs, edges, use_gpu=False, reference_descriptors=data[:500])
    options = est.index.options
    assert est.index.kind == "ivf" and options["pca"] == 16 and options["k_factor"] == 2
    assert options["recall_at_10"] >= AUTO_RECALL
    dist = est.index.search(data[:50], 10)[0]
    exact_rows = data[500:][est.index.search(data[:50], 10)[1]]
    np.testing.assert_allclose(dist, np.linalg.norm(exact_rows - data[:50, None, :], axis=2), rtol=1e-4, atol=1e-5)
    est.save(tmp_path / "est")
    back = LTAUEstimator.load(tmp_path / "est", use_gpu=False)
    assert back.index.options == options
    np.testing.assert_array_equal(back.query(data[:100]).neighbors, est.query(data[:100]).neighbors)


def test_queries_whose_probed_lists_are_short_still_get_k_neighbours():
    """An IVF probing 1 of 64 lists over 300 entries returns fewer than k for some queries: those
    are searched again over every list, so MD gets k neighbours, the exact ones there."""
    rng = np.random.default_rng(25)
    data, queries = _clustered(rng, 300), _clustered(rng, 200)
    index = build_index(data, "ivf", {"nlist": 64, "nprobe": 1}, use_gpu=False)
    assert (index.cpu_index.search(queries, 10)[1] < 0).any()
    dist, ids = index.search(queries, 10)
    assert (ids >= 0).all() and index.options["nprobe"] == 1
    short = (index.cpu_index.search(queries, 10)[1] < 0).any(axis=1)
    exact = build_index(data, "flat", use_gpu=False).search(queries[short], 10)[1]
    np.testing.assert_array_equal(ids[short], exact)


def test_pca_ivf_reranks_more_candidates_where_near_duplicates_differ_in_dropped_parts(small_limit,
                                                                                          monkeypatch):
    """Copies of a few atoms with small noise in every dimension: PCA keeps the atoms'
    directions and drops most of the noise that orders the copies, so probing more lists cannot
    reach the target; re-ranking more candidates exactly does, and the build records how many."""
    monkeypatch.setattr(tuning, "PCA_MIN_DIM", 32)
    monkeypatch.setattr(tuning, "PCA_VARIANCE", 0.99)
    rng = np.random.default_rng(26)
    originals = _clustered(rng, 40, dim=48, intrinsic=6)
    data = originals[rng.integers(0, 40, 6000)] + 0.05 * rng.normal(size=(6000, 48)).astype(np.float32)
    queries = originals[rng.integers(0, 40, 400)] + 0.05 * rng.normal(size=(400, 48)).astype(np.float32)
    index = build_index(data, use_gpu=False, tuning_queries=queries)
    assert index.options["pca"] == 16 and index.options["recall_at_10"] >= AUTO_RECALL
    assert index.options["k_factor"] > 2
    index.set_search_options(k_factor=2)
    dist, found = index.search(queries, 10)
    exact = build_index(data, "flat", use_gpu=False).search(queries, 10)[1]
    assert _recall(found, exact) < AUTO_RECALL
