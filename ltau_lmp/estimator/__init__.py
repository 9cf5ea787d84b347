"""LTAU estimator core: streaming error logs, faiss kNN search, the estimator and its files."""

from ltau_lmp.estimator.errorlog import ErrorLog, log_spaced_edges
from ltau_lmp.estimator.estimator import (LTAUEstimator, LTAUResult, card_metadata, log_midpoints, pdf_cdf_at,
                                          pdf_quantile)
from ltau_lmp.estimator.index import INDEX_KINDS, SearchIndex, gpu_available

__all__ = [
    "ErrorLog", "LTAUEstimator", "LTAUResult", "SearchIndex", "INDEX_KINDS",
    "card_metadata", "gpu_available", "log_midpoints", "log_spaced_edges", "pdf_cdf_at", "pdf_quantile",
]
