"""Dataset diagnostics from the loss trajectories (``ltau-lmp diagnose``): the paper's third use of
the logged errors, tuning the model and its data.

Every training path keeps, per training atom, the histogram of its force error over the logged
epochs (``ErrorLog``). From it, per atom (LTAU-FF reference: ``utils.logs_to_uncertainties``):

* ``fraction_above``: the fraction of logged epochs with error >= the tolerance, i.e.
  1 - mean over epochs of [error < tol]. Exact when the tolerance is a bin edge; it is snapped to
  the nearest edge (log-spaced: 100 bins over 1e-3 - 10 eV/Å are 9.6 % apart) and the edge used is
  reported. A relative tolerance (``relative``) multiplies each atom's reference force norm.
* ``mean`` and ``spread``: mean and standard deviation of the error over the epochs, from the
  histogram (each error at its bin's geometric centre: within half a bin).

Per structure: the mean and max of its atoms' fractions and means. Dataset cartography
(Swayamdipta et al. 2020): mean error against its variability; "easy" atoms sit low, "ambiguous"
ones vary, "hard" ones stay high. Atoms above the tolerance at every logged epoch are
*persistently hard*; the structures holding them are listed as candidates for mislabelled data,
with their file and index.

The train-validation gap epoch by epoch comes from the per-epoch aggregates both logs keep
(``ErrorLog.epoch_stats``): the training errors of each epoch's steps (the weights move during the
epoch) against the validation errors at the epoch's end.

``structure_weights`` turns the per-structure score into loss weights (module function docstring
states the rule) that ``write_weighted`` writes as each structure's ``config_weight``: the key
MACE's data loader reads and the built-in trainer reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.errorlog import ErrorLog, epoch_curve

WEIGHT_KEY = "config_weight"  # MACE's default --config_weight_key; the built-in trainer's too
PERSISTENT = 1.0 - 1e-12       # an atom above the tolerance at every logged epoch


@dataclass
class AtomScores:
    """Per-atom scores of one error log (module docstring)."""

    fraction_above: np.ndarray   # (n,) in [0, 1]
    mean: np.ndarray             # (n,) eV/Å
    spread: np.ndarray           # (n,) eV/Å
    tolerance: np.ndarray        # (n,) eV/Å, the bin edge each atom's tolerance was snapped to
    epochs: np.ndarray           # (n,) logged errors per atom


def snap_to_edges(edges: np.ndarray, tolerance) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest bin edge in log scale, that edge) for each tolerance; edges 0 and the
    last are excluded (a tolerance there would count every error or none)."""
    tolerance = np.asarray(tolerance, dtype=np.float64)
    if np.any(~np.isfinite(tolerance)) or np.any(tolerance <= 0):
        raise ConfigError("tolerances must be positive and finite")
    inner = np.log(edges[1:-1])
    k = np.abs(np.log(tolerance)[..., None] - inner).argmin(axis=-1) + 1
    return k, edges[k]


def atom_scores(log: ErrorLog, tolerance) -> AtomScores:
    """Scores of every sample of ``log`` at ``tolerance`` (a number, or one per sample), eV/Å."""
    tolerance = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), (log.n_samples,))
    k, snapped = snap_to_edges(log.bin_edges, tolerance)
    counts = log.counts.astype(np.float64)
    totals = counts.sum(axis=1)
    if np.any(totals == 0):
        raise ConfigError(f"{int(np.count_nonzero(totals == 0))} atoms have no logged errors (did training run "
                          f"past skip_epochs = {log.skip_epochs}?)")
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]           # above[:, j] = errors in bins >= j
    fraction = above[np.arange(log.n_samples), k] / totals
    centres = np.sqrt(log.bin_edges[:-1] * log.bin_edges[1:])
    mean = counts @ centres / totals
    spread = np.sqrt(np.maximum(counts @ centres ** 2 / totals - mean ** 2, 0.0))
    return AtomScores(fraction, mean, spread, snapped, totals)


