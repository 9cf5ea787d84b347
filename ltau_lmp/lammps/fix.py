"""``fix ID group ltau ESTIMATOR keyword value ...``: LTAU uncertainty of every local atom.

Runs at the end of every N-th step on the latent features that ``pair_style ltau`` cached in
the same step (no second model pass). Every decision that ends or changes the run (halt,
dump) is taken from values reduced over all ranks, so all ranks take it together.
See doc/fix_ltau.md for the user-facing description.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator.calibration import ALARM_METRICS, thresholds_for
from ltau_lmp.lammps import abi
from ltau_lmp.lammps import keywords as kw
from ltau_lmp.lammps.keywords import Words

METRICS = ("expected", "upper", "distance", "ood")
# the per-atom column f_ID[i + 1] holding each metric
METRIC_COLUMN = {"expected": 0, "upper": 2, "distance": 3, "ood": 4}
LOG_COLUMNS = ["step", "worst", "mean", "quantile", "n_over_dump", "n_over_halt", "max_distance", "worst_tag"]
AUTO = "auto"
# what each metric measures, in the units of the values compared with its thresholds
METRIC_UNITS = {"expected": "expected force error, eV/Angstrom",
                "upper": "upper end of the force-error interval, eV/Angstrom",
                "distance": "mean kNN distance in the model's latent space (latent units)",
                "ood": "out-of-domain p-value, smaller = more unusual"}


def plural(n: int, word: str) -> str:
    """``1 atom``, ``3 atoms``: counts in messages read as English."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def badness(metric: str, values: np.ndarray) -> np.ndarray:
    """Values ordered so that larger is worse: an OOD p-value is worse when smaller."""
    return -values if metric == "ood" else values


def crossed(metric: str, score: np.ndarray, threshold: float) -> np.ndarray:
    """Where the badness ``score`` crosses ``threshold``: a value above it, a p-value at or below
    it (the estimator's thresholds bound the in-domain rate of exactly these events)."""
    limit = badness(metric, np.float64(threshold))
    return score >= limit if metric == "ood" else score > limit


