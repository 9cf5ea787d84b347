"""Model files: which family a file holds, and loading it.

* ``ltau_local`` (the built-in model): one ``torch.save`` of a plain dict (``"format"`` key, no
  pickled classes), read with ``weights_only=True``.
* ``mace``: a MACE ``.model`` file, ``torch.save`` of the whole module. Unpickling it imports and
  runs code named in the file, so it is loaded only with ``allow_pickle=True``.
* ``nequip`` / ``allegro``: a nequip 0.19 training checkpoint (Lightning ``.ckpt``, e.g. the
  ``model.ckpt`` of ``ltau_lmp.integrations.nequip.LTAUCallback``), read with
  ``weights_only=True`` and rebuilt by the model builder its config names when every callable
  named there is a known nequip/Allegro part; other checkpoints and ``nequip-package`` files
  (``.nequip.zip``, which carry Python code) go through nequip's own loaders, which unpickle:
  only with ``allow_pickle=True``.
* TorchScript archives (nequip-deploy / nequip-compile, MACE's ``*-lammps.pt`` and
  ``*_compiled.model``: what ``pair_nequip``, ``pair_allegro`` and ``pair_style mace`` read): the
  family from the archive's contents, loaded by ``ltau_lmp.model.torchscript`` (no pickled
  Python runs: no opt-in).

The family is read from the pickle's opcode stream without executing it (the classes a pickle
names are visible as strings), so a refused file is never unpickled. An explicit ``family`` is
checked the same way: a file that shows another family is refused, naming the family it is.
"""

from __future__ import annotations

import os
import pickletools
import zipfile

import torch

from ltau_lmp.errors import ConfigError, FileFormatError, LTAUError
from ltau_lmp.model.local import LocalForceField
from ltau_lmp.model.nequip import model_state
from ltau_lmp.model.torchscript import archive_kind, is_torchscript, load_archive

FORMAT = "ltau_lmp.model.local"
VERSION = 1
_KEYS = ("format", "version", "config", "state_dict", "model_hash")
FAMILIES = ("ltau_local", "mace", "nequip", "allegro", "metatomic")
_PACKAGE_METADATA = "/model/package_metadata.txt"
TRUST_OPTIONS = ("allow_pickle=True (Python), `pair_style ltau allow_pickle yes` (LAMMPS) "
                 "or --allow-pickle (ltau-lmp commands)")


class PickleRefusedError(LTAUError):
    """A model file would execute code when loaded and the caller did not allow it."""


def save_model(model: LocalForceField, path: str | os.PathLike) -> str:
    """Write ``model`` to ``path`` (written to a temporary file, then renamed); returns its hash."""
    model_hash = model.model_hash
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config,
        "species": list(model.species),
        "cutoff": model.cutoff,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_hash": model_hash,
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return model_hash


def detect_family(path: str | os.PathLike) -> str:
    """Model family of a file, from the class names its pickle mentions; nothing is unpickled."""
    return _identify(path) or "ltau_local"  # an unrecognised torch file: the weights_only load checks it


