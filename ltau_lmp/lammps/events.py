"""Files written by ``fix ltau`` on rank 0: the evaluation log and the over-threshold frame dump.

:class:`FixFiles` holds one fix's files and writes an evaluation into them (rank 0 gathers
what it writes); :class:`StepLog` and :class:`FrameDump` are the two files.

LAMMPS's own convention: a new fix starts each file afresh (like ``log FILE`` and ``dump``),
and the fix keyword ``append yes`` continues the file of an earlier run instead (a restart,
like ``log FILE append``). An appended file must not already hold steps after the first step
of the continuing run (``start``): that stops the run with a message naming the file, rather
than mixing two histories. Starting afresh replaces only an earlier file of the same kind
(an ltau log, a fix ltau dump); any other file is refused, never overwritten.

A dump frame is appended with one ``write`` of the whole frame, then fsynced, at
O(frame) cost: a run killed at any instant (kill -9) leaves whole frames, since the kernel
completes a write it has begun. What only a crash of the machine or a full disk can leave, a
torn last frame, is cut away when ``append yes`` continues the file (``FrameDump._recover``).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from ltau_lmp.collective import agree
from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps.fix_decision import LOG_COLUMNS, Decision
from ltau_lmp.lammps.fix_options import FixOptions
from ltau_lmp.lammps.fix_step import badness

_STEP_RE = re.compile(rb"\btimestep=(\d+)")
LOG_MARK = "# fix ltau"          # the first line of every log this module writes
DUMP_MARK = b"ltau_metric="      # a key of every dump frame's comment line (FixFiles._frame)
PERATOM_NAMES = ("ltau_expected", "ltau_ci_low", "ltau_ci_high", "ltau_knn_distance", "ltau_ood_pvalue")


def _prepare(path: Path, what: str) -> None:
    """The file's folder exists (created if needed) and the path is not a folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in reversed(path.parents) if p.exists() and not p.is_dir())
        raise LTAUError(f"{what} {path}: cannot create its folder: {blocker} is a file") from None
    if path.is_dir():
        raise LTAUError(f"{what} {path}: is a folder; give a file name")


def _check_order(path: Path, what: str, last_step: int, step: int) -> None:
    """Steps in a file only go forward: an appended file must end at or before ``step``."""
    if step < last_step:
        raise LTAUError(f"{what} {path}: the file already holds step {last_step}, after step {step} of "
                        "this run (a restart from an earlier state, reset_timestep, or append yes on the "
                        "file of another run): give a new file name, or leave append yes out to start "
                        "the file afresh")


class StepLog:
    """One line per evaluation, under a header that names the metric, its units and thresholds.

    ``append``: continue the file (a restart); its steps up to this run's first step are kept
    and a step already in the file (the restart step, evaluated again) is not written twice.
    """

    def __init__(self, path, columns: list[str], append: bool = False):
        self.path = Path(path)
        self.columns = columns
        self.last_step = -1
        self.started = False
        try:
            _prepare(self.path, "log")
            if append and self.path.exists() and self.path.stat().st_size > 0:
                self.last_step = self._last_step_in_file()
            else:
                if self.path.exists() and not self._is_ltau_log():
                    raise LTAUError(f"log {self.path}: exists and is not a fix ltau log; refusing to "
                                    "overwrite it (remove it or choose another file name)")
                self.path.write_text("")
        except OSError as exc:
            raise LTAUError(f"log {self.path}: {exc.strerror}") from None

    def _is_ltau_log(self) -> bool:
        """An earlier ltau log (header line first), or an empty file."""
        with open(self.path, "rb") as fh:
            first = fh.readline()
        return not first or first.startswith(LOG_MARK.encode()) or first.startswith(b"# step ")

    def _last_step_in_file(self) -> int:
        last = -1
        with open(self.path, "rb") as fh:
            for line in fh:
                fields = line.split()
                if fields and not line.startswith(b"#") and line.endswith(b"\n"):
                    try:
                        last = max(last, int(fields[0]))
                    except ValueError:
                        raise LTAUError(f"log {self.path}: append yes: not an ltau log "
                                        f"(line {line[:60]!r})") from None
        return last

    def start(self, step: int, header: list[str]) -> None:
        """Called at every run's init: check the step order; the first time, write the header
        (comment lines, then the column names)."""
        _check_order(self.path, "log", self.last_step, step)
        if self.started:
            return
        lines = [LOG_MARK + (" " + header[0] if header else "")] + ["# " + h for h in header[1:]]
        with open(self.path, "a") as fh:
            fh.write("\n".join(lines + ["# " + " ".join(self.columns)]) + "\n")
        self.started = True

    def write(self, step: int, values: list) -> bool:
        """Append a line unless ``step`` is already logged; returns whether it wrote."""
        if step <= self.last_step:
            return False
        line = " ".join([str(step)] + [_fmt(v) for v in values]) + "\n"
        with open(self.path, "a") as fh:
            fh.write(line)
        self.last_step = step
        return True


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.6g}"


