"""Labelled extxyz frames as tensors: neighbour lists computed once, batches with global atom ids.

A batch concatenates several structures into one graph (atom indices offset per structure), so
one model call handles them all.  Every atom keeps a stable global id — its index in the
concatenated data set — whatever the batch composition or order; the trainer's per-atom error
log is keyed by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ltau_lmp.errors import FileFormatError


def read_extxyz(path: str | Path, what: str = "data file") -> list[Atoms]:
    """All frames of an extxyz file, or a ``FileFormatError`` naming the file (``what`` it is for)."""
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} {str(path)!r} not found")
    try:
        return read(path, index=":", format="extxyz")
    except Exception as exc:  # ase raises many types for malformed files
        raise FileFormatError(f"{path}: not a readable extxyz file ({type(exc).__name__}: {exc})") from exc


def read_frames(path: str | Path) -> list[Atoms]:
    """All frames of an extxyz file; each must carry energy and forces labels."""
    frames = read_extxyz(path)
    if not frames:
        raise FileFormatError(f"{path}: no frames")
    for k, atoms in enumerate(frames):
        if atoms.calc is None or "energy" not in atoms.calc.results or "forces" not in atoms.calc.results:
            raise FileFormatError(f"{path}: frame {k} lacks energy or forces labels")
    return frames


@dataclass
class Batch:
    """Several structures as one graph (tensors; ``n_local`` = all atoms of the batch)."""

    positions: torch.Tensor  # (N, 3)
    species: torch.Tensor  # (N,) int64 indices into the model's species list
    centers: torch.Tensor  # (E,) int64
    neighbors: torch.Tensor  # (E,) int64
    shifts: torch.Tensor  # (E, 3)
    structure: torch.Tensor  # (N,) int64 structure of each atom, 0..B-1
    n_atoms: torch.Tensor  # (B,) atoms per structure
    energy: torch.Tensor  # (B,) reference energies
    forces: torch.Tensor  # (N, 3) reference forces
    atom_ids: np.ndarray  # (N,) int64 global atom ids in the data set

    @property
    def n_local(self) -> int:
        return len(self.positions)

    def structure_energy(self, atom_energy: torch.Tensor) -> torch.Tensor:
        """Sum per-atom energies into per-structure energies."""
        return atom_energy.new_zeros(len(self.n_atoms)).index_add(0, self.structure, atom_energy)


class AtomsDataset:
    """Structures with their neighbour lists (computed once, at construction) and labels."""

    def __init__(self, frames: list[Atoms], species: list[str], cutoff: float,
                 dtype: torch.dtype = torch.float64):
        from ltau_lmp.model import neighbor_list, species_indices

        self.frames = frames
        self.species = list(species)
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self._items = []
        for atoms in frames:
            centers, neighbors, shifts = neighbor_list(atoms, cutoff)
            self._items.append((
                torch.as_tensor(atoms.positions, dtype=dtype),
                torch.as_tensor(species_indices(atoms, self.species)),
                torch.as_tensor(centers),
                torch.as_tensor(neighbors),
                torch.as_tensor(shifts, dtype=dtype),
                float(atoms.get_potential_energy()),
                torch.as_tensor(atoms.get_forces(), dtype=dtype),
            ))
        self.n_atoms = np.array([len(a) for a in frames], dtype=np.int64)
        self.atom_offsets = np.concatenate([[0], np.cumsum(self.n_atoms)])

    def __len__(self) -> int:
        return len(self._items)

    @property
    def total_atoms(self) -> int:
        return int(self.atom_offsets[-1])

    def batch(self, indices) -> Batch:
        """Structures ``indices`` (any order) as one graph."""
        parts = [self._items[i] for i in indices]
        sizes = [len(p[0]) for p in parts]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return Batch(
            positions=torch.cat([p[0] for p in parts]),
            species=torch.cat([p[1] for p in parts]),
            centers=torch.cat([p[2] + o for p, o in zip(parts, offsets)]),
            neighbors=torch.cat([p[3] + o for p, o in zip(parts, offsets)]),
            shifts=torch.cat([p[4] for p in parts]),
            structure=torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(sizes)),
            n_atoms=torch.tensor(sizes, dtype=self.dtype),
            energy=torch.tensor([p[5] for p in parts], dtype=self.dtype),
            forces=torch.cat([p[6] for p in parts]),
            atom_ids=np.concatenate([np.arange(self.atom_offsets[i], self.atom_offsets[i + 1])
                                     for i in indices]),
        )

    def batches(self, batch_size: int, order=None):
        """Batches of ``batch_size`` structures following ``order`` (default: file order)."""
        order = np.arange(len(self)) if order is None else np.asarray(order)
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start:start + batch_size])
