"""LTAU from MACE's own, unchanged trainer (mace-torch 0.3.16).

``train_with_ltau(mace_args)`` runs ``mace.cli.run_train.run`` (what ``mace_run_train`` runs)
with three wrappers around module-level functions, no MACE code copied or changed:

* ``mace.cli.run_train.get_dataset_from_xyz`` — after MACE has read the extxyz files and split
  off its validation set, every training configuration gets a per-atom property
  ``ltau_atom_id`` (consecutive ids over the training set, in MACE's order); the validation
  configurations are kept as the held-out atoms that calibrate the estimator's out-of-domain
  p-value and alarm thresholds.
  ``AtomicData.from_config`` passes extra per-atom properties through as node attributes
  ((n, 1) int64), and MACE's ``Batch`` concatenates node attributes along the atom axis, so every
  training batch carries the ids of its atoms, whatever the shuffling. The validation
  configurations get ids the same way (consecutive over the validation set in MACE's order, the
  order of reference_set.xyz).
* ``mace.tools.train.train_one_epoch`` — its ``loss_fn`` is wrapped so that each call
  ``loss_fn(pred=output, ref=batch)`` inside the training step first records
  ‖F_pred − F_ref‖ per atom from that step's own forward pass (before the optimizer step, live
  weights, not EMA) into an ``ErrorLog``; ``end_epoch`` follows each epoch.
* ``mace.tools.train.evaluate`` (the validation of ``mace.tools.train.train`` after an epoch, every
  ``--eval_interval`` epochs) — its ``loss_fn`` is wrapped the same way, so the validation
  metric's own loss calls record each validation atom's error from MACE's validation forward pass
  (the weights MACE validates with: the EMA weights with ``--ema``) into the validation error log
  (``ltau_lmp.integrations.validation``), one row per training epoch, n = 0 where MACE did not
  validate. The evaluation before the first epoch and the final error tables (which call their own
  reference to ``evaluate``) are not logged.

No wrapper touches a random number generator or a tensor MACE uses, so training is
bit-identical to a plain run with the same seed in a fresh process (MACE's own results differ
in the last bits between the first and later runs inside one process, logging or not). MACE
drops each epoch's last incomplete batch, so an atom can miss an epoch; its histogram is
normalised over the epochs it has. After training, the final model MACE wrote
(``NAME.model``, or ``NAME_stagetwo.model`` with ``--swa``) is wrapped in ``MACEForceField``;
its latents over the training set and the error log make the estimator.

Not supported (refused with a message): HDF5/LMDB training data (it skips ``from_config``),
multi-head training (several training sets), ``--distributed`` (per-rank logs would need
merging), ``--lbfgs`` (one step evaluates the loss many times).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions
from ltau_lmp.integrations.replay import REF_FORCES

ID_KEY = "ltau_atom_id"


@dataclass
class MaceTrainResult:
    model_path: Path           # the MACE model file the estimator belongs to
    out_dir: Path              # error_log.npz, descriptors.npy, estimator/, train_set.xyz, summary.json
                               # (+ reference_descriptors.npy, reference_set.xyz: MACE's validation set)
    model_hash: str            # MACEForceField(model).card.model_hash, recorded in the estimator
    error_log: object          # ErrorLog over the training atoms (ids = rows of descriptors.npy)
    estimator: object          # LTAUEstimator
    frames: list[Atoms]        # the training set in id order (also written to train_set.xyz)
    reference_frames: list[Atoms]  # MACE's validation configurations (empty without validation data)
    validation_log: object = None  # ErrorLog over the validation atoms (ids = atoms of reference_set.xyz),
                                   # None without validation configurations or their reference forces


def _has_forces(config) -> bool:
    return config.properties.get("forces") is not None and config.property_weights.get("forces", 1.0) != 0.0


def _config_atoms(config) -> Atoms:
    """A MACE ``Configuration`` as ``ase.Atoms``, with its reference forces (``REF_FORCES``) and
    energy (info ``REF_energy``) where it has them."""
    atoms = Atoms(numbers=config.atomic_numbers, positions=config.positions, cell=config.cell, pbc=config.pbc)
    if config.properties.get("forces") is not None:
        atoms.arrays[REF_FORCES] = np.asarray(config.properties["forces"], dtype=np.float64)
    if config.properties.get("energy") is not None:
        atoms.info["REF_energy"] = float(config.properties["energy"])
    return atoms


class _Logging:
    """State shared by the wrappers: the training set, its ids, the error log, the validation set
    and its error log."""

    def __init__(self, make_log: Callable[[int], object], on_step: Callable | None):
        self.make_log = make_log
        self.on_step = on_step
        self.frames: list[Atoms] | None = None
        self.reference_frames: list[Atoms] = []
        self.logger = None
        self.validation = None  # ValidationLogger over the validation atoms
        self.validating = False  # between the end of a training epoch and the start of the next
        self.epoch = 0

    def tag_training_set(self, configs) -> None:
        from ltau_lmp.pipeline import ErrorLogger

        if self.frames is not None:
            raise LTAUError("MACE loaded a second training set (multi-head training or fine-tuning): "
                            "LTAU logging covers one training set")
        for k, config in enumerate(configs):
            if not _has_forces(config):
                raise LTAUError(f"training configuration {k} has no reference forces (MACE --forces_key): "
                                f"LTAU logs per-atom force errors")
        offset = _tag(configs)
        if offset == 0:
            raise LTAUError("MACE's training set is empty")
        self.frames = [_config_atoms(config) for config in configs]
        self.logger = ErrorLogger(self.make_log(offset))

    def tag_validation_set(self, configs) -> None:
        """The validation configurations are the reference frames; with reference forces on all of
        them their atoms get ids and a validation error log."""
        from ltau_lmp.integrations.validation import ValidationLogger

        self.reference_frames = [_config_atoms(config) for config in configs]
        if not configs:
            return
        missing = [k for k, config in enumerate(configs) if not _has_forces(config)]
        if missing:
            logging.getLogger(__name__).warning(
                "LTAU: %d of %d validation configurations (first: %d) have no reference forces: "
                "no validation error log", len(missing), len(configs), missing[0])
            return
        self.validation = ValidationLogger(self.make_log(_tag(configs)))

    def log_validation(self, pred, ref) -> None:
        ids = ref[ID_KEY]
        if ids is None:  # e.g. MACE validated on HDF5 files beside an extxyz training set
            logging.getLogger(__name__).warning(
                "LTAU: a MACE validation batch carries no %s (its data did not come from the extxyz "
                "validation configurations): no validation error log", ID_KEY)
            self.validation = None
            return
        self.validation.log(ids.reshape(-1).cpu().numpy(), pred["forces"], ref["forces"])

    def end_validation(self) -> None:
        """Close the validation log's epoch of the training epoch that ended last."""
        if self.validating and self.validation is not None:
            self.validation.end_epoch()
        self.validating = False

    def log_step(self, pred, ref) -> None:
        ids = ref[ID_KEY]
        if ids is None:
            raise LTAUError(f"a MACE training batch carries no {ID_KEY}: its data did not come through "
                            f"the extxyz loader (HDF5/LMDB or replay data are not supported)")
        ids = ids.reshape(-1).cpu().numpy()
        errors = self.logger.log(ids, pred["forces"], ref["forces"])
        if self.on_step is not None:
            self.on_step(self.epoch, ids, errors)

    def end_epoch(self) -> None:
        self.logger.end_epoch()
        self.epoch += 1
        self.validating = True