def _identify(path: str | os.PathLike) -> str | None:
    """The family a file positively shows (a built-in model names its format string), or None."""
    path = os.fspath(path)
    _check_is_file(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # every torch file is a zip archive or starts with a pickle
                raise FileFormatError(f"model file {path}: not a torch model file")
        return None  # a legacy (non-zip) torch file
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            metadata = [name for name in names if name.endswith(_PACKAGE_METADATA)]
            if metadata:  # a nequip-package file (torch.package): its model config is plain text
                config = metadata[0].removesuffix(_PACKAGE_METADATA) + "/model/config.yaml"
                text = archive.read(config).decode() if config in names else ""
                return "allegro" if "allegro.model." in text else "nequip"
            if path.endswith(".pt2") or any("aotinductor" in name for name in names):
                raise FileFormatError(
                    f"model file {path} is an AOTInductor package (nequip-compile --mode aotinductor): compiled "
                    f"code with fixed outputs, no per-atom features and no reachable layers, which pair_style ltau "
                    f"cannot take a latent or exact per-rank energies from; give the TorchScript archive "
                    f"(nequip-compile --mode torchscript, torch < 2.10) or the checkpoint (doc/model_files.md)")
            if any("/code/" in name for name in names):  # TorchScript: its own kinds (model.torchscript)
                return archive_kind(path)[0]
            pickles = [name for name in names if name.endswith("data.pkl")]
            if len(pickles) != 1:
                raise FileFormatError(f"model file {path}: a zip archive but not a torch file")
            stream = archive.read(pickles[0])
        strings = [arg for _, arg, _ in pickletools.genops(stream) if isinstance(arg, str)]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise FileFormatError(f"model file {path}: unreadable torch archive ({exc})") from exc
    # GLOBAL opcodes carry "module name"; STACK_GLOBAL takes its module from a preceding string.
    # A nequip checkpoint names its model builder as a string (hydra "_target_").
    if any(text.startswith("mace.") for text in strings):
        return "mace"
    if any(text.startswith("allegro.model.") for text in strings):
        return "allegro"
    if any(text.startswith("nequip.model.") for text in strings):
        return "nequip"
    return "ltau_local" if FORMAT in strings else None


def describe_file(path: str | os.PathLike) -> str:
    """What a model file is, in words (``ltau-lmp info``), from its contents; nothing is unpickled."""
    path = os.fspath(path)
    if is_torchscript(path):
        return archive_kind(path)[1]
    family = detect_family(path)
    if family in ("nequip", "allegro"):
        return f"a nequip {'package' if _is_nequip_package(path) else 'checkpoint'} ({family})"
    return {"mace": "a MACE model (a pickled Python module)"}.get(family, _DESCRIPTIONS[family])


def _check_is_file(path: str) -> None:
    """A model path that is not a file: say what it is (a directory, perhaps an estimator's)."""
    if os.path.isdir(path):
        estimator = os.path.isfile(os.path.join(path, "meta.json"))
        raise FileFormatError(f"model file {path} is a directory" + (
            ": this is an estimator directory, not a model" if estimator else ", not a model file"))
    if not os.path.isfile(path):
        raise FileFormatError(f"model file {path}: no such file")


def _other_family(path: str, family: str) -> None:
    """Refuse a file that positively belongs to another family than the one asked for (nequip and
    allegro share a loader)."""
    detected = _identify(path)
    if detected not in (None, family) and {detected, family} != {"nequip", "allegro"}:
        raise FileFormatError(f"model file {path} is {_DESCRIPTIONS[detected]} (detected family {detected}), "
                              f"not {_DESCRIPTIONS[family]}")


_DESCRIPTIONS = {"ltau_local": "an ltau_lmp built-in model", "mace": "a MACE model",
                 "nequip": "a nequip model", "allegro": "an Allegro model", "metatomic": "a metatomic model"}


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", family: str | None = None,
               allow_pickle: bool = False) -> torch.nn.Module:
    """Load a force field of any supported family; the result honours the forward contract and has ``.card``.

    ``family`` (one of ``FAMILIES``) replaces the detection for a file that shows no family (a file
    that shows another one is refused). A MACE or nequip file is unpickled only
    with ``allow_pickle=True``; otherwise ``PickleRefusedError`` names the option. Every other defect
    raises ``FileFormatError`` naming the file.
    """
    path = os.fspath(path)
    if family is None:
        family = detect_family(path)
    elif family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    else:
        _other_family(path, family)
    if is_torchscript(path):  # runs no pickled Python: no opt-in needed
        return load_archive(path, map_location)
    if family == "mace":
        return _load_mace(path, map_location, allow_pickle)
    if family in ("nequip", "allegro"):
        return _load_nequip(path, map_location, allow_pickle)
    return _load_local(path, map_location)


