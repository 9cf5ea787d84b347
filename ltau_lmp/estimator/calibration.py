"""Out-of-domain p-values and alarm thresholds calibrated on held-out in-domain atoms.

Why: the kNN distance keeps growing out of the training domain, but in latent units that mean
nothing to a user and change with every model; the expected error saturates at the largest
errors seen in training. Ranking a new atom's kNN distance among those of held-out in-domain
atoms (atoms not in the index, measured exactly as a query is) gives a unit-free score with a
stated false-alarm rate. If the held-out atoms and a new in-domain atom are exchangeable, the
conformal p-value

    p(d) = (1 + #{reference distances >= d}) / (n_ref + 1)

satisfies P(p <= a) <= a (split conformal prediction). It is exactly monotone non-increasing in
d (equal distances, equal p); an atom farther than every reference atom gets 1 / (n_ref + 1),
the smallest value the reference set allows, one closer than all of them gets 1.

Alarm thresholds for a false-alarm rate ``a`` per atom-evaluation (``alarm_thresholds``):

* ``ood``: alarm when p <= max(a, 1 / (n_ref + 1));
* ``expected``: alarm when the expected error > the ceil((1 - a)(n_ref + 1))-th smallest
  held-out expected error (the largest one when that rank exceeds n_ref).

Each fires on an in-domain atom with probability <= max(a, 1 / (n_ref + 1)): a reference set
of n atoms cannot certify a rate below 1 / (n + 1), so the floor is where a small set stops.
No extra margin is added: the rank rule already is the finite-sample bound. The rate is per
atom and evaluation; an alarm on the maximum over M atoms can fire up to M times as often.
"""

from __future__ import annotations

import math

import numpy as np

from ltau_lmp.errors import ConfigError

DEFAULT_FALSE_ALARM_RATE = 1e-3
THRESHOLD_KEYS = ("false_alarm_rate", "expected", "ood", "n_reference")
# What an estimator without reference distances lacks, and how to get it: every refusal says this.
NO_REFERENCE = ("this estimator has no reference distances of held-out in-domain atoms, so it gives no ood "
                "score: rebuild it with held-out atoms (ltau-lmp train with train.data.val_fraction > 0, or "
                "ltau-lmp build-estimator --reference-descriptors)")
ALARM_METRICS = ("expected", "ood")  # the thresholded keys: an alarm is expected > x, ood <= p


def check_rate(rate) -> float:
    """A false-alarm rate must be a probability strictly between 0 and 1."""
    rate = float(rate)
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"false_alarm_rate must lie strictly between 0 and 1, got {rate}")
    return rate


def check_reference(distances, where: str = "reference distances") -> np.ndarray:
    """Held-out kNN distances: a non-empty, sorted, finite, non-negative float64 vector."""
    distances = np.asarray(distances)
    if distances.dtype != np.float64 or distances.ndim != 1 or distances.size == 0:
        raise ConfigError(f"{where} must be a non-empty 1-D float64 array, got {distances.dtype} {distances.shape}")
    if not np.all(np.isfinite(distances)) or distances[0] < 0:
        raise ConfigError(f"{where} must be finite and non-negative")
    if np.any(np.diff(distances) < 0):
        raise ConfigError(f"{where} must be sorted in increasing order")
    return distances


def ood_pvalues(reference: np.ndarray, distance) -> np.ndarray:
    """Conformal p-value of each distance against the sorted ``reference`` (module docstring)."""
    n = reference.size
    farther_or_equal = n - np.searchsorted(reference, np.asarray(distance, dtype=np.float64), side="left")
    return (1.0 + farther_or_equal) / (n + 1.0)


def alarm_thresholds(reference: np.ndarray, reference_expected: np.ndarray, rate: float) -> dict:
    """Recommended thresholds (keys ``THRESHOLD_KEYS``) from the held-out atoms' sorted kNN
    distances and their expected errors, for the per-atom-evaluation false-alarm ``rate``."""
    rate = check_rate(rate)
    n = reference.size
    if reference_expected.shape != (n,):
        raise ConfigError(f"{reference_expected.shape} expected errors for {n} reference distances")
    rank = min(math.ceil((1.0 - rate) * (n + 1) - 1e-9), n)  # 1-based; the tolerance absorbs round-off
    expected = float(np.partition(np.asarray(reference_expected, dtype=np.float64), rank - 1)[rank - 1])
    return {"false_alarm_rate": rate, "expected": expected, "ood": max(rate, 1.0 / (n + 1)), "n_reference": n}


def alarm(thresholds: dict, metric: str, values) -> np.ndarray:
    """Which values raise the ``metric``'s alarm: expected error above its threshold, ood p-value at
    or below its threshold (the rules whose in-domain rate the module docstring bounds)."""
    if metric not in ALARM_METRICS:
        raise ConfigError(f"no alarm threshold for metric {metric!r} (thresholds exist for {', '.join(ALARM_METRICS)})")
    values = np.asarray(values)
    return values <= thresholds["ood"] if metric == "ood" else values > thresholds["expected"]


def check_thresholds(thresholds, n_reference: int) -> dict:
    """Stored thresholds must have every key and belong to the stored reference set."""
    if not isinstance(thresholds, dict) or set(thresholds) != set(THRESHOLD_KEYS):
        raise ConfigError(f"alarm_thresholds must have exactly the keys {', '.join(THRESHOLD_KEYS)}, "
                          f"got {thresholds!r:.120}")
    if thresholds["n_reference"] != n_reference:
        raise ConfigError(f"alarm_thresholds were computed on {thresholds['n_reference']} reference atoms, "
                          f"but {n_reference} reference distances are stored")
    check_rate(thresholds["false_alarm_rate"])
    return thresholds


def describe_thresholds(thresholds: dict | None, remedy: str) -> str:
    """The recommended alarm thresholds in words, what the commands that build estimators print;
    ``remedy`` says how that command gets held-out atoms when there were none."""
    if thresholds is None:
        return f"no held-out in-domain atoms: no ood score and no recommended alarm thresholds ({remedy})"
    n, rate = thresholds["n_reference"], thresholds["false_alarm_rate"]
    line = (f"recommended alarm thresholds for an in-domain false-alarm rate of {rate:g} per atom-evaluation "
            f"({n} held-out atoms): expected > {thresholds['expected']:.4g} eV/Angstrom, "
            f"ood <= {thresholds['ood']:.4g}")
    if rate < 1.0 / (n + 1):
        line += (f" (floored: {n} held-out atoms certify no rate below 1/(n+1) = {1.0 / (n + 1):.3g}; "
                 f"hold out more atoms for a lower rate)")
    return line
