"""Safe writing of every output of the package: nothing a user has is replaced or lost.

The rule, for every writer (build-estimator, predict, train, generate, mace-train, replay, the
nequip callback, evaluate, select, the failure report):

* the output is written into a temporary sibling (``.NAME.XXXXXX``) and renamed into place at the
  end, so a crash or an interrupt never leaves a half-written output, and the temporary sibling is
  removed;
* an existing path is replaced only when it holds an earlier output of the same kind, written by
  this package, and only when asked (``--overwrite``, ``overwrite=True``);
* anything else is refused with one line naming the path and what to do, before the long work
  starts (``check_dir`` / ``check_file``) and again just before the rename.

A folder output carries a marker file (``MARKER``) naming its kind, the ltau_lmp version and every
file it holds, so a later run recognises an earlier output and sees files added to it by someone
else (then it refuses). Folders written before markers existed are recognised by their file names
(``LEGACY``; an estimator by its meta.json).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ltau_lmp.errors import LTAUError

MARKER = ".ltau-output.json"

# What each kind of output is called in messages.
LABELS = {
    "estimator": "LTAU estimator",
    "train": "`ltau-lmp train` output",
    "generate": "`ltau-lmp generate` data folder",
    "mace-train": "`ltau-lmp mace-train` output",
    "replay": "`ltau-lmp replay` output",
    "nequip": "LTAUCallback (nequip) output",
    "evaluate": "`ltau-lmp evaluate` output",
    "diagnose": "`ltau-lmp diagnose` output",
    "failure": "failure report",
    "predict": "`ltau-lmp predict` output",
    "select": "`ltau-lmp select` output",
}

_ESTIMATOR_FILES = ("meta.json", "pdfs.npy", "pdf_*.npy", "bin_edges.npy", "index.faiss", "reference_distances.npy")
_LTAU_FILES = ("error_log.npz", "descriptors.npy", "reference_descriptors.npy", "train_set.xyz",
               "reference_set.xyz", "summary.json", "model.ckpt", "estimator/*")


def _estimator_meta(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("format") == "ltau-estimator"
    except (OSError, ValueError, AttributeError):
        return False


# Folders written before markers existed: (file-name patterns, a test of the folder).
LEGACY: dict[str, tuple[tuple[str, ...], Callable[[Path], bool]]] = {
    "estimator": (_ESTIMATOR_FILES, _estimator_meta),
    "train": (("model.pt", "error_log.npz", "descriptors.npy", "reference_descriptors.npy", "metrics.csv",
               "summary.json", "estimator/*"), lambda p: (p / "summary.json").is_file()),
    "generate": (("generate.yaml", "*.xyz"), lambda p: (p / "generate.yaml").is_file()),
    "mace-train": (_LTAU_FILES, lambda p: (p / "summary.json").is_file()),
    "replay": (_LTAU_FILES, lambda p: (p / "summary.json").is_file()),
    "nequip": (_LTAU_FILES, lambda p: (p / "error_log.npz").is_file()),
    "evaluate": (("metrics.json", "table.md", "*.png"), lambda p: (p / "metrics.json").is_file()),
    "failure": (("failure.json", "*.png"), lambda p: (p / "failure.json").is_file()),
}


class OutputExistsError(LTAUError):
    """An output path is taken by something this run may not replace."""


def _label(kind: str) -> str:
    return LABELS.get(kind, kind)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _files(directory: Path) -> Iterator[str]:
    """Relative paths (posix) of every file and link under ``directory`` (links are not followed)."""
    for dirpath, dirnames, filenames in os.walk(directory):
        rel = Path(dirpath).relative_to(directory)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield (rel / name).as_posix()


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def _recognised_kind(directory: Path, kind: str) -> str | None:
    """The kind of output ``directory`` holds: its marker's, ``kind`` for a matching folder written
    before markers existed, else None (not recognisably the package's)."""
    marker = _read_marker(directory)
    if marker is not None:
        return str(marker.get("kind"))
    legacy = LEGACY.get(kind)
    if legacy is not None and legacy[1](directory) and not _foreign(directory, kind):
        return kind
    return None


def _foreign(directory: Path, kind: str) -> list[str]:
    """Files under ``directory`` that no marker (or, without one, ``kind``'s legacy names) lists."""
    marker = _read_marker(directory)
    if marker is not None:
        listed = set(marker["files"]) | {MARKER}
        return [f for f in _files(directory) if f not in listed and not _listed_below(directory, f)]
    patterns = LEGACY.get(kind, ((), None))[0]
    return [f for f in _files(directory)
            if not any(fnmatch.fnmatchcase(f, p) for p in patterns) and not _listed_below(directory, f)]


def written_files(directory, kind: str) -> set[str]:
    """Relative paths of the files under ``directory`` that this package wrote as a ``kind`` output."""
    directory = Path(directory)
    foreign = set(_foreign(directory, kind))
    return {f for f in _files(directory) if f not in foreign}


def _listed_below(directory: Path, rel: str) -> bool:
    """Whether a sub-folder's own marker lists ``rel`` (an output written into another one, e.g. an
    estimator rebuilt inside a training output)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        marker = _read_marker(directory.joinpath(*parts[:i]))
        if marker is not None and "/".join(parts[i:]) in set(marker["files"]) | {MARKER}:
            return True
    return False


def _check_parent(path: Path) -> None:
    """The folder that will hold ``path`` must be a folder (or creatable)."""
    if path.name in ("", ".", ".."):
        raise OutputExistsError(f"{path}: give the output a name of its own (e.g. {path / 'out'})")
    for parent in path.absolute().parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputExistsError(f"{path}: cannot be created, {parent} is a file; choose another path")
            return


def _summary(names: list[str], limit: int = 3) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def is_earlier_output(path, kind: str) -> bool:
    """Whether ``path`` is a non-empty folder holding an earlier output of ``kind`` by this package."""
    path = Path(path)
    return (path.is_dir() and not path.is_symlink() and any(path.iterdir())
            and _recognised_kind(path, kind) == kind)


def check_dir(path, kind: str, overwrite: bool = False) -> Path:
    """Refuse (``OutputExistsError``) unless a new ``kind`` folder may be written at ``path``.

    Allowed: nothing there, an empty folder, or (with ``overwrite``) an earlier output of the same
    kind holding only files the package wrote. Call it before the long work starts.
    """
    path = Path(path)
    label = _label(kind)
    _check_parent(path)
    if not os.path.lexists(path):
        return path
    if path.is_symlink():
        raise OutputExistsError(f"{path}: is a symbolic link, not an earlier {label}; choose another path "
                                f"(nothing was changed)")
    if not path.is_dir():
        raise OutputExistsError(f"{path}: is a file, not an earlier {label}; choose another path "
                                f"(nothing was changed)")
    if not any(path.iterdir()):
        return path
    found = _recognised_kind(path, kind)
    if found is None:
        raise OutputExistsError(f"{path}: the folder exists and was not written by ltau_lmp as a {label}; "
                                f"choose another path (nothing was changed)")
    if found != kind:
        raise OutputExistsError(f"{path}: holds a {_label(found)}, not a {label}; choose another path "
                                f"(nothing was changed)")
    foreign = _foreign(path, kind)
    if foreign:
        raise OutputExistsError(f"{path}: holds an earlier {label} and files ltau_lmp did not write "
                                f"({_summary(foreign)}); move them away or choose another path (nothing was changed)")
    if not overwrite:
        raise OutputExistsError(f"{path}: holds an earlier {label}; give --overwrite (Python: overwrite=True) "
                                f"to replace it, or choose another path")
    return path


def record_files(directory: Path, kind: str, added: list[str] | None = None) -> None:
    """Write the marker of ``directory``: its kind, the package version and the files it wrote (every
    file in it, or, with ``added``, those it wrote before plus ``added``: files someone else put
    there stay unlisted)."""
    from ltau_lmp import __version__

    if added is None:
        files = {f for f in _files(directory) if f != MARKER}
    else:
        files = (written_files(directory, kind) - {MARKER}) | set(added)
    marker = {"kind": kind, "ltau_lmp_version": __version__, "files": sorted(files)}
    with replaced_file(directory / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=1) + "\n")


@contextmanager
def output_dir(path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write the ``kind`` output into; on success it is marked
    (``record_files``) and renamed to ``path`` (replacing an earlier output, see ``check_dir``); on an
    exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    check_dir(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would differ from a plain mkdir
        yield tmp
        record_files(tmp, kind)
        _swap_in(tmp, path, kind, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path, kind: str, overwrite: bool) -> None:
    check_dir(path, kind, overwrite)  # again: the path may have changed during the work
    if path.is_dir() and any(path.iterdir()):
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)  # nothing there, or an empty folder (rename fails if it filled up meanwhile)


def check_file(path, kind: str, overwrite: bool = False, earlier: Callable[[Path], bool] | None = None) -> Path:
    """Refuse (``OutputExistsError``) unless a ``kind`` file may be written at ``path``: nothing
    there, or (with ``overwrite``) a file that ``earlier(path)`` recognises as an earlier output."""
    path = Path(path)
    label = _label(kind)
    _check_parent(path)
    if not os.path.lexists(path):
        return path
    if path.is_symlink() or not path.is_file():
        what = "a symbolic link" if path.is_symlink() else "a folder"
        raise OutputExistsError(f"{path}: is {what}, not an earlier {label}; choose another file name "
                                f"(nothing was changed)")
    if earlier is None or not earlier(path):
        raise OutputExistsError(f"{path}: the file exists and is not an earlier {label}; choose another "
                                f"file name (nothing was changed)")
    if not overwrite:
        raise OutputExistsError(f"{path}: holds an earlier {label}; give --overwrite (Python: overwrite=True) "
                                f"to replace it, or choose another file name")
    return path


@contextmanager
def replaced_file(path) -> Iterator[Path]:
    """Yield a temporary sibling (same suffix) to write into; renamed to ``path`` on success, removed
    on an exception. No check: for files of an output this run owns (``output_file`` checks)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def output_file(path, kind: str, overwrite: bool = False,
                earlier: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """``replaced_file`` for a single-file output, checked by ``check_file`` before and after the work."""
    path = Path(path)
    check_file(path, kind, overwrite, earlier)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_file(path) as tmp:
        yield tmp
        check_file(path, kind, overwrite, earlier)


def head_contains(text: str) -> Callable[[Path], bool]:
    """An ``earlier`` test: the file's first two lines (a header, an extxyz comment) contain ``text``."""
    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                head = fh.readline(4096) + fh.readline(4096)
        except OSError:
            return False
        return text.encode() in head

    return test
