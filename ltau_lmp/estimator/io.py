"""Estimator file format: a directory, no pickle.

    meta.json       format name, version, shapes, index kind + options, k, weighting,
                    user metadata (model hash, units), pdf_table {"masses": "counts" | "quantised"},
                    sha256 of every array file
    pdf_indptr.npy, pdf_columns.npy, pdf_blocks.npy, pdf_totals.npy
                    the per-entry error PDFs as integer masses in blocks of 8 bins
                    (``pdf_table.PDFTable``: 4.6x smaller than dense float32 on the demo)
    bin_edges.npy   (nbins + 1,) float64
    index.faiss     the CPU faiss index (``faiss.write_index``)
    reference_distances.npy   (n_reference,) float64, sorted: kNN distances of held-out in-domain
                    atoms (optional; with meta.json ``alarm_thresholds``, see ``calibration``).
                    Estimators without it still load; they give no ``ood`` score.

Version 1 (before the table) had pdfs.npy, (n_entries, nbins) float32, instead of the pdf_*.npy
files; it still loads, into a ``DensePDFTable``: memory-mapped as before (converting it at every
load on every rank would cost a pass over the dense file and private memory per rank) and
answering exactly as before. Saving such an estimator writes version 2.

Loading validates everything it can and names the file and the problem; arrays are
memory-mapped so MPI ranks on one node share their pages. ``LTAUEstimator.save`` / ``load`` call
``save_estimator`` / ``load_estimator``; this module reads the estimator's attributes and is
handed its class, so it never imports the estimator (faiss is imported on first use).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ltau_lmp.errors import ConfigError, FileFormatError, check_file_format
from ltau_lmp.estimator.index import INDEX_KINDS, SearchIndex, require_faiss
from ltau_lmp.estimator.pdf_table import CHECK_SAMPLE, DensePDFTable, PDFTable
from ltau_lmp.outputs import output_dir

ESTIMATOR_FORMAT = "ltau-estimator"
ESTIMATOR_VERSION = 2
READABLE_VERSIONS = (1, 2)
FILES = {"bin_edges": "bin_edges.npy", "index": "index.faiss"}
TABLE_FILES = {f"pdf_{name}": f"pdf_{name}.npy" for name in ("indptr", "columns", "blocks", "totals")}
DENSE_FILE = {"pdfs": "pdfs.npy"}  # version 1
REFERENCE_FILE = {"reference_distances": "reference_distances.npy"}  # only in calibrated estimators


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def save_estimator(est, path, overwrite: bool = False) -> Path:
    """Write ``est`` (an ``LTAUEstimator``) into a temporary sibling directory, then rename: never a
    half-written estimator.

    An existing ``path`` is replaced only when it is an earlier estimator and ``overwrite`` is
    given; anything else is refused (``ltau_lmp.outputs``).
    """
    faiss = require_faiss()
    path = Path(path)
    table = est.pdfs if isinstance(est.pdfs, PDFTable) else est.pdfs.to_table()  # version 1 loaded: compress
    with output_dir(path, "estimator", overwrite) as tmp:
        for name, array in table.arrays().items():
            np.save(tmp / TABLE_FILES[f"pdf_{name}"], array)
        np.save(tmp / FILES["bin_edges"], est.bin_edges)
        faiss.write_index(est.index.cpu_index, str(tmp / FILES["index"]))
        files = {**TABLE_FILES, **FILES}
        if est.has_ood_reference:
            files.update(REFERENCE_FILE)
            np.save(tmp / REFERENCE_FILE["reference_distances"], est.reference_distances)
        meta = {
            "format": ESTIMATOR_FORMAT, "version": ESTIMATOR_VERSION,
            "n_entries": est.n_entries, "dim": est.dim, "nbins": est.nbins,
            "index": {"kind": est.index.kind, "options": est.index.options},
            "k": est.k, "weighting": est.weighting, "metadata": est.metadata,
            "alarm_thresholds": est.alarm_thresholds, "pdf_table": {"masses": table.source},
            "files": files, "sha256": {key: sha256_file(tmp / name) for key, name in files.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def read_meta(path: Path) -> dict:
    """meta.json, checked for format and version."""
    meta_file = path / "meta.json"
    if path.is_file():
        raise FileFormatError(f"{path} is a file, not an estimator directory{_model_file_hint(path)}")
    if not path.is_dir():
        raise FileFormatError(f"{path}: estimator directory not found")
    if not meta_file.is_file():
        raise FileFormatError(f"{meta_file}: missing (is {path} an ltau estimator directory?)")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{meta_file}: not valid JSON ({exc})") from None
    check_file_format(meta, ESTIMATOR_FORMAT, READABLE_VERSIONS, meta_file, "estimator")
    required = ("n_entries", "dim", "nbins", "index", "k", "weighting", "metadata", "sha256")
    required += ("pdf_table",) if meta["version"] >= 2 else ()
    missing = [key for key in required if key not in meta]
    if missing:
        raise FileFormatError(f"{meta_file}: missing field(s) {', '.join(missing)}")
    if meta["index"].get("kind") not in INDEX_KINDS:
        raise FileFormatError(f"{meta_file}: unknown index kind {meta['index'].get('kind')!r}")
    return meta


def _model_file_hint(path: Path) -> str:
    """What to say when a model file is given where an estimator belongs (the two are easily swapped)."""
    from ltau_lmp.model.io import detect_family

    try:
        detect_family(path)
    except FileFormatError:
        return ""
    return ": this is a model file; the estimator is a directory written by build-estimator/train"


def _load_array(file: Path, mmap: bool) -> np.ndarray:
    if not file.is_file():
        raise FileFormatError(f"{file}: missing")
    try:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # truncated headers, bad magic, short data: several exception types
        raise FileFormatError(f"{file}: unreadable or truncated ({type(exc).__name__}: {exc})") from None


def load_estimator(path, estimator_class, mmap: bool = True, verify: bool = True, use_gpu: bool | str = "auto",
                   gpu_device: int = 0):
    """Load and validate (``verify`` also checks every file's sha256 against meta.json); returns an
    ``estimator_class`` (``LTAUEstimator``) made from the files."""
    faiss = require_faiss()
    path = Path(path)
    meta = read_meta(path)
    calibrated = "reference_distances" in meta["sha256"]
    if calibrated != (meta.get("alarm_thresholds") is not None):
        raise FileFormatError(f"{path / 'meta.json'}: reference_distances and alarm_thresholds must be "
                              f"listed together")
    names = {**(DENSE_FILE if meta["version"] == 1 else TABLE_FILES), **FILES, **(REFERENCE_FILE if calibrated else {})}
    files = {key: path / name for key, name in names.items()}
    for key, file in files.items():
        if not file.is_file():
            raise FileFormatError(f"{file}: missing")
        if verify and sha256_file(file) != meta["sha256"].get(key):
            raise FileFormatError(f"{file}: checksum does not match meta.json (corrupted or replaced file)")
    n, nbins, dim = int(meta["n_entries"]), int(meta["nbins"]), int(meta["dim"])
    table = _load_dense(files["pdfs"], n, nbins, mmap) if meta["version"] == 1 else _load_table(files, meta, mmap)
    edges = _load_array(files["bin_edges"], mmap=False)
    if edges.dtype != np.float64 or edges.shape != (nbins + 1,):
        raise FileFormatError(f"{files['bin_edges']}: expected float64 ({nbins + 1},), got {edges.dtype} {edges.shape}")
    try:
        # In-place mmap (flat and HNSW vectors and graph): ranks of one node share the pages.
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
        index = faiss.read_index(str(files["index"]), flags)
    except RuntimeError as exc:
        raise FileFormatError(f"{files['index']}: not a readable faiss index ({str(exc).splitlines()[0]})") from None
    if index.d != dim or index.ntotal != n:
        raise FileFormatError(f"{files['index']}: index has {index.ntotal} vectors of dimension {index.d}, "
                              f"meta.json says {n} of dimension {dim}")
    reference = _load_array(files["reference_distances"], mmap=False) if calibrated else None
    rows = np.unique(np.linspace(0, n - 1, num=min(n, CHECK_SAMPLE)).astype(np.int64))
    try:
        table.check(rows, where=str(files["pdfs"]) if meta["version"] == 1 else "PDF table (pdf_*.npy)")
        search_index = SearchIndex(meta["index"]["kind"], meta["index"]["options"], index)
        search_index.place(use_gpu, gpu_device)
        return estimator_class(search_index, table, edges, k=meta["k"], weighting=meta["weighting"],
                               metadata=meta["metadata"], reference_distances=reference,
                               alarm_thresholds=meta.get("alarm_thresholds"))
    except ConfigError as exc:
        raise FileFormatError(f"{path}: {exc}") from None


def _load_dense(file: Path, n: int, nbins: int, mmap: bool) -> DensePDFTable:
    """Version 1's pdfs.npy."""
    pdfs = _load_array(file, mmap)
    if pdfs.dtype != np.float32 or pdfs.shape != (n, nbins):
        raise FileFormatError(f"{file}: expected float32 {(n, nbins)}, got {pdfs.dtype} {pdfs.shape}")
    return DensePDFTable(pdfs)


def _load_table(files: dict, meta: dict, mmap: bool) -> PDFTable:
    """Version 2's pdf_*.npy; a structural problem names the directory and the array."""
    arrays = {key.removeprefix("pdf_"): _load_array(files[key], mmap) for key in TABLE_FILES}
    masses = meta["pdf_table"].get("masses") if isinstance(meta["pdf_table"], dict) else None
    try:
        table = PDFTable(**arrays, nbins=int(meta["nbins"]), source=masses)
    except ConfigError as exc:
        raise FileFormatError(f"{files['pdf_indptr'].parent}: {exc}") from None
    if table.n_entries != int(meta["n_entries"]):
        raise FileFormatError(f"{files['pdf_totals']}: {table.n_entries} rows, meta.json says {meta['n_entries']}")
    return table
