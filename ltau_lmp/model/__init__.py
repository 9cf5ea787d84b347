"""Force fields behind one contract: the built-in local model, the MACE and NequIP/Allegro adapters,
files, neighbour lists.

Contract (``ltau_lmp.model.contract``; doc/architecture.md)::

    atom_energy, latent = model(positions, species, centers, neighbors, shifts, n_local)
    model.card   # ModelCard: family, species, cutoff, receptive field, latent, dtype, units, hash

Every model is a ``ForceField`` (card built once, ghost-exchange relay, trainable module, epoch
checkpoints). ``evaluate`` is the one force formulation (per-pair offset gradient: forces on all
atoms, ghosts included, and the virials), used by the ASE calculator, the trainer, replay and the
LAMMPS runtime. ``load_model`` reads any supported family (``MACEForceField`` /
``NequIPForceField`` import mace-torch / nequip only when a model is wrapped).
"""

from ltau_lmp.model.card import ModelCard
from ltau_lmp.model.contract import ForceField, ModelOutput, evaluate
from ltau_lmp.model.io import FAMILIES, PickleRefusedError, detect_family, load_model, save_model
from ltau_lmp.model.local import LocalForceField
from ltau_lmp.model.mace import MACEForceField
from ltau_lmp.model.nequip import NequIPForceField
from ltau_lmp.model.neighbors import neighbor_list, species_indices

__all__ = ["FAMILIES", "ForceField", "LocalForceField", "MACEForceField", "ModelCard", "ModelOutput",
           "NequIPForceField", "PickleRefusedError", "detect_family", "evaluate", "load_model", "save_model",
           "neighbor_list", "species_indices"]