@dataclass
class FixOptions:
    """Parsed keywords of ``fix ltau`` (see doc/fix_ltau.md)."""

    estimator: str
    every: int = 1
    k: int | None = None
    metric: str = "expected"
    ci: tuple[float, float] | None = (0.05, 0.95)   # None: `ci no`, columns 2-3 stay 0 (no PDF mixing)
    quantile: float = 0.99
    halt: float | str | None = None  # a threshold, "auto" (the estimator's), or None
    halt_over: int = 1                # evaluations over the threshold, among the last halt_within,
    halt_within: int | None = None    # before halting (within None = over: that many in a row)
    halt_mode: str = "soft"           # fix halt's default
    halt_message: bool = True
    dump_file: str | None = None
    dump_threshold: float | str | None = None
    dump_interval: int = 1
    dump_max: int | None = None
    log_file: str | None = None
    append: bool = False              # continue the log and dump of an earlier run (restart)

    @classmethod
    def parse(cls, args: list[str]) -> "FixOptions":
        if not args:
            raise LTAUError("usage is fix ID group ltau ESTIMATOR_FILE keyword value ...")
        opts, words = cls(estimator=args[0]), Words(args[1:])
        given: set[str] = set()
        while words:
            keyword = words.pop()
            if keyword == "every":
                opts.every = kw.positive_int(words.take(keyword, "N"), "every")
            elif keyword == "k":
                opts.k = kw.positive_int(words.take(keyword, "K"), "k")
            elif keyword == "metric":
                opts.metric = kw.choice(words.take(keyword, "|".join(METRICS)), "metric", METRICS)
            elif keyword == "ci" and words.peek() == "no":
                words.pop()
                opts.ci = None
            elif keyword == "ci":
                lo = kw.number(words.take(keyword, "LO HI|no"), "ci LO")
                hi = kw.number(words.take(keyword, "LO HI"), "ci HI")
                if not 0.0 <= lo < hi <= 1.0:
                    raise LTAUError(f"ci needs 0 <= LO < HI <= 1, got {lo} {hi}")
                opts.ci = (lo, hi)
            elif keyword == "quantile":
                opts.quantile = kw.number(words.take(keyword, "Q"), "quantile")
                if not 0.0 <= opts.quantile <= 1.0:
                    raise LTAUError(f"quantile must lie in [0, 1], got {opts.quantile}")
            elif keyword == "halt":
                opts.halt = _threshold_or_auto(words.take(keyword, "THRESH|auto"), "halt")
                if words.peek() == "over":
                    words.pop()
                    opts.halt_over = kw.positive_int(words.take("halt ... over", "K"), "halt ... over")
                    if words.peek() == "within":
                        words.pop()
                        opts.halt_within = kw.positive_int(words.take("halt ... within", "N"), "halt ... within")
                        if opts.halt_within < opts.halt_over:
                            raise LTAUError(f"halt ... over {opts.halt_over} within {opts.halt_within}: "
                                            "N must be at least K")
            elif keyword == "error":
                opts.halt_mode = kw.choice(words.take(keyword, "hard|soft|continue"), "error", tuple(abi.HALT_MODES))
                given.add(keyword)
            elif keyword == "message":
                opts.halt_message = kw.yes_no(words.take(keyword, "yes|no"), "message")
                given.add(keyword)
            elif keyword == "dump":
                opts.dump_file = words.take(keyword, "FILE THRESH")
                opts.dump_threshold = _threshold_or_auto(words.take(keyword, "FILE THRESH|auto"), "dump")
                while words.peek() in ("interval", "max"):
                    sub = words.pop()
                    value = kw.positive_int(words.take(f"dump ... {sub}", "a positive integer"), f"dump ... {sub}")
                    if sub == "interval":
                        opts.dump_interval = value
                    else:
                        opts.dump_max = value
            elif keyword == "log":
                opts.log_file = words.take(keyword, "FILE")
            elif keyword == "append":
                opts.append = kw.yes_no(words.take(keyword, "yes|no"), "append")
            else:
                raise LTAUError(f"unknown keyword {keyword!r} (valid: every, k, metric, ci, quantile, "
                                "halt, error, message, dump, log, append)")
        if opts.ci is None and opts.metric == "upper":
            raise LTAUError("metric upper is the CI's upper end: it needs ci LO HI, not ci no")
        if opts.append and not (opts.log_file or opts.dump_file):
            raise LTAUError("append yes continues the log and dump files: it needs log FILE or dump FILE THRESH")
        if given and opts.halt is None:
            raise LTAUError(f"keyword {' and '.join(sorted(given))} needs halt THRESH")
        for what, value in (("halt", opts.halt), ("dump", opts.dump_threshold)):
            if opts.metric == "ood" and isinstance(value, float) and value > 1.0:
                raise LTAUError(f"{what} threshold of metric ood is a p-value in [0, 1], got {value}")
        return opts

    @property
    def halt_mode_code(self) -> int:
        """The plugin's ``ltau_halt_mode``."""
        return abi.HALT_NONE if self.halt is None else abi.HALT_MODES[self.halt_mode]


def describe_tags(tags, limit: int = 10) -> str:
    """``atom IDs 3, 7 and 12`` (at most ``limit`` listed, sorted): which atoms a message is about."""
    tags = sorted(int(t) for t in np.unique(tags))
    shown = ", ".join(map(str, tags[:limit]))
    more = f" and {len(tags) - limit:,} more" if len(tags) > limit else ""
    return f"atom ID{'s' if len(tags) > 1 else ''} {shown}{more}"


def _threshold_or_auto(text: str, what: str) -> float | str:
    return AUTO if text == AUTO else kw.threshold(text, what)


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


class PeerFailed(Exception):
    """Another rank failed in the same call: this rank stops quietly, that rank reports."""


class HaltCondition(Exception):
    """The halt threshold is crossed (same step, same message on every rank); the plugin
    applies fix halt's mode: error hard, soft or continue."""


def agree(comm, work):
    """Run rank-local ``work``, then make sure no rank enters a collective call alone.

    The failing rank re-raises its own error; the others raise ``PeerFailed``, which the runtime
    turns into status OK: the plugin reduces the statuses and shows the failing rank's message.
    """
    from mpi4py import MPI

    try:
        result, failed = work(), 0
    except Exception:
        comm.allreduce(1, op=MPI.MAX)
        raise
    if comm.allreduce(failed, op=MPI.MAX):
        raise PeerFailed()
    return result


