"""Force-field training that records every training atom's force error every epoch (LTAU).

The per-atom errors come from the forward pass that computes the loss (detached, no extra
model call), so logging costs only a norm and a histogram update per batch.  Atoms are keyed by
their global id in the training set, so shuffling and batching do not matter.  After training,
the final model's latent features of all training atoms and the error log make the estimator;
the validation atoms, held out of it, calibrate its out-of-domain p-value and alarm thresholds
(``ltau_lmp.pipeline``: ``ErrorLogger`` during training, ``write_artefacts`` after it, as for
every other trainer).

The validation atoms get an error log of their own (``validation_error_log.npz``): every epoch's
validation pass logs their ‖F_pred − F_ref‖ (ids: positions of the atoms in the validation frames
in order, i.e. in reference_set.xyz), with the training log's bin edges and skipped epochs, one
``end_epoch`` per training epoch, so the two logs' ``epoch_stats`` line up epoch by epoch.

Per-structure loss weights (``data.config_weight_key``, default ``config_weight``, the extxyz info
key MACE reads): see ``batch_loss``.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ltau_lmp.data.datasets import AtomsDataset, read_frames
from ltau_lmp.errors import ConfigError, FileFormatError, LTAUError
from ltau_lmp.estimator import ErrorLog
from ltau_lmp.pipeline import ErrorLogger, write_artefacts
from ltau_lmp.prediction import predict_batch
from ltau_lmp.training.config import TrainConfig, resolve

METRIC_FIELDS = [
    "epoch", "lr", "train_loss", "train_energy_rmse", "train_force_rmse",
    "val_loss", "val_energy_rmse", "val_force_rmse", "train_seconds", "val_seconds", "log_seconds",
    "train_force_error_mean", "val_force_error_mean",  # mean per-atom ‖F_pred − F_ref‖ (the logged error)
]


@dataclass
class TrainResult:
    model: torch.nn.Module
    error_log: object
    estimator: object
    metrics: list[dict]
    summary: dict
    out_dir: Path
    validation_log: object = None  # ErrorLog of the validation atoms (None without validation)


class _Sums:
    """Running error sums of an epoch (squared energies per atom, squared force components, force
    error norms per atom); unweighted."""

    def __init__(self):
        self.e2 = self.f2 = self.f_norm = 0.0
        self.n_struct = self.n_comp = self.n_atoms = 0

    def add(self, energy_err: torch.Tensor, force_err: torch.Tensor) -> None:
        force_err = force_err.detach()
        self.e2 += float((energy_err.detach() ** 2).sum())
        self.f2 += float((force_err ** 2).sum())
        self.f_norm += float(torch.linalg.vector_norm(force_err, dim=1).sum())
        self.n_struct += energy_err.numel()
        self.n_comp += force_err.numel()
        self.n_atoms += len(force_err)

    def rmse(self) -> tuple[float, float]:
        return math.sqrt(self.e2 / max(self.n_struct, 1)), math.sqrt(self.f2 / max(self.n_comp, 1))

    def force_error_mean(self) -> float:
        """Mean per-atom ‖F_pred − F_ref‖ (eV/Angstrom): ``epoch_curve(log.epoch_stats)["mean"]``."""
        return self.f_norm / max(self.n_atoms, 1)


def _evaluate(model, dataset: AtomsDataset, batch_size: int, logger: ErrorLogger | None = None) -> _Sums:
    sums = _Sums()
    for batch in dataset.batches(batch_size):
        energy, forces, _ = predict_batch(model, batch)
        sums.add((energy - batch.energy) / batch.n_atoms, forces - batch.forces)
        if logger is not None:
            logger.log(batch.atom_ids, forces, batch.forces)
    return sums


def evaluate_dataset(model, dataset: AtomsDataset, batch_size: int,
                     logger: ErrorLogger | None = None) -> tuple[float, float]:
    """Energy RMSE (eV/atom) and force-component RMSE (eV/Angstrom) of a labelled set.

    With ``logger``, every atom's ‖F_pred − F_ref‖ of this pass is logged too (id = the atom's
    position in ``dataset``'s frames, in order); the caller closes the epoch.
    """
    return _evaluate(model, dataset, batch_size, logger).rmse()


def read_loss_weights(frames, key: str, path) -> np.ndarray | None:
    """Per-structure loss weights from ``atoms.info[key]`` (1.0 where a frame lacks the key);
    None when ``key`` is empty or no frame has it (the unweighted loss).

    Raises ``FileFormatError`` naming the file and frame for a weight that is not a finite number > 0.
    """
    if not key or not any(key in atoms.info for atoms in frames):
        return None
    weights = np.ones(len(frames))
    for k, atoms in enumerate(frames):
        if key not in atoms.info:
            continue
        value = atoms.info[key]
        try:
            weight = math.nan if isinstance(value, (bool, np.bool_, str)) else float(value)
        except (TypeError, ValueError):
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise FileFormatError(f"{path}: frame {k} has {key}={value}; a per-structure loss weight "
                                  f"must be a finite number > 0 (leave the key out for 1.0)")
        weights[k] = weight
    return weights


def batch_loss(cfg: TrainConfig, energy_err: torch.Tensor, force_err: torch.Tensor,
               weights: torch.Tensor | None = None, structure: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of one batch of B structures with N atoms in all:

        L = energy_weight · (1/B) Σ_s w_s (ΔE_s / n_s)²  +  force_weight · (1/3N) Σ_a Σ_c w_s(a) ΔF_ac²

    ``energy_err``: (B,) energy errors per atom ΔE_s / n_s; ``force_err``: (N, 3); ``weights``: (B,)
    per-structure weights w_s (None: all 1); ``structure``: (N,) the structure s(a) of each atom.
    The weight multiplies each squared error of its structure and the means stay plain means over
    structures and force components (not divided by Σ w), as MACE's weighted energy and force
    losses do: weights of 1 give the unweighted loss bit for bit (x · 1.0 is exact), a weight of 2
    counts a structure's terms twice, and the loss scale grows with the mean weight (scale weights
    to mean 1 to keep it).
    """
    e2, f2 = energy_err ** 2, force_err ** 2
    if weights is not None:
        e2 = weights * e2
        f2 = weights[structure].unsqueeze(1) * f2
    return cfg.energy_weight * e2.mean() + cfg.force_weight * f2.mean()


