"""One rank's part of a ``fix ltau`` evaluation, on plain arrays: no LAMMPS, no MPI, no files.

:class:`StepView` is what the fix gets from LAMMPS at an evaluation (built by the bridge from
``ltau_fix_step_args``); :func:`evaluate_rank` queries the estimator for the rank's group
atoms and :func:`summary_row` condenses the result into the row of numbers (``ROW``) that every
rank contributes to the decision (``fix_decision``). Metrics are compared as badness (larger =
worse: an OOD p-value negated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps.features import PairFeatures
from ltau_lmp.lammps.fix_options import FixOptions
from ltau_lmp.lammps.messages import describe_tags

# the per-atom column f_ID[i + 1] holding each metric
METRIC_COLUMN = {"expected": 0, "upper": 2, "distance": 3, "ood": 4}
# summary_row: group atoms, sum of the metric, atoms over the dump and the halt threshold,
# maxima of the badness, the kNN distance and the OOD badness (-p), smallest tag at the worst
ROW = ("n_group", "total", "n_dump", "n_halt", "worst_score", "max_distance", "worst_ood", "worst_tag")


def badness(metric: str, values: np.ndarray) -> np.ndarray:
    """Values ordered so that larger is worse: an OOD p-value is worse when smaller."""
    return -values if metric == "ood" else values


def crossed(metric: str, score: np.ndarray, threshold: float) -> np.ndarray:
    """Where the badness ``score`` crosses ``threshold``: a value above it, a p-value at or below
    it (the estimator's thresholds bound the in-domain rate of exactly these events)."""
    limit = badness(metric, np.float64(threshold))
    return score >= limit if metric == "ood" else score > limit



@dataclass
class StepView:
    """One evaluation's arrays on this rank (views of LAMMPS's, local atoms in local order):
    ``x``, ``f`` (nlocal, 3), ``type``, ``tag`` (nlocal,) int32, ``in_group`` (nlocal,) bool; to
    fill: ``peratom`` (nlocal, 4 or 5) and ``global_out`` (the scalar, then the vector);
    ``box`` xlo ylo zlo xhi yhi zhi xy xz yz, ``periodic`` 3 bools; ``check_halt``: end of step
    or a minimizer force call (never setup)."""

    step: int
    x: np.ndarray
    f: np.ndarray
    type: np.ndarray
    tag: np.ndarray
    in_group: np.ndarray
    peratom: np.ndarray
    global_out: np.ndarray
    box: np.ndarray = field(default_factory=lambda: np.zeros(9))
    periodic: tuple[bool, bool, bool] = (True, True, True)
    check_halt: bool = False


def evaluate_rank(features: PairFeatures, estimator, opts: FixOptions, has_ood: bool, view: StepView) -> np.ndarray:
    """Rank-local part: fill ``view.peratom`` from the estimator's answer for this rank's group
    atoms (``features``: what the pair published for this step); returns
    the metric as badness (larger = worse) per local atom, 0 outside the group."""
    step, tag, in_group = view.step, view.tag, view.in_group
    if features.step != step:
        raise LTAUError(f"no features for step {step} (pair_style ltau last ran at step "
                        f"{features.step}); fix ltau needs pair_style ltau to compute forces every step")
    if len(tag) != len(features.tags) or not np.array_equal(tag, features.tags):
        raise LTAUError(f"atoms changed between the force call and the end of step {step}")
    view.peratom[:] = 0.0
    score = np.zeros(len(tag))
    if not np.any(in_group):
        return score
    latent = features.latent[in_group]
    bad = ~np.all(np.isfinite(latent), axis=1)
    if bad.any():
        raise LTAUError(f"step {step}: the model gave non-finite (NaN or inf) latent features for "
                        f"{describe_tags(tag[in_group][bad])}: no uncertainty can be computed there "
                        "(overlapping atoms, or a configuration far outside the training data?)")
    res = estimator.query(latent, k=opts.k)
    interval = res.interval(*opts.ci).T if opts.ci else np.zeros((2, len(res)))
    columns = [res.expected, *interval, res.distance]
    if has_ood:
        columns.append(res.ood)
    view.peratom[in_group] = np.column_stack(columns)
    score[in_group] = badness(opts.metric, view.peratom[in_group, METRIC_COLUMN[opts.metric]])
    return score


def summary_row(metric: str, view: StepView, score: np.ndarray, thresholds: dict) -> np.ndarray:
    """This rank's share of the global values (the fields of ``ROW``), for ``thresholds``
    ({"dump": t, "halt": t}, None = no such threshold)."""
    group = view.in_group
    mine = score[group]
    over = {what: np.count_nonzero(crossed(metric, mine, t)) if t is not None else 0
            for what, t in thresholds.items()}
    worst = mine.max(initial=-np.inf)
    ood = (-view.peratom[group, 4]).max(initial=-np.inf) if view.peratom.shape[1] > 4 else 0.0
    return np.array([len(mine), badness(metric, mine).sum(), over["dump"], over["halt"], worst,
                     view.peratom[group, 3].max(initial=-np.inf), ood,
                     view.tag[group & (score == worst)].min(initial=np.iinfo(np.int32).max)],
                    dtype=np.float64)
