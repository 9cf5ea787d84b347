"""MACE trained by its own, unchanged trainer as the loop's train stage (``learn.trainer: mace``).

Each round is one ``ltau-lmp mace-train`` (``ltau_lmp.integrations.mace.train_with_ltau``) with
``learn.mace`` as the mace_run_train options and ``learn.train.error_log`` / ``.estimator`` as
the LTAU options. The loop owns the data and the folders: MACE trains on the round's training
file, validates on the fixed validation file (which also calibrates the ``ood`` p-value; without
one MACE splits off its ``valid_fraction``), and writes everything into ``out``:

    mace/           MACE's work_dir: NAME.model (pickle), NAME_compiled.model (TorchScript),
                    checkpoints/, results/, logs/
    ltau/           mace-train's artefacts for NAME.model (error logs, train_set.xyz,
                    reference_set.xyz, estimator/: what ``ltau-lmp diagnose`` and ``replay`` read)
    lammps/         the same error log rebuilt into an estimator of NAME_compiled.model

LAMMPS runs ``NAME_compiled.model``: TorchScript, loaded without a pickle opt-in. ``fix ltau``
refuses an estimator built for another file's content hash, so ``lammps/estimator`` is built from
that file's own latents of the training atoms (``ltau_lmp.pipeline.write_artefacts``, what
``ltau-lmp build-estimator --model`` does).

Warm start: MACE's fine-tuning path, ``--foundation_model`` = the previous round's ``NAME.model``
with ``--multiheads_finetuning False``. MACE then takes the architecture from that model (the
architecture options of ``learn.mace`` only shape round 0) and copies all its weights, E0s,
scale/shift and average neighbour count; the optimizer and learning-rate schedule start afresh.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.learn.trainers import RoundModel

# mace_run_train options the loop sets itself: the data (ase writes a labelled frame's energy and
# forces under "energy" / "forces", which MACE 0.3.16 reads through the frame's calculator), the
# folders (everything inside ``out``) and the warm start.
OWNED = ("train_file", "valid_file", "energy_key", "forces_key", "work_dir", "model_dir", "checkpoints_dir",
         "results_dir", "log_dir", "downloads_dir", "foundation_model", "multiheads_finetuning")


def mace_arguments(options: dict, train_file: Path, validation: Path | None, work_dir: Path,
                   foundation: Path | None) -> list[str]:
    """The mace_run_train command line of one round from ``learn.mace``: ``key: value`` becomes
    ``--key=value``; a flag without a value (``ema: true``) is given when its value is the one
    the flag sets."""
    from mace import tools

    flags = {action.dest: action for action in tools.build_default_arg_parser()._actions if action.nargs == 0}
    for key in options:
        if key.startswith("-"):
            raise ConfigError(f"learn.mace.{key}: give mace_run_train options without the leading dashes")
        if key in OWNED:
            raise ConfigError(f"learn.mace.{key}: set by the loop (training and validation files, folders inside "
                              f"the round, warm start); remove it")
    if not options.get("name"):
        raise ConfigError("learn.mace.name: MACE's model name is missing (its files are NAME.model, "
                          "NAME_compiled.model)")
    loop = {"train_file": train_file, "energy_key": "energy", "forces_key": "forces", "work_dir": work_dir}
    if validation is not None:
        loop["valid_file"] = validation
    if foundation is not None:
        loop.update(foundation_model=foundation, multiheads_finetuning=False)
    args = []
    for key, value in {**options, **loop}.items():
        flag = flags.get(key)
        if flag is None:
            args.append(f"--{key}={value}")
        elif not isinstance(value, bool):
            raise ConfigError(f"learn.mace.{key}: true or false (mace_run_train's --{key} takes no value)")
        elif value == flag.const:
            args.append(f"--{key}")
        elif value != flag.default:
            raise ConfigError(f"learn.mace.{key}: mace_run_train's --{key} can only make it {flag.const}")
    return args


def pickle_of(compiled: Path) -> Path:
    """MACE's ``NAME.model`` beside its ``NAME_compiled.model``."""
    return compiled.with_name(compiled.name.removesuffix("_compiled.model") + ".model")


def train_mace(cfg, base: Path, train_file: Path, validation: Path | None, previous: RoundModel | None,
               out: Path) -> RoundModel:
    """One round's MACE and its estimator for LAMMPS (module docstring); ``out`` is replaced."""
    from ltau_lmp.integrations.mace import parse_mace_args, train_with_ltau
    from ltau_lmp.model import load_model
    from ltau_lmp.pipeline import write_artefacts

    foundation = None
    if previous is not None:
        # The previous round's NAME.model is a pickle this loop wrote (MACE's torch.load unpickles
        # it): the user's own file, the one MACE's fine-tuning can continue from.
        foundation = pickle_of(previous.model)
        if not foundation.is_file():
            raise LTAUError(f"warm start: {foundation} (MACE's model beside {previous.model.name}) is missing; "
                            f"set learn.warm_start: false or start a new out_dir")
    args = mace_arguments(cfg.mace, train_file, validation, out / "mace", foundation)
    try:
        epochs = parse_mace_args(args).max_num_epochs
    except SystemExit:  # argparse has printed the option it refused
        raise ConfigError("learn.mace: mace_run_train refused these options (its message is above)") from None
    if cfg.train.error_log.skip_epochs >= epochs:
        raise ConfigError(f"learn.train.error_log.skip_epochs ({cfg.train.error_log.skip_epochs}) must be smaller "
                          f"than learn.mace.max_num_epochs ({epochs}): no epoch would be logged")
    if out.exists():  # a training killed after writing its folder but before the manifest recorded it
        shutil.rmtree(out)
    out.mkdir(parents=True)
    result = train_with_ltau(args, out_dir=out / "ltau", error_log=cfg.train.error_log,
                             estimator=cfg.train.estimator)
    compiled = result.model_path.with_name(result.model_path.name.removesuffix(".model") + "_compiled.model")
    if not compiled.is_file():  # mace_run_train skips it silently when TorchScript compilation fails
        raise LTAUError(f"MACE wrote no {compiled.name} beside {result.model_path} (its TorchScript compilation "
                        f"failed; see {out / 'mace' / 'logs'}): LAMMPS runs that file without a pickle opt-in")
    model = load_model(compiled)
    log = result.error_log
    (out / "lammps").mkdir()
    built = write_artefacts(
        out / "lammps", model, result.frames, log, cfg.train.estimator, reference_frames=result.reference_frames,
        validation_log=result.validation_log, save_frames=False,
        provenance={"model_file": str(compiled), "epochs": log.epoch, "skip_epochs": cfg.train.error_log.skip_epochs},
        summary={"model_file": str(compiled), "mace_train": str(result.out_dir)})
    return RoundModel(compiled, out / "lammps" / "estimator", log.epoch, built.estimator.alarm_thresholds)
