"""Model file: one ``torch.save`` of a plain dict (no pickled classes), loaded with weights_only."""

from __future__ import annotations

import os

import torch

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.model.local import LocalForceField

FORMAT = "ltau_lmp.model.local"
VERSION = 1
_KEYS = ("format", "version", "config", "state_dict", "model_hash")


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


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LocalForceField:
    """Read a model written by ``save_model``; every defect raises ``FileFormatError`` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"model file {path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise FileFormatError(f"model file {path}: not a readable torch file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict):
        raise FileFormatError(f"model file {path}: expected a dict, found {type(payload).__name__}")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise FileFormatError(f"model file {path}: missing key(s) {', '.join(missing)}")
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
