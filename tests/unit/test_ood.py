"""Out-of-domain p-values and alarm thresholds: calibration on held-out atoms, exactness, files."""

import json
import shutil

import numpy as np
import pytest
from scipy import stats

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.calibration import alarm, alarm_thresholds, fit_tail, ood_pvalues, thresholds_for

EDGES = np.logspace(-3, 1, 11)
DIM = 6


def _pdfs(rng, n):
    p = rng.random((n, EDGES.size - 1)).astype(np.float32)
    return p / p.sum(axis=1, keepdims=True)


def _in_domain(rng, n):
    """One in-domain distribution: a correlated Gaussian in latent space."""
    return (rng.normal(size=(n, DIM)) * np.linspace(0.5, 2.0, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def calibrated():
    """Training entries, a large held-out reference and a fresh in-domain test sample, all i.i.d."""
    rng = np.random.default_rng(0)
    train = _in_domain(rng, 4000)
    est = LTAUEstimator.build(train, _pdfs(rng, 4000), EDGES, index="flat", k=10,
                              reference_descriptors=_in_domain(rng, 20000), false_alarm_rate=0.05)
    return est, _in_domain(rng, 3000)


def test_in_domain_pvalues_are_uniform(calibrated):
    est, test = calibrated
    p = est.query(test).ood
    ks = stats.kstest(p, "uniform")
    assert ks.pvalue > 0.01, ks
    # the alarm rule fires on in-domain atoms at the stated rate (binomial 3000 x 0.05: sd 0.004)
    assert abs(np.mean(alarm(est.alarm_thresholds, "ood", p)) - 0.05) < 0.015
    rate_expected = np.mean(alarm(est.alarm_thresholds, "expected", est.query(test).expected))
    assert abs(rate_expected - 0.05) < 0.015


def test_training_atoms_are_not_a_valid_reference(calibrated):
    """The reference must be held out: atoms in the index sit at distance ~0 of themselves, so their
    distances are too small and p-values of new in-domain atoms pile up near 0 (KS rejects)."""
    est, test = calibrated
    rng = np.random.default_rng(0)
    train = _in_domain(rng, 4000)
    leaky = LTAUEstimator.build(train, _pdfs(rng, 4000), EDGES, index="flat", k=10, reference_descriptors=train)
    assert stats.kstest(leaky.query(test).ood, "uniform").pvalue < 1e-6


def test_pvalue_formula_ties_and_extremes():
    reference = np.array([1.0, 2.0, 2.0, 3.0])
    p = ood_pvalues(reference, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 1e30])
    np.testing.assert_array_equal(p, np.array([5, 5, 4, 4, 2, 2, 1, 1]) / 5.0)


def test_pvalue_is_exactly_monotone_in_distance(calibrated):
    est, _ = calibrated
    rng = np.random.default_rng(3)
    d = np.sort(np.r_[rng.uniform(0, 2 * est.reference_distances[-1], 5000), est.reference_distances[::7],
                      est.reference_distances[::7]])  # reference values themselves, twice: ties
    p = est.ood_pvalues(d)
    assert np.all(np.diff(p) <= 0)
    assert np.all(p[1:][np.diff(d) == 0] == p[:-1][np.diff(d) == 0])
    # through the query: points further and further out along one direction
    ray = np.outer(np.geomspace(0.01, 100.0, 200), np.ones(DIM)).astype(np.float32)
    res = est.query(ray)
    order = np.argsort(res.distance, kind="stable")
    assert np.all(np.diff(res.ood[order]) <= 0)


def test_far_points_fall_along_the_fitted_tail(calibrated):
    """Beyond the reference's reach p keeps falling (fitted tail) below the rank's floor 1/(n+1);
    without enough reference atoms for a fit, far points get exactly that floor."""
    est, _ = calibrated
    n = est.reference_distances.size
    assert est.alarm_thresholds["n_reference"] == n == 20000
    ray = np.outer([3.0, 5.0, 10.0, 1e3], np.ones(DIM)).astype(np.float32)
    p = est.query(ray).ood
    assert np.all(p < 1.0 / (n + 1)) and np.all(np.diff(p) <= 0) and p[0] > p[-1]
    tail = est.alarm_thresholds["distance_tail"]
    assert tail["n_tail"] == 2000 and tail["mass"] == pytest.approx(2001 / 20001)
    # continuous at the tail's start: the rank just below it, the fit just above it
    start = tail["start"]
    below, above = est.ood_pvalues([start, np.nextafter(start, np.inf)])
    assert above == pytest.approx(below, rel=2e-3)

    rng = np.random.default_rng(4)
    small = LTAUEstimator.build(_in_domain(rng, 500), _pdfs(rng, 500), EDGES, index="flat", k=10,
                                reference_descriptors=_in_domain(rng, 300))
    assert small.alarm_thresholds["distance_tail"] is None
    np.testing.assert_array_equal(small.query(ray).ood, 1.0 / 301)


def test_fitted_tail_holds_below_the_rank_floor():
    """The tail is a model: check it where the rank cannot reach. 2,000 held-out atoms (floor
    5e-4) and 200,000 fresh in-domain atoms: the fraction at p <= 1e-4 is 1e-4 (20 expected)."""
    rng = np.random.default_rng(5)
    est = LTAUEstimator.build(_in_domain(rng, 4000), _pdfs(rng, 4000), EDGES, index="flat", k=10,
                              reference_descriptors=_in_domain(rng, 2000), false_alarm_rate=0.01)
    p = est.query(_in_domain(rng, 200_000)).ood
    for level, low, high in ((1e-3, 140, 270), (1e-4, 7, 40)):   # Poisson(200k x level), ~ +-3 sd and fit error
        assert low <= np.count_nonzero(p <= level) <= high, (level, np.count_nonzero(p <= level))


def test_group_thresholds_bound_the_rate_per_evaluation():
    """halt auto watching M atoms: each atom at rate / M, so in-domain evaluations of M atoms
    alarm at most at the stated rate (union bound), for both metrics; more atoms, stricter limits."""
    rng = np.random.default_rng(6)
    est = LTAUEstimator.build(_in_domain(rng, 4000), _pdfs(rng, 4000), EDGES, index="flat", k=10,
                              reference_descriptors=_in_domain(rng, 5000), false_alarm_rate=0.05)
    t = est.alarm_thresholds
    few, many = thresholds_for(t, 10), thresholds_for(t, 1000)
    assert many["ood"] == pytest.approx(5e-5) and few["ood"] == pytest.approx(5e-3)
    assert many["expected"] > few["expected"] > t["expected"] == thresholds_for(t, 1)["expected"]
    res = est.query(_in_domain(rng, 100_000))
    for metric, values in (("ood", res.ood), ("expected", res.expected)):
        groups = alarm(t, metric, values, n_atoms=50).reshape(2000, 50).any(axis=1)
        assert groups.mean() <= 0.05 + 0.015, (metric, groups.mean())   # binomial sd 0.005


def test_thresholds_by_rank_with_floor():
    expected = np.arange(1.0, 10.0)[::-1].copy()  # 9 held-out atoms, expected errors 9..1
    reference = np.arange(9.0)
    t = alarm_thresholds(reference, expected, 0.25)  # rank ceil(0.75 * 10) = 8
    assert t == {"false_alarm_rate": 0.25, "expected": 8.0, "ood": 0.25, "n_reference": 9,
                 "distance_tail": None, "expected_tail": None}   # 9 atoms: too few for a tail fit
    assert thresholds_for(t, 100) == {"expected": 8.0, "ood": 0.1}  # no fit: floored, not scaled
    t = alarm_thresholds(reference, expected, 0.1)  # rank ceil(0.9 * 10) = 9 exactly (round-off guarded)
    assert t["expected"] == 9.0 and t["ood"] == 0.1
    t = alarm_thresholds(reference, expected, 1e-3)  # below 1/(n+1): the maximum, p floored
    assert t["expected"] == 9.0 and t["ood"] == 0.1
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        alarm_thresholds(reference, expected, 0.0)
    with pytest.raises(ConfigError, match="no alarm threshold for metric 'distance'"):
        alarm(t, "distance", [1.0])


def test_tail_fit_needs_enough_distinct_values():
    """Ties at the top (a constant set) leave nothing to fit: no tail, not a crash."""
    assert fit_tail(np.ones(1000)) is None and fit_tail(np.arange(400.0)) is None   # 40 < MIN_TAIL values
    assert fit_tail(np.arange(1000.0)).n_tail == 100


def test_thresholds_and_reference_survive_save_and_load(calibrated, tmp_path):
    est, test = calibrated
    path = est.save(tmp_path / "e")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["files"]["reference_distances"] == "reference_distances.npy"
    assert len(meta["sha256"]["reference_distances"]) == 64
    assert meta["alarm_thresholds"] == est.alarm_thresholds
    back = LTAUEstimator.load(path)
    assert back.alarm_thresholds == est.alarm_thresholds and back.has_ood_reference
    assert back.reference_distances.dtype == np.float64
    np.testing.assert_array_equal(back.reference_distances, est.reference_distances)
    np.testing.assert_array_equal(back.query(test[:100]).ood, est.query(test[:100]).ood)
    summary = back.summary()
    assert summary["n_reference"] == 20000 and summary["alarm_thresholds"] == est.alarm_thresholds

    bad = tmp_path / "flipped"
    shutil.copytree(path, bad)
    data = bytearray((bad / "reference_distances.npy").read_bytes())
    data[-3] ^= 0xFF
    (bad / "reference_distances.npy").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="reference_distances.npy: checksum"):
        LTAUEstimator.load(bad)
    bad = tmp_path / "unsorted"
    shutil.copytree(path, bad)
    np.save(bad / "reference_distances.npy", est.reference_distances[::-1].copy())
    with pytest.raises(FileFormatError, match="sorted in increasing order"):
        LTAUEstimator.load(bad, verify=False)
    bad = tmp_path / "half"
    shutil.copytree(path, bad)
    meta_half = {**meta, "alarm_thresholds": None}
    (bad / "meta.json").write_text(json.dumps(meta_half))
    with pytest.raises(FileFormatError, match="reference_distances and alarm_thresholds must be listed together"):
        LTAUEstimator.load(bad)


