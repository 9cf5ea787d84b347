"""LTAU estimator core: streaming error logs, faiss kNN search, the estimator and its files."""

from ltau_lmp.estimator.errorlog import ErrorLog, log_spaced_edges
from ltau_lmp.estimator.estimator import LTAUEstimator, LTAUResult
from ltau_lmp.estimator.histogram import log_midpoints
from ltau_lmp.estimator.index import INDEX_KINDS, SearchIndex, gpu_available
from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions

__all__ = [
    "ErrorLog", "ErrorLogOptions", "EstimatorOptions", "LTAUEstimator", "LTAUResult", "SearchIndex", "INDEX_KINDS",
    "gpu_available", "log_midpoints", "log_spaced_edges",
]
