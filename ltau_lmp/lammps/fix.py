"""``fix ID group ltau ESTIMATOR keyword value ...``: LTAU uncertainty of every local atom.

Runs at the end of every N-th step on the latent features that ``pair_style ltau`` published
for the same step (:class:`~ltau_lmp.lammps.features.PairFeatures`: no second model pass).
Every decision that ends or changes the run (halt, dump) is taken from values reduced over all
ranks, so all ranks take it together. :class:`FixLtau` holds the per-rank state and does the
communication; the keywords are parsed in :mod:`~ltau_lmp.lammps.fix_options`, a rank's part
of an evaluation is :mod:`~ltau_lmp.lammps.fix_step`, the rules over all ranks'
:mod:`~ltau_lmp.lammps.fix_decision`, rank 0's files :mod:`~ltau_lmp.lammps.events`.
See doc/fix_ltau.md for the user-facing description.
"""

from __future__ import annotations

import numpy as np

from ltau_lmp.collective import HaltCondition, agree, agree_gather
from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator.calibration import ALARM_METRICS
from ltau_lmp.lammps.events import FixFiles
from ltau_lmp.lammps.features import PairFeatures
from ltau_lmp.lammps.fix_decision import Decider, Persistence
from ltau_lmp.lammps.fix_options import AUTO, FixOptions
from ltau_lmp.lammps.fix_step import ROW, StepView, evaluate_rank, summary_row
from ltau_lmp.lammps.messages import plural

__all__ = ["FixLtau", "FixOptions", "HaltCondition", "Persistence", "StepView"]

# what each metric measures, in the units of the values compared with its thresholds
METRIC_UNITS = {"expected": "expected force error, eV/Angstrom",
                "upper": "upper end of the force-error interval, eV/Angstrom",
                "distance": "mean kNN distance in the model's latent space (latent units)",
                "ood": "out-of-domain p-value, smaller = more unusual"}


def load_estimator(opts: FixOptions, card, verify: bool, gpu_device: int | None):
    """The estimator of ``opts``, checked against the pair's model ``card`` and the options;
    returns it and whether the OOD p-value (f_ID[5]) is computed."""
    from ltau_lmp.errors import FileFormatError
    from ltau_lmp.estimator import LTAUEstimator

    try:
        # Checksums are verified once (rank 0); every rank memory-maps the same pages.
        estimator = LTAUEstimator.load(opts.estimator, mmap=True, verify=verify, gpu_device=gpu_device or 0)
    except FileFormatError as exc:
        raise LTAUError(f"cannot use estimator: {exc}") from None
    estimator.check_model(card, "the model of pair_style ltau")
    # p-values exist for the k the reference distances were measured with
    own_k = opts.k in (None, estimator.k)
    has_ood = estimator.has_ood_reference and own_k
    if opts.metric == "ood" and not has_ood:
        why = (f"its reference distances were measured with k = {estimator.k}, not k = {opts.k}"
               if not own_k else "it has no reference distribution of held-out kNN distances "
               "(rebuild it with held-out atoms: ltau-lmp train, or build-estimator --reference-descriptors)")
        raise LTAUError(f"metric ood cannot use estimator {opts.estimator}: {why}")
    for what, value in (("halt", opts.halt), ("dump", opts.dump_threshold)):
        if value == AUTO and (estimator.alarm_thresholds is None or opts.metric not in ALARM_METRICS):
            have = ", ".join(ALARM_METRICS) if estimator.alarm_thresholds else "none"
            raise LTAUError(f"{what} auto: estimator {opts.estimator} recommends no threshold for "
                            f"metric {opts.metric} (it has: {have})")
    if opts.k is not None and opts.k > estimator.n_entries:
        raise LTAUError(f"k={opts.k} exceeds the estimator's {estimator.n_entries} entries")
    return estimator, has_ood


