"""The labelling stage of the learning loop: the reference calculator on every selected frame.

``label_frames(frames, spec, out_dir)`` runs the reference (any ASE calculator, named by an import
path and keyword arguments: ``ltau_lmp.data.reference.ReferenceCalculator``) on each frame through
a ``concurrent.futures.Executor`` and commits each result to disk on its own, atomically, the
moment it arrives.  ``collect_labels(out_dir)`` reads them back as ASE ``Atoms``.

What a frame carries
--------------------
Each frame is an ``ase.Atoms``; its ``info`` carries the provenance the loop gives it (the keys of
``PROVENANCE_KEYS``: ``round``, ``protocol``, ``step``, ``source``, the file the frame came from)
and anything else, all kept on the labelled frame.  A calculator attached to the frame (a model's
predictions in a dump) is ignored, and ``info`` / ``arrays`` entries named like the reference's
results (``energy``, ``forces``, ``stress``, ``free_energy``) are dropped from the labelled copy so
that they cannot be mistaken for true labels.

Its key, ``frame_key(atoms)``, is a SHA-256 of the atomic numbers, positions, cell and periodicity
(exact float64 bytes) and of the provenance entries: the same frame from the same step of the same
protocol and round is the same label, whichever run asks for it.

On disk
-------
::

    OUT_DIR/
      .label.lock             held (flock) while a label_frames call writes here: one writer at a time
      labels/KEY.extxyz       the frame: energy, forces (and stress for 3D-periodic cells) as ASE
                              results, info with its provenance and ``label_key``; for a failed
                              frame, the frame as given (no results), so it is never lost
      labels/KEY.json         the record, written after the frame: it is the commit point
                              {"format": "ltau-label", "version": 1, "key", "status": "labelled" |
                               "failed", "provenance", "attempts", "seconds" (calculator time over all
                               attempts), "errors": [{"attempt", "error", "traceback", "seconds",
                               "host", "pid"}], "reference": {"calculator", "kwargs"}, "host", "pid",
                               "n_atoms", "formula", "info_dropped", "finished"}

Both files are written into a temporary sibling (``.KEY.json.XXXX.json``), flushed to disk and
renamed into place (``os.replace``), so a kill at any moment leaves each key either committed or
absent.  A rerun of ``label_frames`` removes stale temporaries and labels only the keys without a
record (or whose record says "labelled" but whose frame file is gone); it never labels a key twice.
Frames recorded as failed are not retried on a rerun unless ``retry_failed=True``.  Existing
labels made with another reference calculator are refused (``ConfigError``): one folder, one truth.

Failures
--------
The worker catches whatever the calculator raises (and rejects non-finite or misshapen results)
and returns it as data; an error of the executor itself (a worker process that died, a dask
worker lost) counts the same.  Each failed attempt is kept in the record (error text and
traceback) and the frame is submitted again, up to ``retries`` more times; a frame that still
fails is committed with status "failed", listed in ``LabelReport.failed``, and the other frames go
on.  Nothing is dropped silently.

Executors (no scheduler of our own)
-----------------------------------
Any ``concurrent.futures.Executor`` works: the task is ``label_worker(atoms, spec_dict, attempt)``,
a top-level function with plain picklable arguments that builds the calculator inside the worker
(one per worker process and thread, kept for the next frame, discarded after a failure) and
returns plain arrays.

* default (``executor=None``): ``local_executor(max_workers)``, a ``ProcessPoolExecutor`` over
  ``spawn``-ed processes (the parent may hold MPI and torch state, which must not be forked);
  ``max_workers=1`` runs in this process, for debugging (pdb, prints).  A script that uses it needs
  the usual ``if __name__ == "__main__":`` guard (spawn re-imports the main module).  Do not run it
  from inside an ``mpirun`` / ``srun`` step: the spawned workers would inherit its PMI environment.
* dask.distributed (``pip install "ltau_lmp[dask]"``): ``dask_executor()`` starts a
  ``LocalCluster``; ``dask_executor("tcp://host:8786")`` joins a running scheduler;
  ``dask_executor(cluster)`` takes any dask cluster object, e.g. from dask-jobqueue on Slurm/PBS::

      from dask_jobqueue import SLURMCluster          # or PBSCluster, LSFCluster, SGECluster
      cluster = SLURMCluster(cores=1, processes=1, memory="4GB", walltime="02:00:00",
                             account="myproject", queue="regular")
      cluster.scale(jobs=16)                         # or cluster.adapt(maximum_jobs=16)
      with dask_executor(cluster) as executor:       # Client(cluster).get_executor(pure=False)
          report = label_frames(frames, spec, "round_003/label", executor=executor)

  (plain ``distributed.Client(cluster).get_executor()`` works too).  Keep one thread per worker
  (``threads_per_worker=1``): most ASE calculators (DFT codes writing input files in the working
  directory, LAMMPS) are not safe to run twice in one process at once.
* Parsl: ``parsl.concurrent.ParslPoolExecutor(config)`` is a ``concurrent.futures.Executor``
  whose futures are ``concurrent.futures.Future`` s; build ``config`` with e.g. a
  ``HighThroughputExecutor`` over a ``SlurmProvider`` and pass the pool as ``executor=``::

      from parsl.concurrent import ParslPoolExecutor
      with ParslPoolExecutor(config) as executor:
          report = label_frames(frames, spec, out_dir, executor=executor)

A caller's executor is never shut down by ``label_frames``; the default one always is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from ase import Atoms

from ltau_lmp.data.reference import ReferenceCalculator, make_calculator
from ltau_lmp.errors import ConfigError, FileFormatError, LTAUError, check_file_format
from ltau_lmp.outputs import replaced_file

__all__ = [
    "PROVENANCE_KEYS", "LabelFailure", "LabelReport", "ReferenceCalculator", "collect_labels",
    "dask_executor", "frame_key", "label_frames", "label_worker", "local_executor", "provenance",
    "read_records", "InProcessExecutor", "DaskExecutor",
]

PROVENANCE_KEYS = ("round", "protocol", "step", "source")
RECORD_FORMAT = "ltau-label"
RECORD_VERSION = 1
LABELS_DIR = "labels"
LOCK_FILE = ".label.lock"
# Names of the reference's results: never carried over from the frame given (a model's predictions).
RESULT_NAMES = ("energy", "free_energy", "forces", "stress")


# --- frames ---------------------------------------------------------------------------------------

def _plain(value):
    """JSON-ready form of an info value (numpy scalars and arrays become Python numbers and lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def provenance(atoms: Atoms) -> dict:
    """The provenance entries (``PROVENANCE_KEYS``) present in ``atoms.info``, as plain data."""
    return {k: _plain(atoms.info[k]) for k in PROVENANCE_KEYS if k in atoms.info}


def frame_key(atoms: Atoms) -> str:
    """A stable 20-hex-digit key: SHA-256 of numbers, positions, cell, pbc (exact bytes) and provenance."""
    h = hashlib.sha256(b"ltau-label-key-v1\0")
    h.update(np.ascontiguousarray(atoms.numbers, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(atoms.positions, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(atoms.pbc, dtype="u1").tobytes())
    h.update(json.dumps(provenance(atoms), sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _bare(atoms: Atoms) -> Atoms:
    """A copy without calculator and without entries named like the reference's results."""
    bare = atoms.copy()  # Atoms.copy drops the calculator
    for name in RESULT_NAMES:
        bare.info.pop(name, None)
        if name in bare.arrays:
            del bare.arrays[name]
    return bare


def _extxyz_value(value) -> bool:
    """Whether ASE's extxyz writer stores this info value (and reads it back)."""
    if isinstance(value, (bool, np.bool_, str, int, float, np.integer, np.floating)):
        return True
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        return arr.ndim in (1, 2) and arr.size > 0 and arr.dtype.kind in "biufU"
    return False


# --- the worker -----------------------------------------------------------------------------------

_LOCAL = threading.local()  # this worker thread's calculators, by spec


def _calculator(spec: dict):
    cache = _LOCAL.__dict__.setdefault("calculators", {})
    tag = json.dumps(spec, sort_keys=True)
    if tag not in cache:
        cache[tag] = make_calculator(spec)
    return cache[tag], tag


def label_worker(atoms: Atoms, spec: dict, attempt: int = 1) -> dict:
    """Label one frame with the reference of ``spec`` (``ReferenceCalculator.to_dict()``); runs in a worker.

    Returns plain data: ``{"ok": True, "energy", "forces" (n, 3), "stress" (6,) or None, "seconds",
    "host", "pid", "attempt"}``, or ``{"ok": False, "error", "traceback", ...}`` when building the
    calculator or the calculation raised, or its results are not finite or of the wrong shape.
    Stress is computed for cells periodic in all directions whose calculator implements it.
    """
    start = time.perf_counter()
    where = {"host": socket.gethostname(), "pid": os.getpid(), "attempt": attempt}
    tag = None
    try:
        calc, tag = _calculator(spec)
        atoms = _bare(atoms)
        atoms.calc = calc
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(), dtype=np.float64)
        stress = None
        implemented = getattr(calc, "implemented_properties", ("stress",))
        if atoms.pbc.all() and "stress" in implemented:
            stress = np.array(atoms.get_stress(voigt=True), dtype=np.float64)
        if forces.shape != (len(atoms), 3):
            raise ValueError(f"forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
        if stress is not None and stress.shape != (6,):
            raise ValueError(f"stress has shape {stress.shape}, expected Voigt (6,)")
        if not (np.isfinite(energy) and np.isfinite(forces).all()
                and (stress is None or np.isfinite(stress).all())):
            raise ValueError("the reference returned non-finite energy, forces or stress")
    except Exception as exc:
        if tag is not None:  # a calculator that failed may be left in a bad state: build a new one next time
            _LOCAL.calculators.pop(tag, None)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - start, **where}
    finally:
        atoms.calc = None
    return {"ok": True, "energy": energy, "forces": forces, "stress": stress,
            "seconds": time.perf_counter() - start, **where}


# --- executors ------------------------------------------------------------------------------------

class InProcessExecutor(Executor):
    """Runs each task at submit, in this process (``max_workers=1``: for debugging)."""

    def __init__(self):
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: B036 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._shutdown = True


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_executor(max_workers: int | None = None) -> Executor:
    """``max_workers`` spawned processes (default: the CPUs this process may use); 1: in this process."""
    n = available_cpus() if max_workers is None else int(max_workers)
    if n < 1:
        raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
    if n == 1:
        return InProcessExecutor()
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))


class DaskExecutor(Executor):
    """``client.get_executor(pure=False)`` that also closes the client (and the cluster it started) at shutdown."""

    def __init__(self, client, cluster=None):
        self.client = client
        self.cluster = cluster  # closed at shutdown: only a cluster dask_executor started itself
        self._executor = client.get_executor(pure=False)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait=True, *, cancel_futures=False):
        try:
            self._executor.shutdown(wait=wait and not cancel_futures)
        finally:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()


def dask_executor(address=None, n_workers: int | None = None, threads_per_worker: int = 1,
                  processes: bool = True, **cluster_kwargs) -> DaskExecutor:
    """A ``concurrent.futures`` executor on dask.distributed (``Client(...).get_executor()``).

    ``address``: a scheduler address (``"tcp://host:8786"``) or a cluster object (dask-jobqueue's
    ``SLURMCluster`` / ``PBSCluster``, ...); None or "" starts a ``LocalCluster`` with ``n_workers``
    (default: the CPUs available), ``threads_per_worker`` and ``processes`` (False: threads of this
    process) plus ``cluster_kwargs`` (its dashboard is off unless ``dashboard_address`` is given).
    Shut it down (``with dask_executor() as ex: ...``) to close the client and the LocalCluster.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ConfigError('the dask executor needs dask.distributed: pip install "ltau_lmp[dask]" '
                          f"(or pip install distributed); {exc}") from None
    if address is None or address == "":
        cluster_kwargs.setdefault("dashboard_address", None)
        cluster = LocalCluster(n_workers=n_workers or available_cpus(), threads_per_worker=threads_per_worker,
                               processes=processes, **cluster_kwargs)
        try:
            return DaskExecutor(Client(cluster), cluster)
        except BaseException:
            cluster.close()
            raise
    if n_workers is not None or cluster_kwargs:
        raise ConfigError("dask_executor: n_workers and cluster options apply to a LocalCluster only "
                          "(address given: size the cluster where it is made)")
    return DaskExecutor(Client(address))


# --- records on disk ------------------------------------------------------------------------------

@dataclass
class LabelFailure:
    """A frame whose every attempt failed (committed with status "failed")."""

    key: str
    provenance: dict
    attempts: int
    error: str          # the last attempt's error
    traceback: str      # the last attempt's traceback
    new: bool = True    # failed in this call (False: recorded by an earlier call, not retried)


@dataclass
class LabelReport:
    """What ``label_frames`` did. ``keys``: one per input frame, in input order."""

    out_dir: Path
    keys: list[str]
    labelled: list[str] = field(default_factory=list)   # labelled by this call, in completion order
    reused: list[str] = field(default_factory=list)     # labelled by an earlier call
    failed: list[LabelFailure] = field(default_factory=list)  # every failed key of these frames
    attempts: int = 0                                   # calculations submitted by this call
    seconds: float = 0.0                                # wall time of this call

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        new_failed = sum(f.new for f in self.failed)
        return (f"{len(set(self.keys))} frames: {len(self.labelled)} labelled, {len(self.reused)} already labelled, "
                f"{len(self.failed)} failed ({new_failed} new); {self.attempts} calculations in {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "keys": self.keys, "labelled": self.labelled, "reused": self.reused,
                "failed": [vars(f) for f in self.failed], "attempts": self.attempts, "seconds": self.seconds}


def _write_atomic(path: Path, write) -> None:
    """``write(fh)`` into a temporary sibling, flushed to disk, renamed to ``path``."""
    with replaced_file(path) as tmp:
        with open(tmp, "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())


def _read_record(labels: Path, key: str) -> dict | None:
    """The committed record of ``key``, or None (absent, unreadable, or its labelled frame is missing)."""
    path = labels / f"{key}.json"
    try:
        record = json.loads(path.read_text())
        check_file_format(record, RECORD_FORMAT, RECORD_VERSION, path, "label record")
    except (OSError, ValueError, FileFormatError):
        return None
    if record.get("key") != key or record.get("status") not in ("labelled", "failed"):
        return None
    if not (labels / f"{key}.extxyz").is_file():
        return None
    return record


def read_records(out_dir) -> dict[str, dict]:
    """Every committed record under ``out_dir`` (labelled and failed), by key."""
    labels = Path(out_dir) / LABELS_DIR
    records = {}
    if labels.is_dir():
        for path in sorted(labels.glob("*.json")):
            if path.name.startswith("."):
                continue
            record = _read_record(labels, path.stem)
            if record is not None:
                records[path.stem] = record
    return records


@contextmanager
def _writer_lock(out_dir: Path):
    with open(out_dir / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LTAUError(f"{out_dir}: another label_frames call is writing here; wait for it or "
                            f"use another folder") from None
        except OSError:
            pass  # a file system without locks: one writer at a time is then the caller's promise
        try:
            yield
        finally:
            try:
                fcntl.flock(fh, fcntl.LOCK_UN)
            except OSError:
                pass


def _remove_temporaries(labels: Path) -> list[str]:
    """Remove what an interrupted writer left (``.NAME.XXXX`` siblings); under the writer lock."""
    removed = []
    for path in labels.iterdir():
        if path.name.startswith(".") and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _commit(labels: Path, key: str, frame: Atoms, spec: ReferenceCalculator, result: dict | None,
            errors: list[dict], attempts: int) -> dict:
    """Write the frame (labelled when ``result``), then its record: the commit point."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    out = _bare(frame)
    dropped = sorted(k for k, v in out.info.items() if not _extxyz_value(v))
    for k in dropped:
        del out.info[k]
    out.info["label_key"] = key
    if result is not None:
        results = {"energy": result["energy"], "free_energy": result["energy"], "forces": result["forces"]}
        if result["stress"] is not None:
            results["stress"] = result["stress"]
        out.calc = SinglePointCalculator(out, **results)
    _write_atomic(labels / f"{key}.extxyz", lambda fh: write(fh, out, format="extxyz"))
    last = result if result is not None else (errors[-1] if errors else {})
    record = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "key": key,
        "status": "labelled" if result is not None else "failed",
        "provenance": provenance(frame), "attempts": attempts,
        "seconds": float(sum(e.get("seconds", 0.0) for e in errors) + (result["seconds"] if result else 0.0)),
        "errors": errors, "reference": spec.to_dict(),
        "host": last.get("host"), "pid": last.get("pid"),
        "n_atoms": len(frame), "formula": frame.get_chemical_formula(),
        "info_dropped": dropped,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(labels / f"{key}.json", lambda fh: json.dump(record, fh, indent=1, default=_plain))
    return record


def _failure(record: dict, new: bool) -> LabelFailure:
    last = record["errors"][-1] if record.get("errors") else {}
    return LabelFailure(record["key"], record.get("provenance", {}), record.get("attempts", 0),
                        last.get("error", "?"), last.get("traceback", ""), new)


# --- the stage ------------------------------------------------------------------------------------

def label_frames(frames: Iterable[Atoms], spec, out_dir, executor: Executor | None = None, retries: int = 2,
                 progress: bool = True, *, max_workers: int | None = None,
                 retry_failed: bool = False) -> LabelReport:
    """Label every frame not yet labelled under ``out_dir`` with the reference ``spec``; see the module doc.

    ``spec``: a ``ReferenceCalculator`` or ``{"calculator": PATH, "kwargs": {...}}``.  ``executor``:
    any ``concurrent.futures.Executor`` (kept open); None: ``local_executor(max_workers)`` (shut down
    at the end).  ``retries``: further attempts of a failed calculation.  ``retry_failed``: also
    label again the frames an earlier call recorded as failed.  ``progress``: a tqdm bar.
    Frames with the same key (identical frame and provenance) are labelled once.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    spec = ReferenceCalculator.from_config(spec)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries must be an integer >= 0, got {retries!r}")
    frames = list(frames)
    for i, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            raise ConfigError(f"frame {i} is a {type(atoms).__name__}, not an ase.Atoms")
    keys = [frame_key(a) for a in frames]
    by_key = dict(zip(keys, frames))
    report = LabelReport(Path(out_dir), keys)
    out = Path(out_dir)
    labels = out / LABELS_DIR
    labels.mkdir(parents=True, exist_ok=True)
    wanted = spec.to_dict()

    with _writer_lock(out):
        _remove_temporaries(labels)
        todo = []
        for key in by_key:
            record = _read_record(labels, key)
            if record is not None and record.get("reference") != wanted:
                raise ConfigError(f"{labels}: {key} was labelled with the reference {record.get('reference')}, "
                                  f"this call asks for {wanted}; one folder holds labels of one reference "
                                  f"(choose another out_dir)")
            if record is None or (record["status"] == "failed" and retry_failed):
                todo.append(key)
            elif record["status"] == "labelled":
                report.reused.append(key)
            else:
                report.failed.append(_failure(record, new=False))
        if todo:
            make_calculator(spec)  # a bad import path or bad kwargs: one clear error before any work
            _run(todo, by_key, spec, labels, executor, retries, max_workers, report,
                 tqdm(total=len(todo), desc="label", unit="frame", disable=not progress, leave=False))
    report.seconds = time.perf_counter() - start
    return report


def _run(todo, by_key, spec, labels, executor, retries, max_workers, report, bar) -> None:
    """Submit, collect, retry and commit; see the module doc.

    Tasks are submitted as workers free up only for an in-process executor (one at a time, so each
    result is committed before the next calculation starts); any other executor gets them all.
    When the default process pool breaks (a worker died: segfault, out of memory) every frame in
    flight fails with it: the pool is rebuilt and those frames run again one at a time, so that
    only a frame that kills a worker while running alone is charged an attempt.
    """
    own = executor is None
    n_workers = min(max_workers or available_cpus(), len(todo))
    if own:
        executor = local_executor(n_workers)
    spec_dict = spec.to_dict()
    attempts = dict.fromkeys(todo, 0)
    errors = {k: [] for k in todo}
    queue = deque(todo)
    pending: dict[Future, tuple[str, Executor]] = {}
    isolate: set[str] = set()       # in flight when the pool broke: run alone until they finish
    broken: dict[Executor, int] = {}  # a broken pool -> the frames it had in flight

    def fill():
        while queue:
            one_at_a_time = isolate or isinstance(executor, InProcessExecutor)
            if one_at_a_time and pending:
                return
            key = queue.popleft()
            attempts[key] += 1
            report.attempts += 1
            future = executor.submit(label_worker, _bare(by_key[key]), spec_dict, attempts[key])
            pending[future] = (key, executor)

    def finish(key, result):
        isolate.discard(key)
        record = _commit(labels, key, by_key[key], spec, result, errors[key], attempts[key])
        if result is None:
            report.failed.append(_failure(record, new=True))
        else:
            report.labelled.append(key)
        bar.update()

    clean = False
    try:
        fill()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                key, used = pending.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # the executor's own failure: a worker that died, a lost task
                    result = {"ok": False, "error": f"{type(exc).__name__} (executor): {exc}",
                              "traceback": "".join(traceback.format_exception(exc)), "seconds": 0.0,
                              "host": None, "pid": None, "attempt": attempts[key]}
                    if own and isinstance(exc, BrokenProcessPool):
                        if used not in broken:
                            broken[used] = 1 + sum(u is used for _, u in pending.values())
                        if used is executor:
                            executor.shutdown(wait=False, cancel_futures=True)
                            executor = local_executor(n_workers)
                        if broken[used] > 1:  # not attributable: run it again, alone, uncharged
                            attempts[key] -= 1
                            report.attempts -= 1
                            isolate.add(key)
                            queue.appendleft(key)
                            continue
                if result["ok"]:
                    finish(key, result)
                    continue
                errors[key].append({k: result.get(k) for k in ("attempt", "error", "traceback", "seconds",
                                                                 "host", "pid")})
                if attempts[key] <= retries:
                    queue.appendleft(key)
                else:
                    finish(key, None)
                bar.set_postfix(failed=len(report.failed), retried=report.attempts - len(todo), refresh=False)
            fill()
        clean = True
    finally:
        bar.close()
        if own:
            executor.shutdown(wait=clean, cancel_futures=True)


def _sort_value(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, 0, str(value))
    return (0, value, "")


def collect_labels(out_dir, keys: Iterable[str] | None = None) -> list[Atoms]:
    """The labelled frames under ``out_dir``: ASE ``Atoms`` with energy, forces (and stress) as results.

    ``info`` holds the frame's own entries, its provenance and ``label_key``.  Without ``keys``: every
    labelled frame, ordered by provenance (round, protocol, step, source) then key; with ``keys``
    (``LabelReport.keys``): those, in that order (repeats once), failed ones left out, and an
    ``LTAUError`` for a key that has no record (not labelled yet).
    """
    from ase.io import read

    labels = Path(out_dir) / LABELS_DIR
    if keys is None:
        records = [r for r in read_records(out_dir).values() if r["status"] == "labelled"]
        records.sort(key=lambda r: (*(_sort_value(r["provenance"].get(k, "")) for k in PROVENANCE_KEYS), r["key"]))
    else:
        records = []
        for key in dict.fromkeys(keys):
            record = _read_record(labels, key)
            if record is None:
                raise LTAUError(f"{labels}: no label for {key} (not labelled yet: run label_frames)")
            if record["status"] == "labelled":
                records.append(record)
    frames = []
    for record in records:
        atoms = read(labels / f"{record['key']}.extxyz", format="extxyz")
        atoms.info.update(record["provenance"])
        atoms.info["label_key"] = record["key"]
        frames.append(atoms)
    return frames