@torch.no_grad()
def initialize_model(model, dataset: AtomsDataset, batch_size: int = 8) -> None:
    """Feature normalisation from the training atoms; per-species reference energies by least squares.

    Starting from the right energy offset and unit-scale features makes the first epochs useful.
    """
    raw = [model.descriptors(b.positions, b.species, b.centers, b.neighbors, b.shifts, b.n_local)
           for b in dataset.batches(batch_size)]
    model.fit_normalization(torch.cat(raw))
    counts = np.zeros((len(dataset), len(model.species)))
    energies = np.zeros(len(dataset))
    for k, atoms in enumerate(dataset.frames):
        for s, symbol in enumerate(model.species):
            counts[k, s] = atoms.get_chemical_symbols().count(symbol)
        energies[k] = atoms.get_potential_energy()
    reference, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    model.reference_energy.copy_(torch.as_tensor(reference, dtype=model.reference_energy.dtype))


def split_structures(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, validation) structure indices; at least one of each when val_fraction > 0."""
    order = rng.permutation(n)
    n_val = min(max(int(round(val_fraction * n)), 1), n - 1) if val_fraction > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _scheduler(cfg: TrainConfig, optimizer):
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    return None


def build_model(cfg: TrainConfig, frames):
    """A fresh ``LocalForceField`` from the config (species default to those in the data)."""
    from ase.data import atomic_numbers

    from ltau_lmp.model import LocalForceField

    options = asdict(cfg.model)
    species = options.pop("species") or sorted(
        {s for atoms in frames for s in atoms.get_chemical_symbols()}, key=atomic_numbers.get)
    try:
        return LocalForceField(species=species, seed=cfg.seed, **options)
    except TypeError as exc:
        raise ConfigError(f"train.model: {exc}") from None


def train_epoch(model, optimizer, dataset: AtomsDataset, order, cfg: TrainConfig,
                logger: ErrorLogger | None, weights: np.ndarray | None = None,
                sums: _Sums | None = None) -> tuple[float, float, float]:
    """One pass over ``dataset`` in ``order``; returns (loss, energy RMSE, force RMSE).

    ``weights``: per-structure loss weights of ``dataset`` (``batch_loss``; None = unweighted); the
    loss returned is the weighted one, the RMSEs are not weighted. ``sums``: filled with the
    epoch's error sums when given.
    """
    model.train()
    sums = _Sums() if sums is None else sums
    loss_sum, n_batches = 0.0, 0
    order = np.asarray(order)
    for start in range(0, len(order), cfg.batch_size):
        indices = order[start:start + cfg.batch_size]
        batch = dataset.batch(indices)
        energy, forces, _ = predict_batch(model, batch, create_graph=True)
        energy_err = (energy - batch.energy) / batch.n_atoms
        force_err = forces - batch.forces
        w = None if weights is None else torch.as_tensor(weights[indices], dtype=energy_err.dtype)
        loss = batch_loss(cfg, energy_err, force_err, w, batch.structure)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if logger is not None:
            logger.log(batch.atom_ids, forces, batch.forces)
        sums.add(energy_err, force_err)
        loss_sum += float(loss.detach())
        n_batches += 1
    return (loss_sum / n_batches, *sums.rmse())


@dataclass
class TrainingData:
    """The training file and its seeded split into training and validation structures."""

    path: Path
    frames: list
    train_idx: np.ndarray
    val_idx: np.ndarray
    weights: np.ndarray | None = None  # per-structure loss weights of all frames (None: unweighted)
    val_path: Path | None = None       # an explicit validation file: its frames follow the training file's

    @property
    def val_in_file(self) -> list[int]:
        """The validation structures' indices in the file they come from."""
        offset = 0 if self.val_path is None else len(self.frames) - len(self.val_idx)
        return (self.val_idx - offset).tolist()

    @property
    def train_weights(self) -> np.ndarray | None:
        """The loss weights of the training structures, in training-set order."""
        return None if self.weights is None else self.weights[self.train_idx]

    def datasets(self, model) -> tuple[AtomsDataset, AtomsDataset | None]:
        """Training and validation sets with the model's species, cutoff and dtype (validation may be None)."""
        def subset(idx):
            return AtomsDataset([self.frames[i] for i in idx], model.species, model.cutoff, model.dtype)

        return subset(self.train_idx), subset(self.val_idx) if len(self.val_idx) else None


