"""The rules of ``fix ltau``, from the summary rows of all ranks: no LAMMPS, no MPI, no files.

Every rank's ``fix_step.summary_row`` (the fields of ``ROW``) reaches every rank in one
collective call; :class:`Outcome` reduces them to the fix's global values and
:class:`Decider` turns them into the dump decision and the halt message, the same on every
rank (it keeps the state of the rules: the persistence of halt alarms, the steps dumped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltau_lmp.estimator.calibration import thresholds_for
from ltau_lmp.lammps.fix_options import AUTO, FixOptions
from ltau_lmp.lammps.fix_step import ROW, badness
from ltau_lmp.lammps.messages import plural

LOG_COLUMNS = ["step", "worst", "mean", "quantile", "n_over_dump", "n_over_halt", "max_distance", "worst_tag"]


class Persistence:
    """``halt ... over K within N``: fires once the condition held in K of the last N checks
    (N = K: K in a row), then starts over, so that a later alarm needs new evidence."""

    def __init__(self, k: int, n: int | None = None):
        self.k, self.n = k, n or k
        self.recent: list[bool] = []

    def update(self, condition: bool) -> bool:
        self.recent = (self.recent + [bool(condition)])[-self.n:]
        if sum(self.recent) < self.k:
            return False
        self.recent = []
        return True

    def describe(self) -> str:
        if self.n > self.k:
            return f", {self.k} of the last {self.n} evaluations"
        return f", {self.k} evaluations in a row" if self.k > 1 else ""


@dataclass(frozen=True)
class Outcome:
    """The global values of one evaluation, from the summary rows of all ranks."""

    worst: float          # the worst metric value (a p-value for ood)
    mean: float
    n_dump: int           # atoms over the dump threshold
    n_halt: int           # atoms over the halt threshold
    max_distance: float
    min_ood: float        # the smallest OOD p-value
    worst_tag: int        # the smallest tag among the atoms holding the worst value (0: none)

    @classmethod
    def of(cls, metric: str, rows: np.ndarray) -> "Outcome":
        c = dict(zip(ROW, rows.T))
        n_group = int(c["n_group"].sum())
        if not n_group:   # an empty group: nothing is uncertain (worst 0, p-value 1), never -0 or an alarm
            worst = 1.0 if metric == "ood" else 0.0
            return cls(worst, worst, 0, 0, 0.0, 1.0, 0)
        worst_score = c["worst_score"].max()
        worst = float(badness(metric, worst_score))
        return cls(worst, float(c["total"].sum() / n_group), int(c["n_dump"].sum()), int(c["n_halt"].sum()),
                   float(c["max_distance"].max()), float(-c["worst_ood"].max()),
                   int(c["worst_tag"][c["worst_score"] == worst_score].min()))

    def global_values(self, has_ood: bool) -> list[float]:
        """The scalar f_ID, then the vector f_ID[1..5] (and [6], the smallest p-value)."""
        values = [self.worst, self.worst, self.mean, self.n_dump, self.n_halt, self.max_distance]
        return values + ([self.min_ood] if has_ood else [])

    def log_values(self, quantile: float | None) -> list:
        """A log line's values after the step (``LOG_COLUMNS``)."""
        return [self.worst, self.mean, quantile, self.n_dump, self.n_halt, self.max_distance, self.worst_tag]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    thresholds: dict      # {"dump": t, "halt": t} used (auto resolved), None = none
    dump: bool            # write this step's frame
    halt: str | None      # the halt message, when the halt rule fires


class Decider:
    """The rules of one fix: thresholds (``auto`` resolved for the watched atoms), dump
    rate limits, halt persistence. ``halt`` and ``dump_threshold`` are values, ``"auto"``
    (the estimator's ``alarm_thresholds`` for the metric) or None; ``dump_steps`` the steps
    already in the dump file."""

    def __init__(self, fix_id: str, opts: FixOptions, halt, dump_threshold, alarm_thresholds,
                 dump_steps: list[int]):
        self.fix_id, self.opts = fix_id, opts
        self.chosen = {"dump": dump_threshold, "halt": halt}
        self.alarm_thresholds = alarm_thresholds
        self.dump_steps = list(dump_steps)
        self.persistence = Persistence(opts.halt_over, opts.halt_within)
        self._auto_for = (None, None)   # (watched atoms, auto threshold for them)

    @property
    def uses_auto(self) -> bool:
        return AUTO in self.chosen.values()

    def auto_threshold(self, n_watched: int) -> float:
        """``auto``: the estimator's recommendation for ``n_watched`` atoms (its false-alarm
        rate is per evaluation of them all)."""
        if self._auto_for[0] != n_watched:   # the tail quantile only changes with the atom count
            recommended = thresholds_for(self.alarm_thresholds, n_watched)
            self._auto_for = (n_watched, recommended[self.opts.metric])
        return self._auto_for[1]

    def thresholds(self, n_watched: int | None) -> dict:
        """Dump and halt thresholds of an evaluation of ``n_watched`` atoms."""
        if not self.uses_auto:
            return dict(self.chosen)
        return {what: self.auto_threshold(n_watched or 0) if t == AUTO else t for what, t in self.chosen.items()}

    def decide(self, step: int, rows: np.ndarray, thresholds: dict, check_halt: bool) -> Decision:
        """Global values, dump and halt of one evaluation from every rank's ``summary_row``
        (computed with ``thresholds``, = ``thresholds(n)`` for the rows' total ``n_group``).
        Records a dump step and feeds the halt persistence (with ``check_halt``)."""
        metric = self.opts.metric
        out = Outcome.of(metric, rows)
        halt = None
        if check_halt and self.chosen["halt"] is not None and self.persistence.update(out.n_halt > 0):
            side = "is at or below" if metric == "ood" else "exceeds"
            halt = (f"{self.fix_id} condition met on step {step} with value {out.worst:.6g}: {metric} "
                    f"uncertainty {side} the halt threshold {thresholds['halt']:g} (atom tag {out.worst_tag}, "
                    f"{plural(out.n_halt, 'atom')} over{self.persistence.describe()})")
        dump = self.chosen["dump"] is not None and out.n_dump > 0 and self._dump_allowed(step, halt is not None)
        if dump:
            self.dump_steps.append(step)
        return Decision(out, thresholds, dump, halt)

    def _dump_allowed(self, step: int, halting: bool) -> bool:
        """One frame per step, ``interval`` apart, at most ``max``; the frame that halts the run is
        dumped whatever the interval: it is the one to label."""
        steps, o = self.dump_steps, self.opts
        if steps and step <= steps[-1]:
            return False
        if steps and step - steps[-1] < o.dump_interval and not halting:
            return False
        return o.dump_max is None or len(steps) < o.dump_max