def structure_table(scores: AtomScores, sizes) -> dict[str, np.ndarray]:
    """Per-structure aggregates of the atoms' scores (structures of ``sizes`` atoms, in order)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() != len(scores.mean):
        raise ConfigError(f"the structures hold {sizes.sum()} atoms but the error log {len(scores.mean)}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    persistent = (scores.fraction_above >= PERSISTENT).astype(np.int64)

    def per(values, reduce):
        return reduce.reduceat(values, starts)

    return {"atoms": sizes, "mean_fraction_above": per(scores.fraction_above, np.add) / sizes,
            "max_fraction_above": per(scores.fraction_above, np.maximum),
            "mean_error": per(scores.mean, np.add) / sizes, "max_mean_error": per(scores.mean, np.maximum),
            "persistent_atoms": per(persistent, np.add)}


def hard_structures(table: dict[str, np.ndarray]) -> np.ndarray:
    """Structures holding persistently hard atoms, most such atoms first (then highest mean error)."""
    hard = np.flatnonzero(table["persistent_atoms"] > 0)
    order = np.lexsort((-table["mean_error"][hard], -table["persistent_atoms"][hard]))
    return hard[order]


def structure_weights(score: np.ndarray, max_ratio: float = 3.0) -> np.ndarray:
    """Loss weight per structure from its score in [0, 1] (``mean_fraction_above``: the share of its
    atoms' logged epochs above the tolerance): w = 1 + (max_ratio - 1) x score, then scaled to mean
    1 over the structures. The hardest structures weigh at most ``max_ratio`` times the easiest,
    and a data set without hard structures keeps weights of 1."""
    score = np.asarray(score, dtype=np.float64)
    if not max_ratio >= 1.0 or not np.isfinite(max_ratio):
        raise ConfigError(f"max_ratio must be >= 1, got {max_ratio}")
    if np.any((score < 0) | (score > 1)) or not np.all(np.isfinite(score)):
        raise ConfigError("structure scores must lie in [0, 1]")
    weights = 1.0 + (max_ratio - 1.0) * score
    return weights / weights.mean()


def gap_curve(train: ErrorLog, validation: ErrorLog | None) -> dict[str, list]:
    """Per epoch: training and validation mean / RMS force error and the RMS gap (None where an epoch
    has no validation)."""
    t = epoch_curve(train.epoch_stats)
    n_epochs = len(t["n"])

    def listed(values):  # JSON-ready: None where an epoch has no value
        values = np.concatenate([values, np.full(n_epochs - len(values), np.nan)])
        return [None if np.isnan(v) else float(v) for v in values]

    out = {"epoch": list(range(1, n_epochs + 1)), "train_mean": listed(t["mean"]), "train_rms": listed(t["rms"])}
    if validation is not None:
        v = epoch_curve(validation.epoch_stats[:n_epochs])
        out["validation_mean"], out["validation_rms"] = listed(v["mean"]), listed(v["rms"])
        out["gap_rms"] = listed(v["rms"] - t["rms"][:len(v["rms"])])
    return out


def reference_force_norms(frames) -> np.ndarray:
    """|F_ref| of every atom of ``frames`` (arrays REF_forces or forces, or the calculator's)."""
    norms = []
    for k, atoms in enumerate(frames):
        for key in ("REF_forces", "forces"):
            if key in atoms.arrays:
                forces = atoms.arrays[key]
                break
        else:
            if atoms.calc is None or "forces" not in atoms.calc.results:
                raise ConfigError(f"structure {k} has no reference forces: a relative tolerance needs them")
            forces = atoms.calc.results["forces"]
        norms.append(np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=1))
    return np.concatenate(norms)


def write_retraining_set(run, frames, sources, weights: np.ndarray, path) -> dict:
    """The file to retrain on, with the weights: when the run's structures were picked from one
    training file (the built-in trainer splits its file into training and validation structures),
    that whole file with the training structures' weights and 1 for the others, so that the same
    seed gives the same split; otherwise the run's training structures."""
    from pathlib import Path

    from ase.io import read

    files = {file for file, _ in sources}
    source = Path(next(iter(files))) if len(files) == 1 else None
    if source is not None and source.resolve() != (Path(run) / "train_set.xyz").resolve() and source.is_file():
        every = read(source, index=":")
        full = np.ones(len(every))
        full[[index for _, index in sources]] = weights
        write_weighted(every, full, path)
        return {"file": Path(path).name, "holds": f"all {len(every)} structures of {source} (those not trained on at 1)"}
    write_weighted(frames, weights, path)
    return {"file": Path(path).name, "holds": f"the run's {len(frames)} training structures"}


def write_weighted(frames, weights: np.ndarray, path) -> None:
    """The training structures as extxyz with each one's weight in ``info[WEIGHT_KEY]``."""
    from ase.io import write

    if len(weights) != len(frames):
        raise ConfigError(f"{len(weights)} weights for {len(frames)} structures")
    out = []
    for atoms, weight in zip(frames, weights):
        atoms = atoms.copy()
        atoms.calc = frames[len(out)].calc  # keep the labels ase keeps in the calculator
        atoms.info[WEIGHT_KEY] = float(weight)
        out.append(atoms)
    write(path, out, format="extxyz")


def training_frames(run, which: str = "train"):
    """The training (``which="train"``) or validation (``"reference"``) structures of a run folder,
    in error-log id order, with (file, index) of each: ``{which}_set.xyz`` when the run wrote it,
    else the estimator's provenance (the built-in trainer's ``train_file`` and structure indices)."""
    import json
    from pathlib import Path

    from ase.io import read

    run = Path(run)
    own = run / f"{which}_set.xyz"
    if own.is_file():
        frames = read(own, index=":")
        return frames, [(str(own), k) for k in range(len(frames))]
    meta_file = run / "estimator" / "meta.json"
    meta = json.loads(meta_file.read_text()).get("metadata", {}) if meta_file.is_file() else {}
    source = meta.get("val_file", meta.get("train_file")) if which == "reference" else meta.get("train_file")
    indices = meta.get(f"{which}_structures")
    if source is None or indices is None:
        if which == "reference":
            return [], []
        raise ConfigError(f"{run}: no {which}_set.xyz and no training file in the estimator's metadata: cannot tell "
                          f"which structures the error log's atoms belong to")
    source_path = Path(source) if Path(source).is_absolute() else run / source
    if not source_path.is_file():
        source_path = Path(source)
    if not source_path.is_file():
        raise ConfigError(f"{run}: the training file {source} named in the estimator's metadata is not there")
    every = read(source_path, index=":")
    return [every[k] for k in indices], [(str(source), int(k)) for k in indices]


def diagnose(run, tolerance: float | None = 0.1, relative: float | None = None, max_ratio: float = 3.0,
             weights_out=None) -> dict:
    """Scores of a run folder's error logs (module docstring): a JSON-ready report with per-atom
    and per-structure arrays under "atoms", "structures", "validation_atoms" (not in the JSON file)."""
    from pathlib import Path

    run = Path(run)
    log = ErrorLog.load(run / "error_log.npz")
    frames, sources = training_frames(run, "train")
    sizes = [len(atoms) for atoms in frames]
    if sum(sizes) != log.n_samples:
        raise ConfigError(f"{run}: the training structures hold {sum(sizes)} atoms but the error log {log.n_samples}")
    if (tolerance is None) == (relative is None):
        raise ConfigError("give an absolute tolerance or a relative one, not both")
    tol = tolerance if relative is None else relative * reference_force_norms(frames)
    scores = atom_scores(log, tol)
    table = structure_table(scores, sizes)
    weights = structure_weights(table["mean_fraction_above"], max_ratio)
    validation = None
    val_path = run / "validation_error_log.npz"
    if val_path.is_file():
        validation = ErrorLog.load(val_path)
    report = {
        "run": str(run), "tolerance": {"absolute": tolerance, "relative": relative,
                                       "snapped_edges": sorted({float(v) for v in np.unique(scores.tolerance)[:5]})},
        "epochs_logged": int(log.epoch), "skip_epochs": log.skip_epochs,
        "atoms": int(log.n_samples), "structures": len(frames),
        "fraction_above": _stats(scores.fraction_above),
        "persistently_hard_atoms": int(np.count_nonzero(scores.fraction_above >= PERSISTENT)),
        "never_above_atoms": int(np.count_nonzero(scores.fraction_above == 0)),
        "gap": gap_curve(log, validation),
        "hard_structures": [{"file": sources[k][0], "index": sources[k][1], "structure": int(k),
                             "atoms": int(table["atoms"][k]), "persistent_atoms": int(table["persistent_atoms"][k]),
                             "mean_fraction_above": float(table["mean_fraction_above"][k]),
                             "mean_error": float(table["mean_error"][k])} for k in hard_structures(table)],
        "weights": {"rule": f"w = 1 + ({max_ratio:g} - 1) x mean fraction above, scaled to mean 1",
                    "min": float(weights.min()), "max": float(weights.max())},
    }
    if validation is not None and validation.counts.sum():
        val_frames, _ = training_frames(run, "reference")
        val_tol = tolerance if relative is None else relative * reference_force_norms(val_frames)
        val_scores = atom_scores(validation, val_tol)
        report["validation"] = {"atoms": int(validation.n_samples), "fraction_above": _stats(val_scores.fraction_above),
                                "mean_error": _stats(val_scores.mean)}
        report["validation_atoms"] = val_scores
    if weights_out is not None:
        report["weights"].update(write_retraining_set(run, frames, sources, weights, weights_out))
    report["atom_scores"], report["structure_table"], report["structure_weights"] = scores, table, weights
    report["sources"] = sources
    return report


def _stats(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p95": float(np.quantile(values, 0.95)),
            "max": float(values.max())}


ARRAY_KEYS = ("atom_scores", "structure_table", "structure_weights", "sources", "validation_atoms")


def write_report(report: dict, out) -> dict:
    """diagnose.json (the report without its arrays), atoms.csv, structures.csv, cartography.png,
    gap.png into the folder ``out``; returns the figures written."""
    import csv
    import json
    from pathlib import Path

    from ltau_lmp.evaluation.plots import plot_cartography, plot_gap

    out = Path(out)
    scores, table = report["atom_scores"], report["structure_table"]
    structure_of = np.repeat(np.arange(len(table["atoms"])), table["atoms"])
    with open(out / "atoms.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["atom", "structure", "fraction_above", "mean_error", "spread", "tolerance", "epochs"])
        for k in range(len(scores.mean)):
            writer.writerow([k, int(structure_of[k]), f"{scores.fraction_above[k]:.6g}", f"{scores.mean[k]:.6g}",
                             f"{scores.spread[k]:.6g}", f"{scores.tolerance[k]:.6g}", int(scores.epochs[k])])
    with open(out / "structures.csv", "w", newline="") as f:
        writer = csv.writer(f)
        columns = list(table)
        writer.writerow(["structure", "file", "index", *columns, "weight"])
        for k in range(len(table["atoms"])):
            file, index = report["sources"][k]
            writer.writerow([k, file, index, *(f"{table[c][k]:.6g}" for c in columns),
                             f"{report['structure_weights'][k]:.6g}"])
    figures = {"cartography": plot_cartography(scores.mean, scores.spread, scores.fraction_above,
                                               float(np.median(scores.tolerance)), out / "cartography.png")}
    if report["gap"]["epoch"]:
        figures["gap"] = plot_gap(report["gap"], out / "gap.png")
    plain = {k: v for k, v in report.items() if k not in ARRAY_KEYS}
    (out / "diagnose.json").write_text(json.dumps({**plain, "figures": figures}, indent=1, default=_json_float))
    return figures


def _json_float(value):
    return float(value)