@dataclass
class FitResult:
    """What the epoch loop leaves behind (the model itself is updated in place to its best state)."""

    error_log: object
    metrics: list[dict]
    best_epoch: int
    seconds: float
    validation_log: object = None  # ErrorLog of the validation atoms, epochs aligned with error_log


def load_data(cfg: TrainConfig, base_dir: Path, rng: np.random.Generator) -> TrainingData:
    """Read the training file and split it (the split is the first use of ``rng``), or take the
    validation structures from ``data.val``."""
    path = resolve(cfg.data.train, base_dir)
    frames = read_frames(path)
    weights = read_loss_weights(frames, cfg.data.config_weight_key, path)
    if not cfg.data.val:
        train_idx, val_idx = split_structures(len(frames), cfg.data.val_fraction, rng)
        return TrainingData(path, frames, train_idx, val_idx, weights)
    val_path = resolve(cfg.data.val, base_dir)
    val_frames = read_frames(val_path)
    n = len(frames)
    weights = None if weights is None else np.concatenate([weights, np.ones(len(val_frames))])
    return TrainingData(path, frames + val_frames, np.arange(n), np.arange(n, n + len(val_frames)), weights, val_path)


def setup_model(cfg: TrainConfig, data: TrainingData, base_dir: str | Path = "."):
    """A fresh model initialised on the training atoms (or, with ``init_model``, that model to
    continue from: its weights, normalisation and reference energies), with the training and
    validation sets."""
    if cfg.init_model:
        model = warm_start_model(resolve(cfg.init_model, base_dir), data.frames)
    else:
        model = build_model(cfg, data.frames)
    train_set, val_set = data.datasets(model)
    if not cfg.init_model:
        initialize_model(model, train_set)
    return model, train_set, val_set