def test_estimator_without_reference_loads_and_says_why_no_ood(tmp_path):
    """An estimator written before calibration existed: no reference file, no alarm_thresholds key."""
    rng = np.random.default_rng(1)
    x = _in_domain(rng, 300)
    path = LTAUEstimator.build(x, _pdfs(rng, 300), EDGES, index="flat").save(tmp_path / "old")
    meta = json.loads((path / "meta.json").read_text())
    del meta["alarm_thresholds"]
    (path / "meta.json").write_text(json.dumps(meta))
    est = LTAUEstimator.load(path)
    assert not est.has_ood_reference and est.alarm_thresholds is None and est.summary()["n_reference"] == 0
    res = est.query(x[:5])
    assert res.expected.shape == (5,)
    with pytest.raises(ConfigError, match="no reference distances of held-out in-domain atoms.*--reference-descriptors"):
        res.ood


def test_ood_is_refused_for_another_k(calibrated):
    est, test = calibrated
    with pytest.raises(ConfigError, match="calibrated for the estimator's k=10; this query used k=5"):
        est.query(test[:3], k=5).ood


def test_bad_reference_and_rate_are_refused_before_building():
    rng = np.random.default_rng(2)
    x = _in_domain(rng, 50)
    with pytest.raises(ConfigError, match="false_alarm_rate must lie strictly between 0 and 1, got 1.5"):
        LTAUEstimator.build(x, _pdfs(rng, 50), EDGES, reference_descriptors=x, false_alarm_rate=1.5)
    with pytest.raises(ConfigError, match=r"reference descriptors: descriptors must have shape \(n, 6\)"):
        LTAUEstimator.build(x, _pdfs(rng, 50), EDGES, reference_descriptors=np.zeros((4, 3)))
    with pytest.raises(ConfigError, match="reference descriptors are empty"):
        LTAUEstimator.build(x, _pdfs(rng, 50), EDGES, reference_descriptors=np.zeros((0, DIM)))