def _tag(configs) -> int:
    """Give the atoms of ``configs`` consecutive ids (per-atom property ``ID_KEY``); returns their number."""
    offset = 0
    for config in configs:
        n = len(config.atomic_numbers)
        config.properties[ID_KEY] = np.arange(offset, offset + n, dtype=np.int64)
        offset += n
    return offset


class _LoggingLoss:
    """MACE's loss function, recording each training step's per-atom force errors first."""

    def __init__(self, loss_fn, state: _Logging):
        self.loss_fn = loss_fn
        self.state = state

    def __call__(self, pred, ref):
        self.state.log_step(pred, ref)
        return self.loss_fn(pred=pred, ref=ref)


class _ValidationLoss(torch.nn.Module):
    """MACE's loss function inside ``evaluate``'s metric, recording each validation batch's per-atom
    force errors first. A module holding the loss as a child, so that the metric's ``.to(device)``
    reaches the loss as it does without the wrapper."""

    def __init__(self, loss_fn, state: _Logging):
        super().__init__()
        self.loss_fn = loss_fn
        self.state = state

    def forward(self, pred, ref):
        if self.state.validation is not None and pred.get("forces") is not None:
            self.state.log_validation(pred, ref)
        return self.loss_fn(pred=pred, ref=ref)


@contextmanager
def restoring_process_state():
    """Restore torch's default dtype and the root logger after a MACE run: ``run_train.run`` sets
    both process-wide, which would leak into the caller and multiply a second run's log output."""
    root = logging.getLogger()
    level, handlers, filters = root.level, list(root.handlers), list(root.filters)
    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.setLevel(level)
        root.handlers[:], root.filters[:] = handlers, filters


