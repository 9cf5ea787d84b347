"""Hand-computed checks of the uncertainty metrics and smoke tests of the figures."""

import json
import os

import numpy as np
import pytest
from scipy.integrate import trapezoid

from ltau_lmp.evaluation import (
    MetricInputError,
    auroc,
    interval_coverage,
    miscalibration_area,
    pdf_cdf,
    pdf_quantile,
    pearson_log,
    pit_calibration,
    pit_values,
    reliability,
    roc_curve,
    spearman,
    summarize,
    summary_table,
)
from ltau_lmp.evaluation import plots

EDGES_2 = np.array([1.0, 2.0, 4.0])
PDF_2 = np.array([[0.25, 0.75]])


# --------------------------------------------------------------------------- CDF / quantile


@pytest.mark.parametrize(
    "x, expected",
    [(0.5, 0.0), (1.0, 0.0), (1.5, 0.125), (2.0, 0.25), (3.0, 0.625), (4.0, 1.0), (9.0, 1.0)],
)
def test_cdf_two_bin_hand_example(x, expected):
    assert pdf_cdf(PDF_2, EDGES_2, np.array([x]))[0] == pytest.approx(expected)


@pytest.mark.parametrize(
    "q, expected", [(0.0, 1.0), (0.125, 1.5), (0.25, 2.0), (0.625, 3.0), (1.0, 4.0)]
)
def test_quantile_two_bin_hand_example(q, expected):
    assert pdf_quantile(PDF_2, EDGES_2, q)[0] == pytest.approx(expected)


def test_quantile_skips_empty_bin_and_inverts_cdf():
    pdf = np.array([[0.0, 1.0], [0.25, 0.75]])
    assert pdf_quantile(pdf, EDGES_2, 0.5) == pytest.approx([3.0, 2 + 2 * (0.25 / 0.75)])
    assert pdf_cdf(pdf, EDGES_2, np.array([1.5, 1.5])) == pytest.approx([0.0, 0.125])
    qs = np.array([0.1, 0.5, 0.9])
    x = pdf_quantile(pdf, EDGES_2, qs)
    assert x.shape == (2, 3)
    assert pdf_cdf(pdf, EDGES_2, x) == pytest.approx(np.tile(qs, (2, 1)))


def test_cdf_quantile_chunking_does_not_change_results():
    rng = np.random.default_rng(0)
    edges = np.logspace(-3, 0, 21)
    pdf = rng.dirichlet(np.ones(20), size=37)
    x = rng.uniform(5e-4, 1.2, size=37)
    assert np.array_equal(pdf_cdf(pdf, edges, x, chunk_rows=5), pdf_cdf(pdf, edges, x))
    q = np.array([0.05, 0.5, 0.95])
    assert np.array_equal(pdf_quantile(pdf, edges, q, chunk_rows=4), pdf_quantile(pdf, edges, q))


def test_bad_pdf_inputs_raise_clearly():
    with pytest.raises(MetricInputError, match="shape"):
        pdf_cdf(np.ones((1, 3)), EDGES_2, np.array([1.0]))
    with pytest.raises(MetricInputError, match="non-negative"):
        pdf_cdf(np.array([[-0.5, 1.5]]), EDGES_2, np.array([1.0]))
    with pytest.raises(MetricInputError, match="increasing"):
        pdf_quantile(PDF_2, np.array([1.0, 1.0, 2.0]), 0.5)


# --------------------------------------------------------------------------- ranking


def test_spearman_of_monotone_transform_is_one():
    x = np.random.default_rng(1).lognormal(size=500)
    assert spearman(np.exp(x) ** 3, x) == pytest.approx(1.0)
    assert spearman(-x, x) == pytest.approx(-1.0)