class FrameDump:
    """Extended-XYZ frames of the configurations whose uncertainty crossed the dump threshold.

    ``steps`` lists the timesteps of the frames in the file (with ``append``, earlier runs'
    too), so the caller can rate-limit and never dump a step twice.
    """

    def __init__(self, path, append: bool = False):
        self.path = Path(path)
        try:
            _prepare(self.path, "dump")
            if append:
                self.steps = self._recover()
            else:
                if self.path.exists() and not self._is_ltau_dump():
                    raise LTAUError(f"dump {self.path}: exists and is not a fix ltau dump; refusing to "
                                    "overwrite it (remove it or choose another file name)")
                self.path.write_bytes(b"")
                self.steps = []
        except OSError as exc:
            raise LTAUError(f"dump {self.path}: {exc.strerror}") from None

    def _is_ltau_dump(self) -> bool:
        """An earlier fix ltau dump (its first frame's comment line has ``ltau_metric=``), or empty."""
        with open(self.path, "rb") as fh:
            count, comment = fh.readline(), fh.readline()
        return not count or DUMP_MARK in comment

    def start(self, step: int) -> None:
        """Called at every run's init: frames only go forward in time."""
        _check_order(self.path, "dump", max(self.steps, default=-1), step)

    def _recover(self) -> list[int]:
        """Steps of the complete frames in the file; a torn last frame (from another writer or a
        crashed disk) is truncated away."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        steps, pos, good_end = [], 0, 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break
            try:
                natoms = int(data[pos:end])
            except ValueError:
                raise LTAUError(f"dump {self.path}: append yes: not an extended-XYZ file at byte {pos}") from None
            frame_end = end
            for _ in range(natoms + 1):
                frame_end = data.find(b"\n", frame_end + 1)
                if frame_end < 0:
                    break
            if frame_end < 0:
                break
            match = _STEP_RE.search(data, end, data.find(b"\n", end + 1))
            steps.append(int(match.group(1)) if match else -1)
            pos = good_end = frame_end + 1
        if good_end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
        return steps

    def write(self, atoms, step: int) -> None:
        """Append one frame: one write() of the whole frame, then fsync."""
        from ase.io import write

        buffer = io.StringIO()
        # parallel=False: ASE would otherwise treat the write as collective over mpi4py's world
        # (only rank 0 calls this, so the other ranks would never join and rank 0 would hang).
        write(buffer, atoms, format="extxyz", parallel=False)
        data = buffer.getvalue().encode()
        try:
            with open(self.path, "ab", buffering=0) as fh:    # unbuffered: one write() of the frame
                written = fh.write(data)
                while written < len(data):                     # a short write (a full disk, a signal)
                    written += fh.write(data[written:])
                os.fsync(fh.fileno())
        except OSError as exc:
            raise LTAUError(f"dump {self.path}: {exc.strerror}") from None
        self.steps.append(step)


class FixFiles:
    """The log and dump of one ``fix ltau``: open on rank 0 (None where not asked for, and on
    every other rank). ``n_peratom``: the per-atom columns written into a frame."""

    def __init__(self, fix_id: str, opts: FixOptions, rank: int, n_peratom: int):
        self.fix_id, self.opts, self.n_peratom = fix_id, opts, n_peratom
        self.log = self.dump = None
        if rank == 0 and opts.log_file:
            self.log = StepLog(opts.log_file, LOG_COLUMNS, append=opts.append)
        if rank == 0 and opts.dump_file:
            self.dump = FrameDump(opts.dump_file, append=opts.append)

    def start(self, step: int, report: list[str]) -> None:
        """At every run's init (rank 0): the steps go forward; the log's header is the report."""
        if self.log is not None:
            self.log.start(step, [line for line in report if not line.startswith("WARNING: ")])
        if self.dump is not None:
            self.dump.start(step)

    def write(self, comm, view, score: np.ndarray, decision: Decision, symbols) -> None:
        """Collective, when the fix logs or ``decision.dump``: rank 0 gathers what it writes (the
        group's values for the log's exact quantile, the frame's parts) in one call, then writes;
        a failed write stops every rank together. ``view``: the evaluation's ``StepView``;
        ``score``: its badness per local atom; ``symbols``: of the local atoms, for a frame."""
        group = view.in_group
        frame = None
        if decision.dump:
            frame = (view.tag.copy(), symbols, view.x.copy(), view.f.copy(), view.peratom.copy(), group.copy())
        parts = comm.gather((score[group] if self.opts.log_file else None, frame), root=0)

        def write() -> None:
            if parts is None:    # not rank 0
                return
            scores, frames = zip(*parts)
            if self.log is not None:
                self.log.write(view.step, decision.outcome.log_values(self._quantile(np.concatenate(scores))))
            if decision.dump:
                self.dump.write(self._frame(view, frames, decision), view.step)

        agree(comm, write)

    def _quantile(self, scores: np.ndarray) -> float:
        """Exact quantile Q over all group atoms, on the bad side of the metric."""
        if not scores.size:
            return 1.0 if self.opts.metric == "ood" else 0.0
        return float(badness(self.opts.metric, np.quantile(scores, self.opts.quantile)))

    def _frame(self, view, parts, decision: Decision):
        """The whole configuration as ASE Atoms, sorted by tag."""
        from ase import Atoms

        from ltau_lmp.geometry import lammps_box_to_cell

        tags, syms, pos, forces, values, group = (np.concatenate(a) for a in zip(*parts))
        order = np.argsort(tags, kind="stable")
        cell, origin = lammps_box_to_cell(view.box)
        atoms = Atoms(symbols=syms[order].tolist(), positions=pos[order] - origin, cell=cell, pbc=view.periodic)
        atoms.arrays["forces"] = forces[order]
        atoms.arrays["tag"] = tags[order].astype(np.int64)
        for i, name in enumerate(PERATOM_NAMES[:self.n_peratom]):
            atoms.arrays[name] = values[order, i]
        atoms.arrays["in_group"] = group[order]
        atoms.info.update({"timestep": int(view.step), "ltau_metric": self.opts.metric,
                           "ltau_worst": float(decision.outcome.worst),
                           "ltau_dump_threshold": float(decision.thresholds["dump"]), "fix_id": self.fix_id})
        return atoms
