"""Neighbour lists for ASE structures (via vesin, O(N)) and species-index mapping."""

from __future__ import annotations

import numpy as np
import vesin
from ase import Atoms

from ltau_lmp.errors import LTAUError


def neighbor_list(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full directed pair list (every i -> j and j -> i) of ``atoms`` within ``cutoff``.

    Returns ``centers`` (E,) int64, ``neighbors`` (E,) int64 and Cartesian ``shifts`` (E, 3)
    float64 with r_ij = positions[j] - positions[i] + shift. Periodic images are separate pairs,
    so cells smaller than 2 x cutoff (an atom seeing several images of one neighbour, or its own
    images) are handled; non-periodic directions need no cell.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if pbc.any():
        lengths = np.linalg.norm(cell, axis=1)
        if np.any(lengths[pbc] == 0.0) or (pbc.all() and abs(np.linalg.det(cell)) < 1e-12):
            raise LTAUError(f"periodic structure {atoms.get_chemical_formula()} has a degenerate cell "
                            f"(cell lengths {lengths.tolist()}, pbc {pbc.tolist()})")
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, s = calculator.compute(positions, cell, pbc.tolist(), quantities="ijS")
    shifts = s.astype(np.float64) @ cell
    return i.astype(np.int64), j.astype(np.int64), shifts


def species_indices(atoms: Atoms, species: list[str]) -> np.ndarray:
    """Map the chemical symbols of ``atoms`` to indices into a model's ``species`` list."""
    index = {symbol: k for k, symbol in enumerate(species)}
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - index.keys())
    if unknown:
        raise LTAUError(f"element(s) {', '.join(unknown)} not known to the model "
                        f"(model species: {', '.join(species)})")
    return np.fromiter((index[s] for s in symbols), dtype=np.int64, count=len(symbols))
