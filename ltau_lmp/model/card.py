"""``ModelCard``: what a loadable force field declares about itself, as data.

Every model ``load_model`` returns carries a ``.card``. The LAMMPS runtime, the estimator
metadata, the ASE calculator and ``ltau-lmp info`` read it instead of probing attributes, so a
new model family plugs in by filling one record (the idea of metatomic's ``ModelCapabilities``).

The fields that matter for correctness across MPI ranks are ``cutoff`` and
``receptive_field``: an atom's energy depends on atoms up to ``receptive_field`` away, so ghost
atoms must reach that far; with ``num_layers > 1`` (message passing) the model also needs the
pairs centred on ghost atoms (a graph over local *and* ghost atoms), while a strictly local model
(``num_layers == 1``) takes only pairs centred on local atoms. A message-passing model that
declares ``ghost_exchange`` can instead run on one cutoff of ghosts and pairs centred on local
atoms, refreshing ghost node features from their owners after each layer (``exchange=``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from ase.data import atomic_numbers

from ltau_lmp.errors import ConfigError

DTYPES = ("float64", "float32")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelCard:
    """The declared contract of one force field (see doc/architecture.md, "Model contract").

    family: model family, the loader that reads its files ("ltau_local", "mace").
    species: chemical symbols; a species index (the model's ``species`` input) is a position here.
    cutoff: interaction cutoff of one layer (Å); pairs at r >= cutoff contribute nothing.
    num_layers: message-passing layers (1 for a strictly local model).
    receptive_field: how far an atom's energy reaches (Å) = cutoff x num_layers; ghost atoms
        must extend at least this far for exact forces on a subdomain.
    latent_dim: width of the per-atom latent vector the LTAU estimator searches.
    latent: what the latent vector is, in words (reported by ``ltau-lmp info``).
    dtype: "float64" or "float32", the dtype the model computes in.
    model_hash: sha256 (hex) over the architecture and every weight; an estimator built from
        this model's latents records it, and ``fix ltau`` refuses an estimator of another model.
    energy_unit, length_unit: units of the outputs and inputs (LAMMPS ``metal``: eV, Angstrom).
    ghost_exchange: the forward takes ``exchange=`` and applies it to the node features before
        every layer after the first (doc/architecture.md, "Model contract"), so one cutoff of
        ghosts suffices across MPI ranks.
    """

    family: str
    species: tuple[str, ...]
    cutoff: float
    num_layers: int
    receptive_field: float
    latent_dim: int
    latent: str
    dtype: str
    model_hash: str
    energy_unit: str = "eV"
    length_unit: str = "Angstrom"
    ghost_exchange: bool = False

    def __post_init__(self):
        # Normalise sequences to a tuple so cards compare equal however they were built.
        object.__setattr__(self, "species", tuple(self.species))
        if not self.family:
            raise ConfigError("model card: family must be a non-empty string")
        if not self.species or len(set(self.species)) != len(self.species):
            raise ConfigError(f"model card: species must be distinct chemical symbols, got {list(self.species)}")
        unknown = [s for s in self.species if s not in atomic_numbers]
        if unknown:
            raise ConfigError(f"model card: unknown chemical symbol(s) {unknown}")
        if not (self.cutoff > 0 and math.isfinite(self.cutoff)):
            raise ConfigError(f"model card: cutoff must be a positive length, got {self.cutoff}")
        if int(self.num_layers) < 1:
            raise ConfigError(f"model card: num_layers must be >= 1, got {self.num_layers}")
        if not math.isclose(self.receptive_field, self.cutoff * self.num_layers, rel_tol=1e-12):
            raise ConfigError(f"model card: receptive_field {self.receptive_field} != cutoff {self.cutoff} "
                              f"x num_layers {self.num_layers}")
        if int(self.latent_dim) < 1:
            raise ConfigError(f"model card: latent_dim must be >= 1, got {self.latent_dim}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model card: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not _SHA256.fullmatch(self.model_hash):
            raise ConfigError(f"model card: model_hash must be a sha256 hex digest, got {self.model_hash!r}")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (species as a list), for ``ltau-lmp info`` and metadata files."""
        out = asdict(self)
        out["species"] = list(self.species)
        return out


def hash_state(h, state_dict: dict[str, torch.Tensor]) -> str:
    """Feed every tensor of ``state_dict`` (sorted by key: name, dtype, shape, raw bytes) into the
    hashlib object ``h`` and return its hex digest; callers first feed their architecture."""
    for key, value in sorted(state_dict.items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()