def warm_start_model(path: Path, frames):
    """The built-in model at ``path``, checked to cover every species of ``frames``."""
    from ltau_lmp.model import LocalForceField, load_model

    try:
        model = load_model(path)
    except LTAUError as exc:
        raise ConfigError(f"train.init_model: {exc}") from None
    if not isinstance(model, LocalForceField):
        raise ConfigError(f"train.init_model: {path} is a {model.card.family} model; the built-in trainer "
                          f"continues only from its own model.pt")
    missing = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()} - set(model.species))
    if missing:
        raise ConfigError(f"train.init_model: {path} has species {list(model.species)}, the data also {missing}")
    return model


def fit(cfg: TrainConfig, model, train_set: AtomsDataset, val_set: AtomsDataset | None,
        rng: np.random.Generator, metrics_path: Path, show_progress: bool = True,
        weights: np.ndarray | None = None) -> FitResult:
    """The epoch loop: per-atom error logging (training and validation atoms), validation, LR
    schedule, early stopping. ``weights``: per-structure loss weights of ``train_set`` (``batch_loss``).

    ``metrics_path`` (CSV) is rewritten after every epoch so a long run can be watched. The model
    ends in the state of its best epoch (lowest validation loss, or training loss without validation).
    """
    from tqdm import tqdm

    error_log = cfg.error_log.new_log(train_set.total_atoms)
    logger = ErrorLogger(error_log)
    validation_log = val_logger = None
    if val_set is not None:  # the same bins and counted epochs as the training log
        validation_log = ErrorLog(val_set.total_atoms, error_log.bin_edges, skip_epochs=error_log.skip_epochs,
                                  stop_epoch=error_log.stop_epoch)
        val_logger = ErrorLogger(validation_log)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = _scheduler(cfg, optimizer)

    metrics, best_loss, best_state, best_epoch = [], math.inf, None, 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not show_progress)
    for epoch in bar:
        epoch_start, log_before = time.perf_counter(), logger.seconds
        lr = optimizer.param_groups[0]["lr"]
        train_sums = _Sums()
        loss, e_rmse, f_rmse = train_epoch(model, optimizer, train_set, rng.permutation(len(train_set)),
                                           cfg, logger, weights, train_sums)
        logger.end_epoch()
        train_end = time.perf_counter()
        row = {"epoch": epoch, "lr": lr, "train_loss": loss, "train_energy_rmse": e_rmse,
               "train_force_rmse": f_rmse, "val_loss": "", "val_energy_rmse": "", "val_force_rmse": "",
               "train_force_error_mean": train_sums.force_error_mean(), "val_force_error_mean": ""}
        monitor = loss
        if val_set is not None:
            model.eval()
            val_sums = _evaluate(model, val_set, cfg.batch_size, val_logger)
            val_logger.end_epoch()  # one validation epoch per training epoch: the logs line up
            val_e, val_f = val_sums.rmse()
            monitor = cfg.energy_weight * val_e ** 2 + cfg.force_weight * val_f ** 2
            row.update(val_loss=monitor, val_energy_rmse=val_e, val_force_rmse=val_f,
                       val_force_error_mean=val_sums.force_error_mean())
        row.update(train_seconds=train_end - epoch_start, val_seconds=time.perf_counter() - train_end,
                   log_seconds=logger.seconds - log_before)
        metrics.append(row)
        _write_metrics(metrics_path, metrics)
        bar.set_postfix(loss=f"{loss:.3g}", f_rmse=f"{row['val_force_rmse'] or f_rmse:.3f}", lr=f"{lr:.1e}")
        if monitor < best_loss:
            best_loss, best_state, best_epoch = monitor, copy.deepcopy(model.state_dict()), epoch
        if cfg.schedule == "plateau":
            scheduler.step(monitor)
        elif scheduler is not None:
            scheduler.step()
        if cfg.early_stopping and epoch - best_epoch >= cfg.early_stopping:
            break
    bar.close()
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    if error_log.n_counted == 0:
        raise LTAUError(f"training stopped after {len(metrics)} epochs, before error_log.skip_epochs="
                        f"{cfg.error_log.skip_epochs}: no errors were logged")
    return FitResult(error_log, metrics, best_epoch, seconds, validation_log)


