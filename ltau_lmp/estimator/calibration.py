"""Out-of-domain p-values and alarm thresholds calibrated on held-out in-domain atoms.

Why: the kNN distance keeps growing out of the training domain, but in latent units that mean
nothing to a user and change with every model; the expected error saturates at the largest
errors seen in training. Ranking a new atom's kNN distance among those of held-out in-domain
atoms (atoms not in the index, measured exactly as a query is) gives a unit-free score with a
stated false-alarm rate. If the held-out atoms and a new in-domain atom are exchangeable, the
conformal p-value

    p(d) = (1 + #{reference distances >= d}) / (n_ref + 1)

satisfies P(p <= a) <= a (split conformal prediction). It is exactly monotone non-increasing in
d (equal distances, equal p); one closer than all of them gets 1.

Beyond the reference set's reach the rank runs out: with n_ref held-out atoms no p-value falls
below 1 / (n_ref + 1), yet an alarm watching M atoms at a stated rate per *evaluation* needs
per-atom rates of rate / M (e.g. 1e-3 / 216 = 4.6e-6). Above the 90th percentile of the
reference (at least ``MIN_TAIL`` values) the p-value therefore continues along a generalised
Pareto fit to the exceedances (peaks over threshold, the extreme-value model for the tail of
any continuous distribution; ``Tail``):

    p(d) = (n_tail + 1) / (n_ref + 1) * GPD.sf(d - u)     for d > u,

continuous with the rank at u and strictly decreasing; the same fit of the held-out expected
errors gives the expected-error threshold. With fewer than ``MIN_TAIL`` exceedances there is no
fit and p stays floored at 1 / (n_ref + 1).

Alarm thresholds for a false-alarm rate ``a`` per evaluation of M watched atoms
(``thresholds_for``): each atom is tested at the per-atom rate r = a / M, so by the union bound
an in-domain evaluation alarms with probability <= a whatever the correlation between atoms:

* ``ood``: alarm when p <= r (floored at 1 / (n_ref + 1) without a tail fit);
* ``expected``: alarm when the expected error exceeds the fitted tail's (1 - r) quantile (the
  tail's start when r is above the tail's mass; without a fit the rank rule at r = a, M = 1).

M = 1 gives the per-atom thresholds stored as ``expected``/``ood``. The tail is a model: it is
checked against held-out atoms in the tests, and the rate it certifies is as good as the fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from ltau_lmp.errors import ConfigError

DEFAULT_FALSE_ALARM_RATE = 1e-3
THRESHOLD_KEYS = ("false_alarm_rate", "expected", "ood", "n_reference", "distance_tail", "expected_tail")
TAIL_FRACTION = 0.1   # the largest 10 % of the reference values are fitted ...
MIN_TAIL = 50         # ... when there are at least this many of them
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


@dataclass(frozen=True)
class Tail:
    """Generalised Pareto fit to the reference values above ``start`` (module docstring).

    ``mass`` = (n_tail + 1) / (n_ref + 1), the conformal p-value just above ``start``, so the
    tail continues the rank without a jump; ``shape`` < 0 means a finite end point.
    """

    start: float
    mass: float
    shape: float
    scale: float
    n_tail: int

    def pvalue(self, x: np.ndarray) -> np.ndarray:
        """P(value > x) for x > start."""
        return self.mass * stats.genpareto.sf(x - self.start, self.shape, scale=self.scale)

    def quantile(self, rate: float) -> float:
        """The value exceeded with probability ``rate``; ``start`` for rates at or above the tail's mass."""
        if rate >= self.mass:
            return self.start
        return float(self.start + stats.genpareto.isf(rate / self.mass, self.shape, scale=self.scale))

    def to_dict(self) -> dict:
        return asdict(self)