@contextmanager
def _hooks(state: _Logging):
    """Install the three wrappers (module docstring) for the duration of one run."""
    run_train = importlib.import_module("mace.cli.run_train")
    train_module = importlib.import_module("mace.tools.train")  # mace.tools.train is the function
    get_dataset, train_one_epoch, evaluate = (run_train.get_dataset_from_xyz, train_module.train_one_epoch,
                                              train_module.evaluate)
    signature, evaluate_signature = inspect.signature(train_one_epoch), inspect.signature(evaluate)

    def get_dataset_from_xyz(*args, **kwargs):
        collections, atomic_energies = get_dataset(*args, **kwargs)
        state.tag_training_set(collections.train)
        state.tag_validation_set(collections.valid)
        return collections, atomic_energies

    def logged_train_one_epoch(*args, **kwargs):
        if state.logger is None:
            raise LTAUError("MACE did not read its training set through the extxyz loader "
                            "(HDF5/LMDB data are not supported): no training atom ids to log")
        state.end_validation()  # the previous epoch's validation, if MACE ran one
        bound = signature.bind(*args, **kwargs)
        bound.arguments["loss_fn"] = _LoggingLoss(bound.arguments["loss_fn"], state)
        train_one_epoch(*bound.args, **bound.kwargs)
        state.end_epoch()

    def logged_evaluate(*args, **kwargs):
        if not state.validating or state.validation is None:  # before the first epoch: not logged
            return evaluate(*args, **kwargs)
        bound = evaluate_signature.bind(*args, **kwargs)
        bound.arguments["loss_fn"] = _ValidationLoss(bound.arguments["loss_fn"], state)
        state.validation.start()
        return evaluate(*bound.args, **bound.kwargs)

    run_train.get_dataset_from_xyz = get_dataset_from_xyz
    train_module.train_one_epoch = logged_train_one_epoch
    train_module.evaluate = logged_evaluate
    try:
        yield
    finally:
        run_train.get_dataset_from_xyz, train_module.train_one_epoch = get_dataset, train_one_epoch
        train_module.evaluate = evaluate


def parse_mace_args(mace_args: Sequence[str]):
    """MACE's own argument parser (``mace_run_train``'s options); refuses what logging cannot follow."""
    from mace import tools

    args = tools.build_default_arg_parser().parse_args(list(mace_args))
    if args.distributed:
        raise LTAUError("--distributed MACE training is not supported by ltau-lmp mace-train "
                        "(per-rank error logs are not merged); train on one process or use ltau-lmp replay")
    if args.lbfgs:
        raise LTAUError("--lbfgs is not supported by ltau-lmp mace-train (one L-BFGS step evaluates the "
                        "loss many times); use ltau-lmp replay on per-epoch checkpoints")
    return args


def train_with_ltau(mace_args: Sequence[str], out_dir: str | Path | None = None,
                    error_log: ErrorLogOptions | None = None, estimator: EstimatorOptions | None = None,
                    on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                    overwrite: bool = False) -> MaceTrainResult:
    """Run MACE's training with per-atom error logging, then build and write the LTAU estimator.

    ``mace_args``: ``mace_run_train`` command-line arguments. ``out_dir`` (default
    ``WORK_DIR/ltau``) receives error_log.npz, descriptors.npy, estimator/, train_set.xyz (the
    training set in id order, for ``ltau-lmp replay``) and summary.json; MACE's validation
    configurations calibrate the ``ood`` p-value and the alarm thresholds (reference_set.xyz,
    reference_descriptors.npy). ``error_log`` / ``estimator``: the same options as
    ``ltau-lmp train`` (bins, skipped epochs; index kind, k, false-alarm rate), checked before
    training. ``on_step(epoch, atom_ids, errors)`` sees every training step's
    errors (0-based epoch of this run), e.g. to keep whole trajectories. An existing ``out_dir`` is
    replaced only when it is an earlier mace-train output and ``overwrite`` is given (checked before
    training; ``ltau_lmp.outputs``).
    """
    from mace.cli import run_train

    from ltau_lmp.model import load_model
    from ltau_lmp.outputs import check_dir, output_dir
    from ltau_lmp.pipeline import write_artefacts

    log_options, estimator_options = error_log or ErrorLogOptions(), estimator or EstimatorOptions()
    estimator_options.validate("estimator")
    log_options.validate("error_log")
    args = parse_mace_args(mace_args)
    out_dir = Path(args.work_dir) / "ltau" if out_dir is None else Path(out_dir)
    check_dir(out_dir, "mace-train", overwrite)
    state = _Logging(log_options.new_log, on_step)
    start = time.perf_counter()
    with restoring_process_state(), _hooks(state):
        run_train.run(args)
    state.end_validation()  # the last epoch's
    train_seconds = time.perf_counter() - start
    if state.epoch == 0:
        raise LTAUError("MACE ran no training epoch (--dry_run, or a restart already at --max_num_epochs): "
                        "nothing was logged")

    model_path = Path(args.model_dir) / f"{args.name}{'_stagetwo' if args.swa else ''}.model"
    # The file this run just wrote, on the training device for the pass over the training set.
    model = load_model(model_path, map_location=args.device, family="mace", allow_pickle=True)
    log = state.logger.error_log
    validation_log = None if state.validation is None else state.validation.error_log
    with output_dir(out_dir, "mace-train", overwrite) as tmp:
        built = write_artefacts(
            tmp, model, state.frames, log, estimator_options, reference_frames=state.reference_frames,
            validation_log=validation_log,
            provenance={"model_file": str(model_path), "epochs": state.epoch, "skip_epochs": log_options.skip_epochs},
            summary={"model_file": str(model_path), "epochs": state.epoch, "train_seconds": train_seconds,
                     "log_seconds": state.logger.seconds,
                     "validation_log_seconds": None if state.validation is None else state.validation.seconds}
        ).estimator
    return MaceTrainResult(model_path, out_dir, built.metadata["model_hash"], log, built, state.frames,
                           state.reference_frames, validation_log)
