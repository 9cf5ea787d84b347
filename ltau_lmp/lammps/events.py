"""Files written by ``fix ltau`` on rank 0: the evaluation log and the over-threshold frame dump.

Both survive restarts: they append, remember the last step they hold, and never write a step
twice (a run continued from a restart re-evaluates its first step in ``setup``). A dump frame is
committed atomically: the file is copied with the new frame appended into ``FILE.tmp``, fsynced
and renamed over ``FILE``, so a reader (or a run killed at any instant) sees whole frames only.
That copy costs O(file size) per frame; dumps are rate-limited (``interval``, ``max``).
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


class StepLog:
    """One line per evaluation; appends on restart; ignores steps already in the file."""

    def __init__(self, path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns
        self.last_step = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                self.last_step = self._last_step_in_file()
            else:
                self.path.write_text("# " + " ".join(columns) + "\n")
        except OSError as exc:
            raise LTAUError(f"fix ltau log {self.path}: {exc.strerror}") from None

    def _last_step_in_file(self) -> int:
        last = -1
        with open(self.path, "rb") as fh:
            for line in fh:
                fields = line.split()
                if fields and not line.startswith(b"#") and line.endswith(b"\n"):
                    try:
                        last = max(last, int(fields[0]))
                    except ValueError:
                        raise LTAUError(f"fix ltau log {self.path}: not an ltau log (line {line[:60]!r})") from None
        return last

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

    ``steps`` lists the timesteps of the frames in the file (earlier runs included), so the
    caller can rate-limit and never dump a step twice.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.steps = self._recover()
        except OSError as exc:
            raise LTAUError(f"fix ltau dump {self.path}: {exc.strerror}") from None

    def _recover(self) -> list[int]:
        """Steps of the complete frames in the file; a torn last frame (from another writer or a
        crashed disk) is truncated away, a stale ``FILE.tmp`` of a killed run removed."""
        self._tmp.unlink(missing_ok=True)
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
                raise LTAUError(f"fix ltau dump {self.path}: not an extended-XYZ file at byte {pos}") from None
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
            raise LTAUError(f"fix ltau dump {self.path}: {exc.strerror}") from None
        self.steps.append(step)