class FixLtau:
    """Per-rank state of one ``fix ltau``: the estimator, the options, rank-0 output files.

    Outputs: per-atom f_ID[1..4] expected error, CI low, CI high, kNN distance, and f_ID[5] the
    out-of-domain p-value when the estimator has a reference distribution; global f_ID[1..5]
    worst metric value, mean, n over dump, n over halt, max distance, and f_ID[6] min p-value.
    """

    def __init__(self, fix_id: str, args: list[str], comm, runtime):
        self.fix_id = fix_id
        self.comm = comm
        self.rank = comm.Get_rank()
        self.runtime = runtime
        self.log = self.dump = None
        self.opts = FixOptions.parse(args)   # identical words on every rank: fails on all or none
        self.persistence = Persistence(self.opts.halt_over, self.opts.halt_within)
        agree(comm, self._setup)
        self.n_peratom = 5 if self.has_ood else 4
        self.n_vector = 6 if self.has_ood else 5
        # Rank 0 knows the dump's earlier frames; every rank must skip the same steps.
        self.dump_steps = comm.bcast(list(self.dump.steps) if self.dump else [], root=0)

    def _setup(self) -> None:
        from ltau_lmp.errors import FileFormatError
        from ltau_lmp.estimator import LTAUEstimator
        from ltau_lmp.lammps.devices import faiss_gpu_device

        device = faiss_gpu_device()
        try:
            # Checksums are verified once (rank 0); every rank memory-maps the same pages.
            self.estimator = LTAUEstimator.load(self.opts.estimator, mmap=True, verify=self.rank == 0,
                                                gpu_device=device or 0)
        except FileFormatError as exc:
            raise LTAUError(f"cannot use estimator: {exc}") from None
        self.estimator.check_model(self.runtime.card, "the model of pair_style ltau")
        # p-values exist for the k the reference distances were measured with
        own_k = self.opts.k in (None, self.estimator.k)
        self.has_ood = self.estimator.has_ood_reference and own_k
        if self.opts.metric == "ood" and not self.has_ood:
            why = (f"its reference distances were measured with k = {self.estimator.k}, not k = {self.opts.k}"
                   if not own_k else "it has no reference distribution of held-out kNN distances "
                   "(rebuild it with held-out atoms: ltau-lmp train, or build-estimator --reference-descriptors)")
            raise LTAUError(f"metric ood cannot use estimator {self.opts.estimator}: {why}")
        self.halt = self._resolve(self.opts.halt, "halt")
        self.dump_threshold = self._resolve(self.opts.dump_threshold, "dump")
        self._auto_for = (None, None)   # (watched atoms, auto threshold for them)
        if self.opts.k is not None and self.opts.k > self.estimator.n_entries:
            raise LTAUError(f"k={self.opts.k} exceeds the estimator's {self.estimator.n_entries} entries")
        if self.rank == 0:
            from ltau_lmp.lammps.events import FrameDump, StepLog

            if self.opts.log_file:
                self.log = StepLog(self.opts.log_file, LOG_COLUMNS, append=self.opts.append)
            if self.opts.dump_file:
                self.dump = FrameDump(self.opts.dump_file, append=self.opts.append)

    def _resolve(self, value, what: str) -> float | str | None:
        """A threshold as given, or ``auto`` once the estimator is known to recommend one for the metric."""
        if value == AUTO and (self.estimator.alarm_thresholds is None or self.opts.metric not in ALARM_METRICS):
            have = ", ".join(ALARM_METRICS) if self.estimator.alarm_thresholds else "none"
            raise LTAUError(f"{what} auto: estimator {self.opts.estimator} recommends no threshold for "
                            f"metric {self.opts.metric} (it has: {have})")
        return value

    def _thresholds(self, in_group: np.ndarray) -> dict:
        """Dump and halt thresholds of this evaluation: ``auto`` is the estimator's recommendation
        for the number of atoms watched now (its false-alarm rate is per evaluation of them all)."""
        from mpi4py import MPI

        chosen = {"dump": self.dump_threshold, "halt": self.halt}
        if AUTO in chosen.values():
            n_watched = self.comm.allreduce(int(np.count_nonzero(in_group)), op=MPI.SUM)
            if self._auto_for[0] != n_watched:   # the tail quantile only changes with the atom count
                recommended = thresholds_for(self.estimator.alarm_thresholds, n_watched)
                self._auto_for = (n_watched, recommended[self.opts.metric])
            chosen = {what: self._auto_for[1] if t == AUTO else t for what, t in chosen.items()}
        return chosen

    def bind(self, runtime) -> None:
        """Called at every ``init``: follow the current ``pair_style ltau`` (a new pair style, or
        a new model given to the same one by ``pair_coeff``) or stop now, before any step, when
        the estimator does not belong to its model."""
        self.estimator.check_model(runtime.card, "the model of pair_style ltau")
        self.runtime = runtime

    def start(self, step: int, n_watched: int) -> str:
        """Called at every ``init``, after ``bind``: check that the files' steps go forward (all
        ranks stop together when not) and return what rank 0 reports about this fix (printed to
        screen and log.lammps by the plugin): the whole block at the first run, and again only when
        it changed (another group size gives other ``auto`` thresholds). Lines starting with
        ``WARNING: `` become LAMMPS warnings."""
        report = self.describe(n_watched)
        agree(self.comm, lambda: self._start_files(step, report))
        if report == getattr(self, "_reported", None):
            return ""
        self._reported = report
        return "\n".join(report)

    def _start_files(self, step: int, report: list[str]) -> None:
        if self.log is not None:
            self.log.start(step, [line for line in report if not line.startswith("WARNING: ")])
        if self.dump is not None:
            self.dump.start(step)

    def describe(self, n_watched: int) -> list[str]:
        """This fix in a few lines: estimator, search, metric and units, thresholds (``auto``
        resolved for ``n_watched`` atoms), files; then warnings (unchecked model, empty group)."""
        o, est = self.opts, self.estimator
        options = est.index.options
        search = ", ".join(f"{key} {options[key]}" for key in ("nprobe", "ef_search") if key in options)
        if "recall_at_10" in options:
            search += f"{', ' if search else ''}recall@10 {options['recall_at_10']:.3f}"
        checked = est.model_binding == "checked"
        binding = f"built for model {est.metadata['model_hash'][:12]}" if checked else "UNCHECKED model binding"
        lines = [f"{self.fix_id}: estimator {o.estimator}: {plural(est.n_entries, 'training atom')}, "
                 f"index {est.index.kind}{f' ({search})' if search else ''}, k {o.k or est.k}, {binding}",
                 f"  metric {o.metric} ({METRIC_UNITS[o.metric]}), every {plural(o.every, 'step')}, "
                 f"{plural(n_watched, 'watched atom')}"
                 + ("" if o.ci is None else f", interval {o.ci[0]:g}-{o.ci[1]:g}")]
        auto = (thresholds_for(est.alarm_thresholds, n_watched)[o.metric]
                if AUTO in (self.halt, self.dump_threshold) else None)
        side = "<=" if o.metric == "ood" else ">"

        def threshold(value) -> str:
            if value == AUTO:
                return (f"{side} {auto:.4g} (auto: false-alarm rate "
                        f"{est.alarm_thresholds['false_alarm_rate']:g} per evaluation of {plural(n_watched, 'atom')})")
            return f"{side} {value:g}"

        events = []
        if self.halt is not None:
            events.append(f"halt when {threshold(self.halt)} (error {o.halt_mode})")
        if self.dump_threshold is not None:
            limits = f"interval {o.dump_interval}" + (f", max {o.dump_max}" if o.dump_max else "")
            events.append(f"dump {o.dump_file} when {threshold(self.dump_threshold)} ({limits})")
        if o.log_file:
            events.append(f"log {o.log_file}")
        if o.append:
            events.append("append yes")
        lines.append("  " + ("; ".join(events) if events else "no halt, dump or log: values for the input "
                                                               "script only (f_ID)"))
        if not checked:
            lines.append(f"WARNING: Fix ltau {self.fix_id}: estimator {o.estimator} is unchecked (it records no model "
                         "hash), so it cannot be checked against the model of pair_style ltau (only the latent "
                         "width matches): rebuild it with build-estimator --model MODEL")
        if n_watched == 0:
            lines.append(f"WARNING: Fix ltau {self.fix_id}: its group has no atoms; its values stay at their "
                         "no-atom defaults (0, p-value 1) and it can never halt or dump")
        return lines

    def end_of_step(self, step: int, nlocal: int, x: np.ndarray, tag: np.ndarray, mask: np.ndarray,
                    groupbit: int, peratom: np.ndarray, global_out: np.ndarray,
                    box: np.ndarray, periodic: tuple[bool, bool, bool], check_halt: bool) -> None:
        """Fill the per-atom array and global values; with ``check_halt``, raises ``HaltCondition``
        on every rank together when the persistence rule (``over K within N``) fires."""
        in_group, score = agree(self.comm, lambda: self._evaluate(step, nlocal, tag, mask, groupbit, peratom))
        self._decide(step, nlocal, x, tag, in_group, score, peratom, global_out, box, periodic, check_halt)

    def _evaluate(self, step, nlocal, tag, mask, groupbit, peratom):
        """Rank-local part: query the estimator for this rank's group atoms; returns the group
        mask and the metric as badness (larger = worse) per atom."""
        cache = self.runtime.cache
        if cache.step != step:
            raise LTAUError(f"no features for step {step} (pair_style ltau last ran at step "
                            f"{cache.step}); fix ltau needs pair_style ltau to compute forces every step")
        if nlocal != len(cache.tags) or not np.array_equal(tag, cache.tags):
            raise LTAUError(f"atoms changed between the force call and the end of step {step}")
        in_group = (mask & groupbit) != 0
        peratom[:] = 0.0
        score = np.zeros(nlocal)
        if np.any(in_group):
            latent = cache.latent[in_group]
            bad = ~np.all(np.isfinite(latent), axis=1)
            if bad.any():
                raise LTAUError(f"step {step}: the model gave non-finite (NaN or inf) latent features for "
                                f"{describe_tags(tag[in_group][bad])}: no uncertainty can be computed there "
                                "(overlapping atoms, or a configuration far outside the training data?)")
            res = self.estimator.query(latent, k=self.opts.k)
            interval = res.interval(*self.opts.ci).T if self.opts.ci else np.zeros((2, len(res)))
            columns = [res.expected, *interval, res.distance]
            if self.has_ood:
                columns.append(res.ood)
            peratom[in_group] = np.column_stack(columns)
            metric = self.opts.metric
            score[in_group] = badness(metric, peratom[in_group, METRIC_COLUMN[metric]])
        return in_group, score

    def _decide(self, step, nlocal, x, tag, in_group, score, peratom, global_out, box, periodic, check_halt) -> None:
        """Collective part: global values, log, dump and halt, identical on every rank."""
        from mpi4py import MPI

        o, metric = self.opts, self.opts.metric
        thresholds = self._thresholds(in_group)
        over = {what: np.count_nonzero(crossed(metric, score[in_group], t)) if t is not None else 0
                for what, t in thresholds.items()}
        local = np.array([badness(metric, score[in_group]).sum(), np.count_nonzero(in_group),
                          over["dump"], over["halt"]], dtype=np.float64)
        sums = np.empty_like(local)
        self.comm.Allreduce(local, sums, op=MPI.SUM)
        # maxima of badness, kNN distance and OOD badness (-p)
        local_max = np.array([score[in_group].max(initial=-np.inf), peratom[in_group, 3].max(initial=-np.inf),
                              (-peratom[in_group, 4]).max(initial=-np.inf) if self.has_ood else 0.0])
        maxima = np.empty_like(local_max)
        self.comm.Allreduce(local_max, maxima, op=MPI.MAX)
        total, n_group, n_dump, n_halt = sums
        # an empty group: nothing is uncertain (worst 0, p-value 1), never -0 or an alarm
        worst_score, dmax, worst_ood = maxima if n_group else (badness(metric, 1.0 if metric == "ood" else 0.0),
                                                                0.0, -1.0)
        worst = float(badness(metric, worst_score))
        worst_tag = self._worst_tag(score, in_group, tag, worst_score) if n_group else 0
        mean = total / n_group if n_group else float(badness(metric, worst_score))
        values = [worst, worst, mean, n_dump, n_halt, dmax]
        global_out[:] = values + ([-worst_ood] if self.has_ood else [])

        quantile = self._global_quantile(score[in_group]) if o.log_file else None
        frame = None
        if self.dump_threshold is not None and n_dump > 0 and self._dump_allowed(step):
            frame = self._gather_frame(step, nlocal, x, tag, in_group, peratom, box, periodic, worst,
                                       thresholds["dump"])
            self.dump_steps.append(step)
        log_values = [worst, global_out[2], quantile, int(n_dump), int(n_halt), dmax, worst_tag]
        # only rank 0 writes, but a failed write must stop every rank together
        agree(self.comm, lambda: self._write_outputs(step, log_values, frame))
        if not check_halt or self.halt is None:
            return
        if self.persistence.update(n_halt > 0):
            side = "is at or below" if metric == "ood" else "exceeds"
            held = self.persistence.describe()
            raise HaltCondition(
                f"{self.fix_id} condition met on step {step} with value {worst:.6g}: {metric} "
                f"uncertainty {side} the halt threshold {thresholds['halt']:g} (atom tag {worst_tag}, "
                f"{plural(int(n_halt), 'atom')} over{held})")

    def _write_outputs(self, step: int, log_values: list, frame) -> None:
        if self.log is not None:
            self.log.write(step, log_values)
        if frame is not None:
            self.dump.write(frame, step)

    def _worst_tag(self, score, in_group, tag, worst_score) -> int:
        """Smallest tag among the atoms holding the worst value: the same on 1 and N ranks."""
        from mpi4py import MPI

        hits = tag[in_group & (score == worst_score)]
        mine = np.array([hits.min() if hits.size else np.iinfo(np.int64).max], dtype=np.int64)
        out = np.empty_like(mine)
        self.comm.Allreduce(mine, out, op=MPI.MIN)
        return int(out[0])

    def _global_quantile(self, score: np.ndarray) -> float | None:
        """Exact quantile Q over all group atoms, on the bad side of the metric (gathered to rank 0)."""
        gathered = self.comm.gather(score, root=0)
        if self.rank != 0:
            return None
        allv = np.concatenate(gathered)
        if not allv.size:
            return 1.0 if self.opts.metric == "ood" else 0.0
        return float(badness(self.opts.metric, np.quantile(allv, self.opts.quantile)))

    def _gather_frame(self, step, nlocal, x, tag, in_group, peratom, box, periodic, worst, threshold):
        """The whole configuration as ASE Atoms on rank 0 (None elsewhere), sorted by tag."""
        cache = self.runtime.cache
        symbols = np.asarray(cache.symbols)[cache.species] if nlocal else np.empty(0, dtype="<U2")
        part = (tag.copy(), symbols, x.copy(), np.array(cache.forces, copy=True), peratom.copy(), in_group.copy())
        parts = self.comm.gather(part, root=0)
        if self.rank != 0:
            return None
        from ase import Atoms

        from ltau_lmp.lammps.box import lammps_box_to_cell

        tags, syms, pos, forces, values, group = (np.concatenate(a) for a in zip(*parts))
        order = np.argsort(tags, kind="stable")
        cell, origin = lammps_box_to_cell(box)
        atoms = Atoms(symbols=syms[order].tolist(), positions=pos[order] - origin, cell=cell, pbc=periodic)
        atoms.arrays["forces"] = forces[order]
        atoms.arrays["tag"] = tags[order].astype(np.int64)
        for i, name in enumerate(("ltau_expected", "ltau_ci_low", "ltau_ci_high", "ltau_knn_distance",
                                  "ltau_ood_pvalue")[:self.n_peratom]):
            atoms.arrays[name] = values[order, i]
        atoms.arrays["in_group"] = group[order]
        atoms.info.update({"timestep": int(step), "ltau_metric": self.opts.metric, "ltau_worst": float(worst),
                           "ltau_dump_threshold": float(threshold), "fix_id": self.fix_id})
        return atoms

    def _dump_allowed(self, step: int) -> bool:
        steps = self.dump_steps
        if steps and step <= steps[-1]:
            return False
        if steps and step - steps[-1] < self.opts.dump_interval:
            return False
        return self.opts.dump_max is None or len(steps) < self.opts.dump_max