def _is_nequip_package(path: str) -> bool:
    """A ``nequip-package`` file (a torch.package zip holding ``<name>/model/package_metadata.txt``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(_PACKAGE_METADATA) for name in archive.namelist())


# A nequip checkpoint is rebuilt without unpickling (torch.load weights_only=True, then the model
# builder its config names) when every callable the config names is one of these, and its training
# module is one whose evaluation model is known (value: it evaluates with EMA weights).
_NEQUIP_BUILDERS = frozenset({
    "nequip.model.NequIPGNNModel", "nequip.model.PresetNequIPGNNModel", "nequip.model.FullNequIPGNNModel",
    "allegro.model.AllegroModel", "allegro.model.FullAllegroModel"})
_NEQUIP_PARTS = frozenset({
    "allegro.nn.TwoBodyBesselScalarEmbed", "allegro.nn.TwoBodySplineScalarEmbed",
    "nequip.nn.pair_potential.ZBL", "nequip.nn.pair_potential.LennardJones",
    "nequip.nn.pair_potential.SimpleLennardJones"})
_NEQUIP_TRAINING_MODULES = {"nequip.train.NequIPLightningModule": False, "nequip.train.EMALightningModule": True}


def _targets(config) -> list[str]:
    """Every hydra ``_target_`` in a nested config (dicts and lists)."""
    if isinstance(config, dict):
        own = [config["_target_"]] if "_target_" in config else []
        return own + [t for key, value in config.items() if key != "_target_" for t in _targets(value)]
    if isinstance(config, (list, tuple)):
        return [t for value in config for t in _targets(value)]
    return []


def _nequip_checkpoint(path: str):
    """(GraphModel, "") rebuilt from a nequip checkpoint without unpickling, or (None, why not)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        hyper = payload["hyper_parameters"]
        config, training_module = dict(hyper["model"]), hyper["info_dict"]["training_module"]["_target_"]
        state = payload["state_dict"]
    except Exception as exc:  # not loadable without unpickling, or not nequip's layout
        return None, f"it does not load with weights_only=True ({type(exc).__name__})"
    if training_module not in _NEQUIP_TRAINING_MODULES:
        return None, f"its training module {training_module} is not one ltau_lmp rebuilds"
    builder, parts = config.pop("_target_", None), _targets(config)
    unknown = [t for t in [builder] if t not in _NEQUIP_BUILDERS] + [t for t in parts if t not in _NEQUIP_PARTS]
    if unknown:
        return None, f"its model config names {', '.join(map(str, unknown))}, not a model part ltau_lmp rebuilds"
    from hydra.utils import get_method

    try:
        model = get_method(builder)(**config, compile_mode="eager")
        model.load_state_dict(model_state(state))
        extra = state.get("ema._extra_state")
        swapped = isinstance(extra, dict) and not extra.get("is_holding_ema_weights", True)
        # EMAWeights: ema_weight_i is parameter i's average (unless saved with the two swapped)
        if _NEQUIP_TRAINING_MODULES[training_module] and not swapped:
            with torch.no_grad():
                for i, parameter in enumerate(model.parameters()):
                    parameter.copy_(state[f"ema.ema_weight_{i}"])
    except Exception as exc:  # the builder or the weights do not fit the config
        raise FileFormatError(f"model file {path}: rebuilding the nequip model from the checkpoint failed "
                              f"({type(exc).__name__}: {exc})") from exc
    return model, ""


