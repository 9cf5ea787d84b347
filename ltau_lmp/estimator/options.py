"""What error log and what estimator to build: the options every builder shares.

``ltau-lmp train`` reads them from its config (``train.error_log``, ``train.estimator``),
``mace-train`` / ``replay`` from the command line, the nequip callback from its arguments;
``LTAUEstimator.build`` takes an ``EstimatorOptions``. Each record checks itself (``validate``)
so that a bad value stops a run before training, not after the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.calibration import DEFAULT_FALSE_ALARM_RATE, check_rate
from ltau_lmp.estimator.errorlog import ErrorLog, log_spaced_edges
from ltau_lmp.estimator.index import DEFAULT_KIND, KIND_CHOICES

DEFAULT_K = 10
WEIGHTINGS = ("uniform", "distance")


@dataclass
class ErrorLogOptions:
    lo: float = 1e-3  # lowest bin edge of the per-atom force-error histograms (eV/Angstrom)
    hi: float = 10.0  # highest bin edge; errors outside [lo, hi] are clamped into the end bins
    nbins: int = 100  # log-spaced bins
    skip_epochs: int = 0  # first epochs not counted (the early, fast-changing trajectory)

    def validate(self, where: str = "error_log") -> None:
        """The bins must exist (0 < lo < hi, nbins >= 1) and skip_epochs >= 0."""
        try:
            log_spaced_edges(self.lo, self.hi, self.nbins)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.skip_epochs < 0:
            raise ConfigError(f"{where}.skip_epochs must be >= 0, got {self.skip_epochs}")

    def new_log(self, n_samples: int) -> ErrorLog:
        """An empty ``ErrorLog`` over ``n_samples`` training atoms with these bins."""
        return ErrorLog.log_spaced(n_samples, self.lo, self.hi, self.nbins, skip_epochs=self.skip_epochs)


@dataclass
class EstimatorOptions:
    index: str = DEFAULT_KIND  # faiss index kind: auto | flat (exact) | ivf | hnsw | ivfpq (ltau_lmp.estimator.index)
    k: int = DEFAULT_K  # nearest neighbours averaged per query
    # in-domain false-alarm rate per evaluation of all watched atoms (halt auto), of thresholds
    # calibrated on held-out atoms (ltau_lmp.estimator.calibration)
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    weighting: str = WEIGHTINGS[0]  # average the neighbours' PDFs equally ("uniform") or by inverse distance
    index_options: dict[str, Any] = field(default_factory=dict)  # per kind (index.OPTION_DEFAULTS), e.g. nprobe

    def validate(self, where: str = "estimator") -> None:
        """Checked before training: a bad index kind must not surface only after the last epoch."""
        if self.index not in KIND_CHOICES:
            raise ConfigError(f"{where}.index: {self.index!r} is not one of {list(KIND_CHOICES)}")
        if self.k < 1:
            raise ConfigError(f"{where}.k must be >= 1, got {self.k}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"{where}.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        try:
            check_rate(self.false_alarm_rate)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None
