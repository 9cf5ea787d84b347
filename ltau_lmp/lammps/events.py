"""Files written by ``fix ltau`` on rank 0: the evaluation log and the over-threshold frame dump.

LAMMPS's own convention: a new fix starts each file afresh (like ``log FILE`` and ``dump``),
and the fix keyword ``append yes`` continues the file of an earlier run instead (a restart,
like ``log FILE append``). An appended file must not already hold steps after the first step
of the continuing run (``start``): that stops the run with a message naming the file, rather
than mixing two histories. Starting afresh replaces only an earlier file of the same kind
(an ltau log, a fix ltau dump); any other file is refused, never overwritten.

A dump frame is committed atomically: the file is copied with the new frame appended into
``FILE.tmp``, fsynced and renamed over ``FILE``, so a reader (or a run killed at any instant)
sees whole frames only. That copy costs O(file size) per frame; dumps are rate-limited
(``interval``, ``max``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ltau_lmp.errors import LTAUError

_STEP_RE = re.compile(rb"\btimestep=(\d+)")
LOG_MARK = "# fix ltau"          # the first line of every log this module writes
DUMP_MARK = b"ltau_metric="      # a key of every dump frame's comment line (FixLtau._gather_frame)


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
            self._tmp.unlink(missing_ok=True)   # a killed run's uncommitted frame (ours: FILE.tmp)
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

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def write(self, atoms, step: int) -> None:
        """Append one frame atomically: copy + new frame into FILE.tmp, fsync, rename."""
        from ase.io import write

        buffer = io.StringIO()
        # parallel=False: ASE would otherwise treat the write as collective over mpi4py's world
        # (only rank 0 calls this, so the other ranks would never join and rank 0 would hang).
        write(buffer, atoms, format="extxyz", parallel=False)
        try:
            if self.path.exists():
                shutil.copyfile(self.path, self._tmp)
            with open(self._tmp, "ab") as fh:
                fh.write(buffer.getvalue().encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise LTAUError(f"dump {self.path}: {exc.strerror}") from None
        self.steps.append(step)