def test_pearson_log_power_law_and_positivity():
    x = np.random.default_rng(2).lognormal(size=200)
    assert pearson_log(3.0 * x**2, x) == pytest.approx(1.0)
    with pytest.raises(MetricInputError, match="positive"):
        pearson_log(np.array([1.0, 0.0, 2.0]), np.array([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- calibration


def _lognormal_pdf(edges, median, sigma):
    """Bin masses of a log-normal distribution (the shape LTAU predicts) over ``edges``."""
    from scipy import stats

    cdf = stats.lognorm.cdf(edges, s=sigma, scale=median)
    mass = np.diff(cdf)
    return mass / mass.sum()


def _sample_from_pdf(rng, pdf, edges):
    """Draw one error per row, with the module's semantics: bin by mass, uniform inside."""
    c = np.cumsum(pdf, axis=1)
    b = np.minimum((c < rng.uniform(size=(len(pdf), 1)) * c[:, -1:]).sum(axis=1), pdf.shape[1] - 1)
    return rng.uniform(edges[b], edges[b + 1])


def test_calibrated_pdfs_give_near_zero_area_and_overconfident_large_area():
    rng = np.random.default_rng(3)
    edges = np.logspace(-3, 1, 41)
    n = 20000
    medians = 10 ** rng.uniform(-2, -1, size=n)
    broad = np.array([_lognormal_pdf(edges, m, 0.8) for m in medians])
    true_error = _sample_from_pdf(rng, broad, edges)
    levels = np.arange(0.1, 1.0, 0.1)

    observed = interval_coverage(broad, edges, true_error, levels)
    assert np.max(np.abs(observed - levels)) < 0.03
    assert miscalibration_area(levels, observed) < 0.02
    pit = pit_values(broad, edges, true_error)
    assert miscalibration_area(levels, pit_calibration(pit, levels)) < 0.02

    narrow = np.array([_lognormal_pdf(edges, m, 0.15) for m in medians])
    observed_narrow = interval_coverage(narrow, edges, true_error, levels)
    assert np.all(observed_narrow < levels)
    assert miscalibration_area(levels, observed_narrow) > 0.1


def test_miscalibration_area_hand_values():
    levels = np.array([0.5])
    assert miscalibration_area(levels, np.array([0.5])) == pytest.approx(0.0)
    # Triangle of height 0.5 at nominal 0.5 over [0, 1]: area 0.25.
    assert miscalibration_area(levels, np.array([0.0])) == pytest.approx(0.25)
    # End points already present are not duplicated.
    assert miscalibration_area(np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0])) == (
        pytest.approx(0.25)
    )


def test_reliability_hand_example():
    prob = np.array([0.05, 0.15, 0.12, 0.95, 0.9])
    outcome = np.array([False, True, False, True, True])
    rel = reliability(prob, outcome, n_bins=10)
    assert rel.counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert rel.mean_predicted[[0, 1, 9]] == pytest.approx([0.05, 0.135, 0.925])
    assert rel.observed_frequency[[0, 1, 9]] == pytest.approx([0.0, 0.5, 1.0])
    assert np.all(np.isnan(rel.mean_predicted[2:9]))
    assert rel.ece == pytest.approx((1 * 0.05 + 2 * 0.365 + 2 * 0.075) / 5)
    assert reliability(np.array([1.0]), np.array([1]), n_bins=4).counts.tolist() == [0, 0, 0, 1]


# --------------------------------------------------------------------------- OOD detection


def test_auroc_extremes_and_identical():
    a, b = np.arange(10.0), np.arange(10.0) + 100
    assert auroc(a, b) == 1.0
    assert auroc(b, a) == 0.0
    assert auroc(a, a.copy()) == pytest.approx(0.5)


def test_auroc_ties_hand_example_and_roc_area():
    s_in, s_out = np.array([0.1, 0.4, 0.4]), np.array([0.4, 0.8])
    # Pairs (out > in): 0.4 vs {0.1: 1, 0.4: 0.5, 0.4: 0.5}; 0.8 vs all: 3  ->  5 / 6.
    assert auroc(s_in, s_out) == pytest.approx(5 / 6)
    fpr, tpr, thr = roc_curve(s_in, s_out)
    assert fpr.tolist() == pytest.approx([0.0, 0.0, 2 / 3, 1.0])
    assert tpr.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert thr.tolist() == [np.inf, 0.8, 0.4, 0.1]
    assert trapezoid(tpr, fpr) == pytest.approx(5 / 6)


# --------------------------------------------------------------------------- reports


def _small_dataset(seed=4, n=500):
    rng = np.random.default_rng(seed)
    edges = np.logspace(-3, 1, 31)
    medians = 10 ** rng.uniform(-2, -0.5, size=n)
    pdf = np.array([_lognormal_pdf(edges, m, 0.6) for m in medians])
    true_error = _sample_from_pdf(rng, pdf, edges)
    return true_error, medians, pdf, edges, medians * 3 + rng.uniform(0, 0.01, n)


def test_summarize_is_json_ready_and_table_renders():
    true_error, predicted, pdf, edges, distance = _small_dataset()
    s = summarize(true_error, predicted, pdf, edges, distance, tol=0.05)
    assert all(type(v) is float for v in s.values())
    json.dumps(s, allow_nan=False)
    assert s["n_atoms"] == 500 and s["tol"] == 0.05
    assert 0.3 < s["spearman"] <= 1 and s["miscalibration_area"] < 0.1
    table = summary_table({"train": s, "ood": {**s, "spearman": 0.123456}})
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| dataset | n_atoms |")
    assert lines[2].startswith("| train | 500 |") and "| 0.1235 |" in lines[3]


# --------------------------------------------------------------------------- figures


def test_plots_write_nonempty_pngs(tmp_path):
    true_error, predicted, pdf, edges, distance = _small_dataset(n=300)
    levels = np.arange(0.1, 1.0, 0.1)
    p_below = pdf_cdf(pdf, edges, np.full(len(pdf), 0.05))
    steps = np.arange(0, 1000, 10)
    pred_max = 0.02 * np.exp(steps / 300)
    paths = [
        plots.plot_error_scatter(true_error, predicted, tmp_path / "scatter.png", title="test"),
        plots.plot_calibration(
            {"a": (levels, interval_coverage(pdf, edges, true_error, levels)), "b": (levels, levels**2)},
            tmp_path / "calibration.png",
        ),
        plots.plot_reliability({"test": (p_below, true_error < 0.05)}, tmp_path / "reliability.png", tol=0.05),
        plots.plot_roc(
            {"distance": (distance[:150], distance[150:] + 0.1), "random": (levels, levels)},
            tmp_path / "roc.png",
        ),
        plots.plot_failure_timeline(steps, pred_max, 0.8 * pred_max, 0.5,
                                    tmp_path / "sub" / "timeline.png", halt_step=970),
    ]
    for p in paths:
        with open(p, "rb") as fh:
            head = fh.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
