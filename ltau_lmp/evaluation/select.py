"""``ltau-lmp select``: frames from ``fix ltau`` dumps worth labelling next (active learning).

The most uncertain frames of one excursion are usually near-copies of each other. Selection
therefore takes the frames with the highest predicted error as a pool and picks from it
greedily by farthest-point sampling in latent space (frame fingerprint = mean latent vector
of its most uncertain atoms), starting from the most uncertain frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltau_lmp.errors import ConfigError, FileFormatError

SCORE_ARRAY = "ltau_expected"


def read_dumps(paths) -> list:
    """All frames of ``fix ltau`` dump files, each tagged with its source and index."""
    from ltau_lmp.data.datasets import read_extxyz

    frames = []
    for path in paths:
        for i, atoms in enumerate(read_extxyz(path, "dump file")):
            if SCORE_ARRAY not in atoms.arrays:
                raise FileFormatError(f"{path}: frame {i} has no per-atom {SCORE_ARRAY} (not a fix ltau dump?)")
            atoms.info["source"] = f"{path}:{i}"
            frames.append(atoms)
    if not frames:
        raise FileFormatError("the dump files hold no frames")
    return frames


def frame_fingerprints(model, frames, top_atoms: int = 16) -> np.ndarray:
    """Mean latent vector (``model``'s, through ``ltau_lmp.prediction``) of each frame's ``top_atoms``
    most uncertain atoms."""
    from ltau_lmp.prediction import predict_frames

    latent = predict_frames(model, frames, forces=False).latent
    starts = np.cumsum([0] + [len(atoms) for atoms in frames])
    prints = []
    for atoms, start in zip(frames, starts):
        worst = np.argsort(atoms.arrays[SCORE_ARRAY])[::-1][:top_atoms]
        prints.append(latent[start + worst].mean(axis=0))
    return np.asarray(prints)


def candidate_pool(scores: np.ndarray, n: int, pool_factor: int = 4) -> np.ndarray:
    """Indices of the ``n * pool_factor`` highest-scoring frames, most uncertain first."""
    if n < 1:
        raise ConfigError(f"number of frames must be >= 1, got {n}")
    return np.argsort(scores)[::-1][: max(n, n * pool_factor)]


def farthest_point_order(fingerprints: np.ndarray, n: int) -> list[int]:
    """Greedy farthest-point sampling of ``n`` rows, starting from row 0; it stops early when only
    rows identical to chosen ones are left (labelling a frame twice teaches nothing)."""
    chosen = [0]
    gap = np.linalg.norm(fingerprints - fingerprints[0], axis=1)
    while len(chosen) < min(n, len(fingerprints)):
        nxt = int(np.argmax(gap))
        if gap[nxt] <= 0:
            break
        chosen.append(nxt)
        gap = np.minimum(gap, np.linalg.norm(fingerprints - fingerprints[nxt], axis=1))
    return chosen


def select_frames(scores: np.ndarray, fingerprints_of, n: int, pool_factor: int = 4) -> list[int]:
    """Farthest-point sampling among the ``n * pool_factor`` highest-scoring frames.

    ``fingerprints_of(pool)`` gives the fingerprints of the frames ``pool`` only: they cost a model
    call per frame, so the frames outside the pool are never fingerprinted.
    """
    pool = candidate_pool(scores, n, pool_factor)
    return [int(pool[i]) for i in farthest_point_order(fingerprints_of(pool), n)]


def run_selection(dump_paths, model, n: int, out_path, pool_factor: int = 4, overwrite: bool = False) -> list:
    """Select ``n`` frames (all of them when the dumps hold fewer) and write them as unlabelled
    extxyz ready for reference calculations.

    ``model``: the model that ran the simulation, loaded (any family). ``out_path`` is written as a
    temporary sibling renamed at the end; an existing file is replaced only when it is an earlier
    selection and ``overwrite`` is given (checked before any work).
    """
    from ase import Atoms
    from ase.io import write

    from ltau_lmp.outputs import check_file, output_file

    check_file(out_path, "select", overwrite, earlier_selection)
    frames = read_dumps(dump_paths)
    scores = np.array([atoms.arrays[SCORE_ARRAY].max() for atoms in frames])
    picked = select_frames(scores, lambda pool: frame_fingerprints(model, [frames[i] for i in pool]), n,
                           pool_factor)
    out = []
    for i in picked:
        src = frames[i]
        atoms = Atoms(symbols=src.get_chemical_symbols(), positions=src.positions, cell=src.cell, pbc=src.pbc)
        for key in ("tag", SCORE_ARRAY, "ltau_ci_high", "ltau_knn_distance"):
            if key in src.arrays:
                atoms.arrays[key] = src.arrays[key]
        atoms.info.update({"source": src.info["source"], "timestep": src.info.get("timestep", -1),
                           "ltau_max": float(scores[i])})
        out.append(atoms)
    with output_file(out_path, "select", overwrite, earlier_selection) as tmp:
        write(tmp, out, format="extxyz")
    return out


def earlier_selection(path: Path) -> bool:
    """An extxyz whose first frame carries the ``ltau_max`` that ``run_selection`` writes."""
    from ltau_lmp.outputs import head_contains

    return head_contains("ltau_max=")(path)
