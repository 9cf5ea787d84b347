"""The TorchScript archive fixtures (tests/data/archives, made by the make_* scripts there with the
packages' own tools) and their own documented forward, the reference of the archive tests."""

from pathlib import Path

import numpy as np
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

ARCHIVES = Path(__file__).resolve().parents[1] / "data" / "archives"
# one Si data file behind pair_style ltau with a model file; the tests append their commands
SI_HEADER = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
mass            1 28.0855
pair_style      ltau
pair_coeff      * * {model} Si
"""


def cell(seed=0, strain=True):
    """64 atoms of rattled diamond Si, strained (triclinic: no symmetry left) unless ``strain`` is
    False (orthorhombic: LAMMPS keeps the axes, so forces compare without a rotation)."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    if strain:
        atoms.set_cell(atoms.cell @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))), scale_atoms=True)
    atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
    atoms.wrap()
    return atoms


def own_forward(model, atoms):
    """The archive's own documented call on a periodic cell: (energy, forces, virial 3x3, per-atom
    features the archive outputs), as pair_nequip / pair_style mace call it."""
    archive, dtype = model.archive, getattr(torch, model.card.dtype)
    i, j, shifts = ase_neighbor_list("ijS", atoms, model.card.cutoff)
    pos = torch.tensor(atoms.positions, dtype=dtype)
    cell_t = torch.tensor(atoms.cell.array, dtype=dtype)
    n = len(atoms)
    if model.card.family in ("nequip", "allegro"):
        out = archive({"pos": pos, "edge_index": torch.tensor(np.stack([i, j])), "atom_types": torch.zeros(n, dtype=torch.long),
                       "cell": cell_t, "edge_cell_shift": torch.tensor(shifts, dtype=dtype)})
        if model.card.family == "nequip":
            features = out["node_features"]
        else:  # Allegro: its scalar edge features summed over the pairs each atom centres
            features = torch.zeros(n, out["edge_features"].shape[1], dtype=out["edge_features"].dtype)
            features.index_add_(0, torch.tensor(i), out["edge_features"])
        virial = out["virial"].view(3, 3) if "virial" in out else None  # nequip 0.5 archives: forces only
        return float(out["total_energy"].detach().sum()), out["forces"], virial, features
    unit = torch.tensor(shifts, dtype=dtype)
    data = {"positions": pos, "edge_index": torch.tensor(np.stack([i, j])), "shifts": unit @ cell_t, "unit_shifts": unit,
            "cell": cell_t, "node_attrs": torch.ones(n, 1, dtype=dtype), "batch": torch.zeros(n, dtype=torch.long),
            "ptr": torch.tensor([0, n])}
    inner = archive.model if hasattr(archive, "model") else archive
    feats = inner(dict(data, positions=pos.clone()), training=False, compute_force=False)["node_feats"].detach()
    if hasattr(archive, "model"):  # LAMMPS_MACE: pair_style mace's call
        out = archive(data, torch.ones(n, dtype=dtype), compute_virials=True)
        energy, forces, virial = float(out["total_energy_local"].detach().sum()), out["forces"], out["virials"].view(3, 3)
    else:
        out = archive(data, training=False, compute_force=True, compute_virials=True)
        energy, forces, virial = float(out["energy"].detach().sum()), out["forces"], out["virials"].view(3, 3)
    f = feats.shape[1] // 5  # these fixtures: 8x0e+8x1o (32 = 4 F) then 8x0e: invariants of both layers
    return energy, forces, virial, torch.cat([feats[:, :f], feats[:, 4 * f:]], dim=1)


