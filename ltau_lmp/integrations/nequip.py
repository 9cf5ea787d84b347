"""LTAU from nequip's own, unchanged trainer (nequip 0.19, Lightning): a callback for its config.

Add to the ``trainer.callbacks`` list of a ``nequip-train`` config::

    - _target_: ltau_lmp.integrations.nequip.LTAUCallback
      out_dir: ${hydra:runtime.output_dir}/ltau
      skip_epochs: 3

What it does, with Lightning hooks only (no nequip code copied or changed):

* ``setup("fit")`` (after nequip's data module has built its datasets, before any dataloader):
  one pass over the training datasets gives every training atom a stable id (consecutive over
  the training set in dataset order) and the training set as ``ase.Atoms`` with reference
  forces; each training dataset is wrapped so that its items carry the ids as an extra per-atom
  field ``ltau_atom_id`` (registered with ``nequip.data.register_fields``, so nequip's batching
  concatenates it and its model never sees it). The validation datasets are kept as held-out
  structures that calibrate the estimator's ``ood`` p-value and alarm thresholds, and are wrapped
  the same way with ids over the validation set (dataset order: the order of reference_set.xyz).
* A forward hook on the model records ‖F_pred − F_ref‖ per atom from each training step's own
  forward pass (live weights, not EMA) against the batch's reference forces, keyed by the ids;
  ``on_train_epoch_end`` closes the epoch.
* The same hook records each validation batch's errors from nequip's own validation forward pass
  (the weights nequip validates with: the EMA weights of ``EMALightningModule``, the numbers behind
  its ``val0_epoch/forces_rmse``) into the validation error log
  (``ltau_lmp.integrations.validation``): one row per training epoch, closed at
  ``on_train_epoch_end`` (Lightning validates before it), n = 0 in epochs without validation
  (``check_val_every_n_epoch``); with several validations in one epoch (``val_check_interval``)
  the last counts. The sanity-check validation before training is not logged.
* ``on_fit_end`` saves the final state as a Lightning checkpoint ``out_dir/model.ckpt`` (what
  ``load_model`` / ``pair_style ltau`` load: nequip's evaluation model, EMA weights if the
  training module keeps them) and builds the estimator from that model's latents over the
  training set (``ltau_lmp.pipeline.write_artefacts``: error_log.npz, descriptors.npy,
  estimator/, train_set.xyz, reference_set.xyz, summary.json).

The wrapper and the hook draw no random numbers and change no tensor the trainer uses, so
training is unchanged (same losses and validation metrics as a plain run). Not supported
(refused): several processes (DDP; per-rank logs would need merging), several models in one
training module, training items without reference forces.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning
import numpy as np
import torch
from ase import Atoms
from torch.utils.data import Dataset

from ltau_lmp.errors import LTAUError
from ltau_lmp.estimator.options import ErrorLogOptions, EstimatorOptions
from ltau_lmp.integrations.replay import REF_FORCES

ID_KEY = "ltau_atom_id"


def _tag(datasets, type_names, what: str) -> tuple[list, list, int]:
    """(frames, the datasets wrapped so that each atom carries its id, atoms in all): ids count the
    atoms of every item of every dataset in order."""
    frames, tagged, offset = [], [], 0
    for d, dataset in enumerate(datasets):
        offsets = [offset]
        for k in range(len(dataset)):
            frames.append(_atoms(dataset[k], type_names, f"{what} item {k} of dataset {d}"))
            offset += len(frames[-1])
            offsets.append(offset)
        tagged.append(_TaggedDataset(dataset, np.asarray(offsets)))
    return frames, tagged, offset


class _TaggedDataset(Dataset):
    """A training dataset whose items carry their atoms' LTAU ids (``ID_KEY``, int64 per atom)."""

    def __init__(self, base: Dataset, offsets: np.ndarray):
        self.base = base
        self.offsets = offsets  # (len(base) + 1,): item k holds ids offsets[k] .. offsets[k+1]-1
        self.seconds = 0.0  # spent tagging, part of the logging overhead

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        data = dict(self.base[index])
        start = time.perf_counter()
        data[ID_KEY] = torch.arange(int(self.offsets[index]), int(self.offsets[index + 1]), dtype=torch.int64)
        self.seconds += time.perf_counter() - start
        return data