def export(cfg: TrainConfig, model, data: TrainingData, train_set: AtomsDataset, val_set: AtomsDataset | None,
           fitted: FitResult, out_dir: Path, base_dir: Path) -> TrainResult:
    """Write model.pt, then the artefacts (``ltau_lmp.pipeline.write_artefacts``): error_log.npz,
    descriptors.npy, reference_descriptors.npy (validation atoms), estimator/ and summary.json (with
    test scores and the recommended alarm thresholds)."""
    from ltau_lmp.model import save_model

    error_log, metrics = fitted.error_log, fitted.metrics
    model_hash = save_model(model, out_dir / "model.pt")
    summary = {
        "model_hash": model_hash, "epochs": len(metrics), "best_epoch": fitted.best_epoch,
        "train_seconds": fitted.seconds, "n_train_structures": len(data.train_idx),
        "n_val_structures": len(data.val_idx), "n_train_atoms": train_set.total_atoms,
        "train_structures": data.train_idx.tolist(), "val_structures": data.val_idx.tolist(),
        "log_overhead_fraction": sum(r["log_seconds"] for r in metrics) / sum(r["train_seconds"] for r in metrics),
        "config_weights": _weights_summary(cfg.data.config_weight_key, data.train_weights),
        "test": {},
    }
    for name, path in cfg.data.test.items():
        test_set = AtomsDataset(read_frames(resolve(path, base_dir)), model.species, model.cutoff, model.dtype)
        e_rmse, f_rmse = evaluate_dataset(model, test_set, cfg.batch_size)
        summary["test"][name] = {"energy_rmse": e_rmse, "force_rmse": f_rmse, "n_atoms": test_set.total_atoms}
    # descriptors.npy and reference_descriptors.npy let `ltau-lmp build-estimator` rebuild with other options
    artefacts = write_artefacts(
        out_dir, model, train_set.frames, error_log, cfg.estimator,
        reference_frames=val_set.frames if val_set is not None else (),
        provenance={"train_file": str(data.path), "train_structures": data.train_idx.tolist(),
                    "reference_structures": data.val_in_file,
                    **({"val_file": str(data.val_path)} if data.val_path else {}),
                    "epochs": len(metrics), "skip_epochs": cfg.error_log.skip_epochs},
        summary=summary, save_frames=False, batch_size=cfg.batch_size, validation_log=fitted.validation_log)
    return TrainResult(model, error_log, artefacts.estimator, metrics, artefacts.summary, out_dir,
                       fitted.validation_log)


def _weights_summary(key: str, weights: np.ndarray | None) -> dict | None:
    """The training structures' loss weights in summary.json (None: unweighted training)."""
    if weights is None:
        return None
    return {"key": key, "n_structures": int(weights.size), "n_not_one": int(np.count_nonzero(weights != 1.0)),
            "min": float(weights.min()), "max": float(weights.max()), "mean": float(weights.mean())}


def train(cfg: TrainConfig, base_dir: str | Path = ".", show_progress: bool = True,
          overwrite: bool = False) -> TrainResult:
    """The whole ``ltau-lmp train`` pipeline (data, model set-up, fit, export) into ``cfg.out_dir``.

    Everything is written into a temporary sibling of ``out_dir`` (metrics.csv there can be watched
    during training) and renamed at the end; an existing ``out_dir`` is replaced only when it is an
    earlier training output and ``overwrite`` is given, and that is checked before training.
    """
    from ltau_lmp.outputs import check_dir, output_dir

    base_dir = Path(base_dir)
    out_dir = check_dir(resolve(cfg.out_dir, base_dir), "train", overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = load_data(cfg, base_dir, rng)
    model, train_set, val_set = setup_model(cfg, data, base_dir)
    with output_dir(out_dir, "train", overwrite) as tmp:
        if show_progress:
            print(f"writing into {tmp} (metrics.csv every epoch), renamed to {out_dir} at the end", file=sys.stderr)
        # weights passed only when there are any (a stand-in fit without the argument still works)
        weights = getattr(data, "train_weights", None)
        fitted = fit(cfg, model, train_set, val_set, rng, tmp / "metrics.csv", show_progress,
                     **({} if weights is None else {"weights": weights}))
        result = export(cfg, model, data, train_set, val_set, fitted, tmp, base_dir)
    result.out_dir = out_dir
    return result


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(metrics)