def fit_tail(values: np.ndarray) -> Tail | None:
    """Peaks-over-threshold fit of the largest ``TAIL_FRACTION`` of ``values`` (None: too few)."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    n = values.size
    n_tail = int(TAIL_FRACTION * n)
    if n_tail < MIN_TAIL:
        return None
    start = float(values[n - n_tail - 1])
    excess = values[values > start] - start
    if excess.size < MIN_TAIL:   # ties at the top (e.g. a constant): nothing to fit
        return None
    shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
    return Tail(start, (excess.size + 1.0) / (n + 1.0), float(shape), float(scale), int(excess.size))


def stored_tail(thresholds: dict, key: str) -> Tail | None:
    """The ``Tail`` stored under ``key`` ("distance_tail", "expected_tail") of ``alarm_thresholds``."""
    return None if thresholds.get(key) is None else Tail(**thresholds[key])


def ood_pvalues(reference: np.ndarray, distance, tail: Tail | None = None) -> np.ndarray:
    """p-value of each distance against the sorted ``reference``: the conformal rank, continued
    by the fitted ``tail`` beyond its start (module docstring)."""
    distance = np.asarray(distance, dtype=np.float64)
    n = reference.size
    farther_or_equal = n - np.searchsorted(reference, distance, side="left")
    p = (1.0 + farther_or_equal) / (n + 1.0)
    if tail is not None:
        beyond = distance > tail.start
        p[beyond] = tail.pvalue(distance[beyond])
    return p


def alarm_thresholds(reference: np.ndarray, reference_expected: np.ndarray, rate: float) -> dict:
    """Recommended thresholds (keys ``THRESHOLD_KEYS``) from the held-out atoms' sorted kNN
    distances and their expected errors, for the false-alarm ``rate`` per evaluation;
    ``expected``/``ood`` are the per-atom values (M = 1), ``thresholds_for`` gives any M."""
    rate = check_rate(rate)
    n = reference.size
    if reference_expected.shape != (n,):
        raise ConfigError(f"{reference_expected.shape} expected errors for {n} reference distances")
    rank = min(math.ceil((1.0 - rate) * (n + 1) - 1e-9), n)  # 1-based; the tolerance absorbs round-off
    expected = float(np.partition(np.asarray(reference_expected, dtype=np.float64), rank - 1)[rank - 1])
    distance_tail, expected_tail = fit_tail(reference), fit_tail(reference_expected)
    thresholds = {"false_alarm_rate": rate, "expected": expected, "ood": max(rate, 1.0 / (n + 1)),
                  "n_reference": n, "distance_tail": distance_tail and distance_tail.to_dict(),
                  "expected_tail": expected_tail and expected_tail.to_dict()}
    return {**thresholds, **thresholds_for(thresholds, 1)}


def thresholds_for(thresholds: dict, n_atoms: int) -> dict:
    """``expected`` and ``ood`` thresholds for an alarm on ``n_atoms`` watched atoms at the stored
    rate per evaluation: each atom at rate / n_atoms (union bound; module docstring)."""
    per_atom = thresholds["false_alarm_rate"] / max(int(n_atoms), 1)
    floor = 1.0 / (thresholds["n_reference"] + 1)
    expected_tail = stored_tail(thresholds, "expected_tail")
    return {"ood": per_atom if thresholds["distance_tail"] else max(per_atom, floor),
            "expected": expected_tail.quantile(per_atom) if expected_tail else thresholds["expected"]}


def alarm(thresholds: dict, metric: str, values, n_atoms: int = 1) -> np.ndarray:
    """Which values raise the ``metric``'s alarm for ``n_atoms`` watched atoms: expected error
    above its threshold, ood p-value at or below its threshold (the rules whose in-domain rate
    the module docstring bounds)."""
    if metric not in ALARM_METRICS:
        raise ConfigError(f"no alarm threshold for metric {metric!r} (thresholds exist for {', '.join(ALARM_METRICS)})")
    values = np.asarray(values)
    limit = thresholds_for(thresholds, n_atoms)[metric]
    return values <= limit if metric == "ood" else values > limit


def check_thresholds(thresholds, n_reference: int) -> dict:
    """Stored thresholds must have every key and belong to the stored reference set. Files written
    before the tail fits existed have no tail keys: they load without fits (floored p-values)."""
    if isinstance(thresholds, dict):
        thresholds = {"distance_tail": None, "expected_tail": None, **thresholds}
    if not isinstance(thresholds, dict) or set(thresholds) != set(THRESHOLD_KEYS):
        raise ConfigError(f"alarm_thresholds must have exactly the keys {', '.join(THRESHOLD_KEYS)}, "
                          f"got {thresholds!r:.120}")
    if thresholds["n_reference"] != n_reference:
        raise ConfigError(f"alarm_thresholds were computed on {thresholds['n_reference']} reference atoms, "
                          f"but {n_reference} reference distances are stored")
    check_rate(thresholds["false_alarm_rate"])
    for key in ("distance_tail", "expected_tail"):
        try:
            stored_tail(thresholds, key)
        except TypeError:
            raise ConfigError(f"alarm_thresholds {key} must be a tail fit ({', '.join(Tail.__annotations__)}), "
                              f"got {thresholds[key]!r:.120}") from None
    return thresholds


def describe_thresholds(thresholds: dict | None, remedy: str) -> str:
    """The recommended alarm thresholds in words, what the commands that build estimators print;
    ``remedy`` says how that command gets held-out atoms when there were none."""
    if thresholds is None:
        return f"no held-out in-domain atoms: no ood score and no recommended alarm thresholds ({remedy})"
    n, rate = thresholds["n_reference"], thresholds["false_alarm_rate"]
    lines = [f"recommended alarm thresholds (halt/dump auto) for an in-domain false-alarm rate of {rate:g} "
             f"per evaluation, from {n} held-out atoms:"]
    for m in (1, 1000, 1_000_000):
        t = thresholds_for(thresholds, m)
        lines.append(f"  {m:>9,} watched atoms: expected > {t['expected']:.4g} eV/Angstrom, ood <= {t['ood']:.3g}")
    if not thresholds["distance_tail"] or not thresholds["expected_tail"]:
        lines.append(f"  (no tail fit: {n} held-out atoms have fewer than {MIN_TAIL} values in their top "
                     f"{TAIL_FRACTION:.0%}; thresholds stay at the per-atom rank rule, floored at 1/(n+1) = "
                     f"{1.0 / (n + 1):.3g}, and do not scale with the atoms watched: hold out more atoms)")
    return "\n".join(lines)
