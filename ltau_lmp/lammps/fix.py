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
from ltau_lmp.lammps import abi
from ltau_lmp.lammps import keywords as kw
from ltau_lmp.lammps.keywords import Words

METRICS = ("expected", "upper", "distance")
LOG_COLUMNS = ["step", "max", "mean", "quantile", "n_over_dump", "n_over_halt", "max_distance", "worst_tag"]


@dataclass
class FixOptions:
    """Parsed keywords of ``fix ltau`` (see doc/fix_ltau.md)."""

    estimator: str
    every: int = 1
    k: int | None = None
    metric: str = "expected"
    ci: tuple[float, float] = (0.05, 0.95)
    quantile: float = 0.99
    halt: float | None = None
    halt_mode: str = "soft"         # fix halt's default
    halt_message: bool = True
    dump_file: str | None = None
    dump_threshold: float | None = None
    dump_interval: int = 1
    dump_max: int | None = None
    log_file: str | None = None

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
            elif keyword == "ci":
                lo = kw.number(words.take(keyword, "LO HI"), "ci LO")
                hi = kw.number(words.take(keyword, "LO HI"), "ci HI")
                if not 0.0 <= lo < hi <= 1.0:
                    raise LTAUError(f"ci needs 0 <= LO < HI <= 1, got {lo} {hi}")
                opts.ci = (lo, hi)
            elif keyword == "quantile":
                opts.quantile = kw.number(words.take(keyword, "Q"), "quantile")
                if not 0.0 <= opts.quantile <= 1.0:
                    raise LTAUError(f"quantile must lie in [0, 1], got {opts.quantile}")
            elif keyword == "halt":
                opts.halt = kw.threshold(words.take(keyword, "a threshold"), "halt")
            elif keyword == "error":
                opts.halt_mode = kw.choice(words.take(keyword, "hard|soft|continue"), "error", tuple(abi.HALT_MODES))
                given.add(keyword)
            elif keyword == "message":
                opts.halt_message = kw.yes_no(words.take(keyword, "yes|no"), "message")
                given.add(keyword)
            elif keyword == "dump":
                opts.dump_file = words.take(keyword, "FILE THRESH")
                opts.dump_threshold = kw.threshold(words.take(keyword, "FILE THRESH"), "dump")
                while words.peek() in ("interval", "max"):
                    sub = words.pop()
                    value = kw.positive_int(words.take(f"dump ... {sub}", "a positive integer"), f"dump ... {sub}")
                    if sub == "interval":
                        opts.dump_interval = value
                    else:
                        opts.dump_max = value
            elif keyword == "log":
                opts.log_file = words.take(keyword, "FILE")
            else:
                raise LTAUError(f"unknown keyword {keyword!r} (valid: every, k, metric, ci, quantile, "
                                "halt, error, message, dump, log)")
        if given and opts.halt is None:
            raise LTAUError(f"keyword {' and '.join(sorted(given))} needs halt THRESH")
        return opts

    @property
    def halt_mode_code(self) -> int:
        """The plugin's ``ltau_halt_mode``."""
        return abi.HALT_NONE if self.halt is None else abi.HALT_MODES[self.halt_mode]


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
    """Per-rank state of one ``fix ltau``: the estimator, the options, rank-0 output files."""

    n_peratom = 4   # f_ID[1..4]: expected, CI low, CI high, kNN distance
    n_vector = 5    # f_ID[1..5]: max, mean, n over dump, n over halt, max distance

    def __init__(self, fix_id: str, args: list[str], comm, runtime):
        self.fix_id = fix_id
        self.comm = comm
        self.rank = comm.Get_rank()
        self.runtime = runtime
        self.log = self.dump = None
        self.opts = FixOptions.parse(args)   # identical words on every rank: fails on all or none
        agree(comm, self._setup)
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
        if self.opts.k is not None and self.opts.k > self.estimator.n_entries:
            raise LTAUError(f"k={self.opts.k} exceeds the estimator's {self.estimator.n_entries} entries")
        if self.rank == 0:
            from ltau_lmp.lammps.events import FrameDump, StepLog

            if self.opts.log_file:
                self.log = StepLog(self.opts.log_file, LOG_COLUMNS)
            if self.opts.dump_file:
                self.dump = FrameDump(self.opts.dump_file)

    def bind(self, runtime) -> None:
        """Called at every ``init``: follow the current ``pair_style ltau`` (a new pair style, or
        a new model given to the same one by ``pair_coeff``) or stop now, before any step, when
        the estimator does not belong to its model."""
        self.estimator.check_model(runtime.card, "the model of pair_style ltau")
        self.runtime = runtime

    def end_of_step(self, step: int, nlocal: int, x: np.ndarray, tag: np.ndarray, mask: np.ndarray,
                    groupbit: int, peratom: np.ndarray, global_out: np.ndarray,
                    box: np.ndarray, periodic: tuple[bool, bool, bool]) -> None:
        """Fill the per-atom array and global values; raises ``HaltCondition`` on every rank
        together when the halt threshold is crossed."""
        in_group, metric = agree(self.comm, lambda: self._evaluate(step, nlocal, tag, mask, groupbit, peratom))
        self._decide(step, nlocal, x, tag, in_group, metric, peratom, global_out, box, periodic)

    def _evaluate(self, step, nlocal, tag, mask, groupbit, peratom):
        """Rank-local part: query the estimator for this rank's group atoms."""
        cache = self.runtime.cache
        if cache.step != step:
            raise LTAUError(f"no features for step {step} (pair_style ltau last ran at step "
                            f"{cache.step}); fix ltau needs pair_style ltau to compute forces every step")
        if nlocal != len(cache.tags) or not np.array_equal(tag, cache.tags):
            raise LTAUError(f"atoms changed between the force call and the end of step {step}")
        in_group = (mask & groupbit) != 0
        peratom[:] = 0.0
        metric = np.zeros(nlocal)
        if np.any(in_group):
            res = self.estimator.query(cache.latent[in_group], k=self.opts.k)
            interval = res.interval(*self.opts.ci)
            values = np.column_stack([res.expected, interval, res.distance])
            peratom[in_group] = values
            metric[in_group] = values[:, {"expected": 0, "upper": 2, "distance": 3}[self.opts.metric]]
        return in_group, metric

    def _decide(self, step, nlocal, x, tag, in_group, metric, peratom, global_out, box, periodic) -> None:
        """Collective part: global values, log, dump and halt, identical on every rank."""
        from mpi4py import MPI

        o = self.opts
        local = np.array([
            metric[in_group].sum(), np.count_nonzero(in_group),
            np.count_nonzero(metric[in_group] > o.dump_threshold) if o.dump_threshold is not None else 0,
            np.count_nonzero(metric[in_group] > o.halt) if o.halt is not None else 0,
        ])
        sums = np.empty_like(local)
        self.comm.Allreduce(local, sums, op=MPI.SUM)
        local_max = np.array([metric[in_group].max(initial=-np.inf), peratom[in_group, 3].max(initial=-np.inf)])
        maxima = np.empty_like(local_max)
        self.comm.Allreduce(local_max, maxima, op=MPI.MAX)
        total, n_group, n_dump, n_halt = sums
        vmax, dmax = (maxima if n_group else np.zeros(2))
        worst_tag = self._worst_tag(metric, in_group, tag, vmax) if n_group else 0
        global_out[:] = [vmax, vmax, total / n_group if n_group else 0.0, n_dump, n_halt, dmax]

        quantile = self._global_quantile(metric[in_group]) if o.log_file else None
        frame = None
        if o.dump_threshold is not None and n_dump > 0 and self._dump_allowed(step):
            frame = self._gather_frame(step, nlocal, x, tag, in_group, peratom, box, periodic, vmax)
            self.dump_steps.append(step)
        log_values = [vmax, global_out[2], quantile, int(n_dump), int(n_halt), dmax, worst_tag]
        # only rank 0 writes, but a failed write must stop every rank together
        agree(self.comm, lambda: self._write_outputs(step, log_values, frame))
        if o.halt is not None and n_halt > 0:
            raise HaltCondition(
                f"{self.fix_id} condition met on step {step} with value {vmax:.6g}: {o.metric} "
                f"uncertainty exceeds the halt threshold {o.halt:g} (atom tag {worst_tag}, "
                f"{int(n_halt)} atoms over)")

    def _write_outputs(self, step: int, log_values: list, frame) -> None:
        if self.log is not None:
            self.log.write(step, log_values)
        if frame is not None:
            self.dump.write(frame, step)

    def _worst_tag(self, metric, in_group, tag, vmax) -> int:
        """Smallest tag among the atoms holding the global max: the same on 1 and N ranks."""
        from mpi4py import MPI

        hits = tag[in_group & (metric == vmax)]
        mine = np.array([hits.min() if hits.size else np.iinfo(np.int64).max], dtype=np.int64)
        out = np.empty_like(mine)
        self.comm.Allreduce(mine, out, op=MPI.MIN)
        return int(out[0])

    def _global_quantile(self, values: np.ndarray) -> float | None:
        """Exact quantile of the metric over all group atoms (gathered to rank 0)."""
        gathered = self.comm.gather(values, root=0)
        if self.rank != 0:
            return None
        allv = np.concatenate(gathered)
        return float(np.quantile(allv, self.opts.quantile)) if allv.size else 0.0

    def _gather_frame(self, step, nlocal, x, tag, in_group, peratom, box, periodic, vmax):
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
        for i, name in enumerate(("ltau_expected", "ltau_ci_low", "ltau_ci_high", "ltau_knn_distance")):
            atoms.arrays[name] = values[order, i]
        atoms.arrays["in_group"] = group[order]
        atoms.info.update({"timestep": int(step), "ltau_metric": self.opts.metric, "ltau_max": float(vmax),
                           "ltau_dump_threshold": float(self.opts.dump_threshold), "fix_id": self.fix_id})
        return atoms

    def _dump_allowed(self, step: int) -> bool:
        steps = self.dump_steps
        if steps and step <= steps[-1]:
            return False
        if steps and step - steps[-1] < self.opts.dump_interval:
            return False
        return self.opts.dump_max is None or len(steps) < self.opts.dump_max

