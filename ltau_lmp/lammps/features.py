"""What ``pair_style ltau`` publishes for ``fix ltau``: the declared pair -> fix hand-off.

The pair runtime (:mod:`ltau_lmp.lammps.pair`) owns one :class:`PairFeatures` and fills it;
the fix (:mod:`ltau_lmp.lammps.fix`) reads it and nothing else of the pair. Forces, types and
positions reach the fix through its own argument struct (``ltau_fix_step_args``).
"""

from __future__ import annotations

import numpy as np


class PairFeatures:
    """The model and the latest force call's latent features of this rank's local atoms.

    Set at ``pair_coeff`` (:meth:`configure`): ``card``, the model's ``ModelCard``, and
    ``type_symbols``, the chemical symbol of each LAMMPS atom type (index = type; 0 unused).
    Set at every force call (:meth:`publish`), in LAMMPS's local order: ``step`` (timestep of
    the last force call, -1 before the first), ``tags`` (nlocal,) int32 copy and ``latent``
    (nlocal, latent_dim) float32, converted from the model's tensor on first access.
    """

    def __init__(self) -> None:
        self.card = None
        self.type_symbols = np.empty(0, dtype="<U2")
        self.step = -1
        self.tags = np.empty(0, np.int32)
        self._latent = None

    def configure(self, card, elements: list[str]) -> None:
        """A model and the element of each atom type 1..ntypes (``pair_coeff * * MODEL El1 ...``)."""
        self.card = card
        self.type_symbols = np.array([""] + list(elements))
        self.publish(-1, np.empty(0, np.int32), None)

    def publish(self, step: int, tags: np.ndarray, latent) -> None:
        """One force call's local atoms: their tags (copied) and latents (a tensor or None)."""
        self.step, self.tags, self._latent = step, np.array(tags, dtype=np.int32), latent

    @property
    def latent(self) -> np.ndarray:
        """(nlocal, latent_dim) float32 descriptors of the local atoms."""
        if self._latent is None:
            return np.empty((len(self.tags), 0), np.float32)
        if not isinstance(self._latent, np.ndarray):
            self._latent = self._latent.detach().float().cpu().numpy()
        return self._latent

    def symbols(self, types: np.ndarray) -> np.ndarray:
        """The chemical symbol of atoms of LAMMPS ``types``."""
        return self.type_symbols[types]