def _atoms(data: dict, type_names, what: str) -> Atoms:
    """One nequip data item as ``ase.Atoms`` with its reference forces in ``arrays[REF_FORCES]``."""
    from nequip.data import AtomicDataDict as K

    types = data[K.ATOM_TYPE_KEY].reshape(-1).tolist()
    cell = data[K.CELL_KEY].reshape(3, 3).numpy() if K.CELL_KEY in data else None
    pbc = data[K.PBC_KEY].reshape(3).numpy() if K.PBC_KEY in data else False
    atoms = Atoms(symbols=[type_names[t] for t in types], positions=data[K.POSITIONS_KEY].numpy(),
                  cell=cell, pbc=pbc)
    if K.FORCE_KEY not in data:
        raise LTAUError(f"{what} has no reference forces ({K.FORCE_KEY!r}): LTAU logs per-atom force errors")
    atoms.arrays[REF_FORCES] = data[K.FORCE_KEY].detach().numpy().astype(np.float64)
    return atoms


class LTAUCallback(lightning.Callback):
    """Per-atom force-error logging during ``nequip-train`` and the LTAU estimator at its end.

    ``out_dir``: where model.ckpt, error_log.npz, validation_error_log.npz, descriptors.npy,
    estimator/, train_set.xyz, reference_set.xyz and summary.json go. ``lo``, ``hi``, ``nbins``, ``skip_epochs``: the error
    histograms (as ``ltau-lmp train``); ``index``, ``k``, ``false_alarm_rate``: the estimator.
    ``build_estimator=False`` writes only the error log and model.ckpt. Everything is written into
    a temporary sibling of ``out_dir`` and renamed at the end; an existing ``out_dir`` is replaced
    only when it is an earlier output of this callback and ``overwrite`` is given, which is checked
    at ``setup``, before training (``ltau_lmp.outputs``).
    """

    def __init__(self, out_dir: str, lo: float = ErrorLogOptions.lo, hi: float = ErrorLogOptions.hi,
                 nbins: int = ErrorLogOptions.nbins, skip_epochs: int = ErrorLogOptions.skip_epochs,
                 index: str = EstimatorOptions.index, k: int = EstimatorOptions.k,
                 false_alarm_rate: float = EstimatorOptions.false_alarm_rate, build_estimator: bool = True,
                 overwrite: bool = False):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.log_options = ErrorLogOptions(lo=lo, hi=hi, nbins=nbins, skip_epochs=skip_epochs)
        self.estimator_options = EstimatorOptions(index=index, k=k, false_alarm_rate=false_alarm_rate)
        self.estimator_options.validate("LTAUCallback")
        self.log_options.validate("LTAUCallback")
        self.build_estimator = build_estimator
        self.overwrite = overwrite
        self.frames: list[Atoms] = []
        self.reference_frames: list[Atoms] = []
        self.logger = None  # ErrorLogger, from setup
        self.validation = None  # ValidationLogger over the validation atoms, from setup
        self.setup_seconds = 0.0
        self.epoch_seconds: list[float] = []  # wall time of each training epoch (validation included)
        self._tagged: list[_TaggedDataset] = []
        self._epoch_start = 0.0
        self._batch = None
        self._val_batch = None
        self._validating = False
        self._hook = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from nequip.data import register_fields

        from ltau_lmp.integrations.validation import ValidationLogger
        from ltau_lmp.outputs import check_dir
        from ltau_lmp.pipeline import ErrorLogger

        if stage != "fit":
            return
        check_dir(self.out_dir, "nequip", self.overwrite)
        if trainer.world_size > 1:
            raise LTAUError(f"LTAUCallback: training on {trainer.world_size} processes is not supported "
                            f"(per-rank error logs are not merged); train on one process")
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.log_options.skip_epochs:
            raise LTAUError(f"LTAUCallback: skip_epochs={self.log_options.skip_epochs} leaves none of the "
                            f"{trainer.max_epochs} training epochs to count")
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_dataset"):
            raise LTAUError("LTAUCallback: the trainer has no nequip data module with a train_dataset "
                            "(nequip-train's `data:`); its training atoms cannot be tagged")
        start = time.perf_counter()
        type_names = self._model(pl_module).type_names
        self.frames, tagged, offset = _tag(datamodule.train_dataset, type_names, "training")
        if offset == 0:
            raise LTAUError("LTAUCallback: the training set is empty")
        self.reference_frames, tagged_val, val_offset = _tag(datamodule.val_dataset, type_names, "validation")
        register_fields(node_fields=[ID_KEY], long_fields=[ID_KEY])
        datamodule.train_dataset = tagged
        self._tagged = tagged + tagged_val
        self.logger = ErrorLogger(self.log_options.new_log(offset))
        if val_offset:
            datamodule.val_dataset = tagged_val
            self.validation = ValidationLogger(self.log_options.new_log(val_offset))
        self.setup_seconds = time.perf_counter() - start

    @staticmethod
    def _model(pl_module):
        models = list(pl_module.model.values())
        if len(models) != 1:
            raise LTAUError(f"LTAUCallback: the training module holds {len(models)} models; one is supported")
        return models[0]

    def on_train_start(self, trainer, pl_module) -> None:
        self._hook = self._model(pl_module).register_forward_hook(self._log_step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from nequip.data import AtomicDataDict as K

        if ID_KEY not in batch:
            raise LTAUError(f"LTAUCallback: a training batch carries no {ID_KEY} (its dataloader did not come "
                            f"from the data module's train_dataset)")
        self._batch = (batch[ID_KEY], batch[K.FORCE_KEY])  # the references, before the step touches the batch

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._validating = self.validation is not None and not trainer.sanity_checking
        if self._validating:
            self.validation.start()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        from nequip.data import AtomicDataDict as K

        if not self._validating:
            return
        if ID_KEY not in batch:
            raise LTAUError(f"LTAUCallback: a validation batch carries no {ID_KEY} (its dataloader did not come "
                            f"from the data module's val_dataset)")
        self._val_batch = (batch[ID_KEY], batch[K.FORCE_KEY])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._validating, self._val_batch = False, None

    def _log_step(self, module, inputs, output) -> None:
        from nequip.data import AtomicDataDict as K

        if self._batch is not None:  # a training step
            ids, reference = self._batch
            self._batch = None
            self.logger.log(ids.cpu().numpy(), output[K.FORCE_KEY], reference)
        elif self._val_batch is not None:  # a validation step
            ids, reference = self._val_batch
            self._val_batch = None
            self.validation.log(ids.cpu().numpy(), output[K.FORCE_KEY], reference)
        # else: a second forward in one step, or a forward outside training and validation

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.logger.end_epoch()
        if self.validation is not None:  # Lightning validated (or not) before this hook
            self.validation.end_epoch()
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    @property
    def log_seconds(self) -> float:
        """Time spent logging during training: error norms, histograms and id tagging (training and
        validation)."""
        return (self.logger.seconds + (0.0 if self.validation is None else self.validation.seconds)
                + sum(d.seconds for d in self._tagged))

    def on_fit_end(self, trainer, pl_module) -> None:
        from ltau_lmp.model import load_model
        from ltau_lmp.outputs import output_dir
        from ltau_lmp.pipeline import write_artefacts

        if self._hook is not None:
            self._hook.remove()
        log = self.logger.error_log
        if log.epoch == 0:
            raise LTAUError("LTAUCallback: no training epoch ran: nothing was logged")
        model_path = self.out_dir / "model.ckpt"  # where it will be: the metadata records this path
        with output_dir(self.out_dir, "nequip", self.overwrite) as tmp:
            trainer.save_checkpoint(tmp / model_path.name)
            validation_log = None if self.validation is None else self.validation.error_log
            if not self.build_estimator:
                log.save(tmp / "error_log.npz")
                if validation_log is not None:
                    validation_log.save(tmp / "validation_error_log.npz")
                return
            # the checkpoint this callback just wrote, loaded the way pair_style ltau loads it
            model = load_model(tmp / model_path.name, map_location=pl_module.device, allow_pickle=True)
            write_artefacts(
                tmp, model, self.frames, log, self.estimator_options, reference_frames=self.reference_frames,
                validation_log=validation_log,
                provenance={"model_file": str(model_path), "epochs": log.epoch,
                            "skip_epochs": self.log_options.skip_epochs},
                summary={"model_file": str(model_path), "epochs": log.epoch, "log_seconds": self.log_seconds,
                         "setup_seconds": self.setup_seconds, "epoch_seconds": self.epoch_seconds})
