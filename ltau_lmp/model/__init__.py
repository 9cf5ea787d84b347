"""The strictly local torch force field, its file format and neighbour lists.

Contract (see doc/architecture.md)::

    atom_energy, latent = model(positions, species, centers, neighbors, shifts, n_local)

``evaluate`` adds forces (all atoms, ghosts included) and the virial; the ASE calculator, the
trainer and the LAMMPS runtime all go through it.
"""

from ltau_lmp.model.io import load_model, save_model
from ltau_lmp.model.local import LocalForceField, ModelOutput, evaluate
from ltau_lmp.model.neighbors import neighbor_list, species_indices

__all__ = ["LocalForceField", "ModelOutput", "evaluate", "load_model", "save_model",
           "neighbor_list", "species_indices"]