class FixLtau:
    """Per-rank state of one ``fix ltau``: the estimator, the rules, the files (rank 0's).

    Outputs: per-atom f_ID[1..4] expected error, CI low, CI high, kNN distance, and f_ID[5] the
    out-of-domain p-value when the estimator has a reference distribution; global f_ID[1..5]
    worst metric value, mean, n over dump, n over halt, max distance, and f_ID[6] min p-value.
    """

    def __init__(self, fix_id: str, args: list[str], comm, features: PairFeatures):
        self.fix_id = fix_id
        self.comm = comm
        self.rank = comm.Get_rank()
        self.features = features
        self.files = None
        self.n_watched = None          # atoms in the group at the last evaluation (or init)
        self._reported = None
        self.opts = FixOptions.parse(args)   # identical words on every rank: fails on all or none
        agree(comm, self._setup)
        self.n_peratom = 5 if self.has_ood else 4
        self.n_vector = 6 if self.has_ood else 5
        # Rank 0 knows the dump's earlier frames; every rank must skip the same steps.
        dump_steps = comm.bcast(list(self.files.dump.steps) if self.files.dump else [], root=0)
        self.decider = Decider(fix_id, self.opts, self.opts.halt, self.opts.dump_threshold,
                               self.estimator.alarm_thresholds, dump_steps)

    def _setup(self) -> None:
        from ltau_lmp.lammps.devices import faiss_gpu_device

        gpu_device = faiss_gpu_device(self.comm)   # collective, first: before any rank can fail alone
        self.estimator, self.has_ood = load_estimator(self.opts, self.features.card, self.rank == 0, gpu_device)
        self.files = FixFiles(self.fix_id, self.opts, self.rank, 5 if self.has_ood else 4)

    def bind(self, features: PairFeatures) -> None:
        """Called at every ``init``: follow the current ``pair_style ltau`` (a new pair style, or
        a new model given to the same one by ``pair_coeff``) or stop now, before any step, when
        the estimator does not belong to its model."""
        self.estimator.check_model(features.card, "the model of pair_style ltau")
        self.features = features

    def start(self, step: int, n_watched: int) -> str:
        """Called at every ``init``, after ``bind``: check that the files' steps go forward (all
        ranks stop together when not) and return what rank 0 reports about this fix (printed to
        screen and log.lammps by the plugin): the whole block at the first run, and again only when
        it changed (another group size gives other ``auto`` thresholds). Lines starting with
        ``WARNING: `` become LAMMPS warnings."""
        self.n_watched = n_watched
        report = self.describe(n_watched)
        agree(self.comm, lambda: self.files.start(step, report))
        if report == self._reported:
            return ""
        self._reported = report
        return "\n".join(report)

    def describe(self, n_watched: int) -> list[str]:
        """This fix in a few lines: estimator, search, metric and units, thresholds (``auto``
        resolved for ``n_watched`` atoms), files; then warnings (unchecked model, empty group)."""
        o, est, chosen = self.opts, self.estimator, self.decider.chosen
        options = est.index.options
        search = ", ".join(f"{key} {options[key]}" for key in ("nprobe", "ef_search", "pca")
                           if options.get(key) is not None)
        if "recall_at_10" in options:
            search += f"{', ' if search else ''}recall@10 {options['recall_at_10']:.3f}"
        checked = est.model_binding == "checked"
        binding = f"built for model {est.metadata['model_hash'][:12]}" if checked else "UNCHECKED model binding"
        lines = [f"{self.fix_id}: estimator {o.estimator}: {plural(est.n_entries, 'training atom')}, "
                 f"index {est.index.kind}{f' ({search})' if search else ''}, k {o.k or est.k}, {binding}",
                 f"  metric {o.metric} ({METRIC_UNITS[o.metric]}), every {plural(o.every, 'step')}, "
                 f"{plural(n_watched, 'watched atom')}"
                 + ("" if o.ci is None else f", interval {o.ci[0]:g}-{o.ci[1]:g}")]
        side = "<=" if o.metric == "ood" else ">"

        def threshold(value) -> str:
            if value == AUTO:
                return (f"{side} {self.decider.auto_threshold(n_watched):.4g} (auto: false-alarm rate "
                        f"{est.alarm_thresholds['false_alarm_rate']:g} per evaluation of {plural(n_watched, 'atom')})")
            return f"{side} {value:g}"

        events = []
        if chosen["halt"] is not None:
            events.append(f"halt when {threshold(chosen['halt'])} (error {o.halt_mode})")
        if chosen["dump"] is not None:
            limits = f"interval {o.dump_interval}" + (f", max {o.dump_max}" if o.dump_max else "")
            events.append(f"dump {o.dump_file} when {threshold(chosen['dump'])} ({limits})")
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

    def end_of_step(self, view: StepView) -> None:
        """One evaluation: fill the per-atom array and global values, write the log line and
        dump frame; with ``view.check_halt``, raises ``HaltCondition`` on every rank together
        when the persistence rule (``over K within N``) fires."""
        rows, score, thresholds = self._gather_rows(view)
        decision = self.decider.decide(view.step, rows, thresholds, view.check_halt)
        view.global_out[:] = decision.outcome.global_values(self.has_ood)
        if self.opts.log_file or decision.dump:    # the same on every rank
            symbols = self.features.symbols(view.type) if decision.dump else None
            self.files.write(self.comm, view, score, decision, symbols)
        if decision.halt is not None:
            raise HaltCondition(decision.halt)

    def _gather_rows(self, view: StepView) -> tuple[np.ndarray, np.ndarray, dict]:
        """The rank-local query, then every rank's summary row in one collective call (two when
        ``auto`` thresholds meet a group whose size changed since the last evaluation); returns
        the rows, this rank's scores and the thresholds the rows were counted with."""
        metric, assumed = self.opts.metric, self.n_watched
        thresholds = self.decider.thresholds(assumed)

        def local():
            score = evaluate_rank(self.features, self.estimator, self.opts, self.has_ood, view)
            return summary_row(metric, view, score, thresholds), score

        rows, score = agree_gather(self.comm, local, len(ROW))
        self.n_watched = int(rows[:, 0].sum())
        if self.decider.uses_auto and self.n_watched != assumed:   # count again with its thresholds
            thresholds = self.decider.thresholds(self.n_watched)
            rows, _ = agree_gather(self.comm, lambda: (summary_row(metric, view, score, thresholds), None), len(ROW))
        return rows, score, thresholds