def _load_nequip(path: str, map_location, allow_pickle: bool) -> torch.nn.Module:
    """A nequip checkpoint without unpickling where possible; otherwise (and for packages) only with
    ``allow_pickle``, through nequip's own loader."""
    from ltau_lmp.model.nequip import NequIPForceField

    try:
        from nequip.model.saved_models.load_utils import load_saved_model
        from nequip.utils.global_state import global_state_initialized, set_global_state
    except ImportError as exc:
        raise LTAUError(f"model file {path} is a nequip model but nequip is not installed "
                        f"(pip install 'ltau-lmp[nequip]'): {exc}") from exc
    if not global_state_initialized():
        set_global_state()  # nequip's model builders refuse to run before it (dtype and TF32 defaults)
    package = _is_nequip_package(path)
    module, why = (None, "") if package else _nequip_checkpoint(path)
    if module is None:
        if not allow_pickle:
            what = ("package: nequip's loader unpickles it and runs the Python code stored in it" if package else
                    f"checkpoint that ltau_lmp cannot rebuild without unpickling ({why}): nequip's loader unpickles it")
            raise PickleRefusedError(f"model file {path} is a nequip {what}. Load it only if you trust its source, "
                                     f"with {TRUST_OPTIONS}")
        if package and not path.endswith(".nequip.zip"):
            raise FileFormatError(f"model file {path} is a nequip package: nequip loads packages only from files "
                                  f"named *.nequip.zip; rename it")
        try:
            module = load_saved_model(path)
        except Exception as exc:  # arbitrary code ran: report whatever it raised
            raise FileFormatError(f"model file {path}: nequip could not load it ({type(exc).__name__}: {exc})") from exc
    try:  # the card's family (nequip or allegro) is the model's own, whichever of the two was named
        return NequIPForceField(module.eval()).to(map_location)
    except ConfigError as exc:
        raise FileFormatError(f"model file {path}: {exc}") from exc


def _load_mace(path: str, map_location, allow_pickle: bool) -> torch.nn.Module:
    if not allow_pickle:
        raise PickleRefusedError(
            f"model file {path} is a MACE model, a pickled Python module: loading it runs code stored "
            f"in the file. Load it only if you trust its source, with {TRUST_OPTIONS}")
    from ltau_lmp.model.mace import MACEForceField, import_mace

    try:
        import_mace()  # the classes the pickle names
    except ImportError as exc:
        raise LTAUError(f"model file {path} is a MACE model but mace-torch is not installed "
                        f"(pip install 'ltau-lmp[mace]'): {exc}") from exc
    try:
        module = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # arbitrary code ran: report whatever it raised
        raise FileFormatError(f"model file {path}: unpickling the MACE model failed "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(module, torch.nn.Module):
        raise FileFormatError(f"model file {path}: expected a pickled MACE module, found {type(module).__name__}")
    try:
        return MACEForceField(module)
    except ConfigError as exc:
        raise FileFormatError(f"model file {path}: {exc}") from exc


def _load_local(path: str, map_location) -> LocalForceField:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types; its text would advise weights_only=False
        raise FileFormatError(f"model file {path}: not an ltau_lmp model file (corrupt, truncated, or holding "
                              f"objects other than tensors; torch: {type(exc).__name__})") from exc
    if not isinstance(payload, dict):
        raise FileFormatError(f"model file {path}: not an ltau_lmp model file (it holds a "
                              f"{type(payload).__name__}, not a dict)")
    if {"model", "optimizer"} <= payload.keys() and "format" not in payload:
        raise FileFormatError(f"model file {path} is a training checkpoint (weights without the "
                              f"architecture); give the model file (e.g. MACE's NAME.model)")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise FileFormatError(f"model file {path}: not an ltau_lmp model file (missing key(s) {', '.join(missing)})")
    if payload["format"] != FORMAT:
        raise FileFormatError(f"model file {path}: format {payload['format']!r}, expected {FORMAT!r}")
    if payload["version"] != VERSION:
        raise FileFormatError(f"model file {path}: format version {payload['version']!r} is not "
                              f"supported (this ltau_lmp reads version {VERSION})")
    try:
        model = LocalForceField(**payload["config"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (TypeError, ConfigError, RuntimeError) as exc:
        raise FileFormatError(f"model file {path}: inconsistent config or weights ({exc})") from exc
    if model.model_hash != payload["model_hash"]:
        raise FileFormatError(f"model file {path}: content hash mismatch (weights corrupted or edited)")
    return model.to(map_location)
