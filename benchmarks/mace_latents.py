"""Production-size MACE latents for the estimator benchmarks: 256 or 512 dimensions, many distinct atoms.

A randomly initialised MACE of the size people run (``--channels`` 128, L = 1, 2 interactions:
128 invariant channels per layer, 256-dimensional latents; 256 channels: 512) evaluated on
silicon cells of varied density (±4 % lattice strain), rattle (0.02 - 0.30 A) and vacancies:
the distinct environments of an MD training set. Training and held-out structures come from
different seeds, so held-out atoms are new structures, as a validation set's are.

    python benchmarks/mace_latents.py --channels 128 --structures 400 --held-out 20

writes (cached) ``{cache}/mace{dim}_train.npy``, ``..._structures.npy`` (the structure of each
training atom) and ``..._heldout.npy``; ``latent_pool`` returns them to the other benchmarks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

CACHE = Path("/tmp/ltau_bench_pool")
CELLS = 4  # 4^3 cubic diamond cells: 512 atoms per structure


def random_mace(channels: int, path: Path, l_max: int = 1, r_max: float = 5.0, double: bool = False) -> Path:
    """A random ScaleShiftMACE, 2 interactions, saved once: ``channels`` x (0e + 1o), r_max 5 A,
    float32 by default (production size); ``random_mace(16, path, l_max=0, r_max=4.0, double=True)``
    is the example's small MACE."""
    import numpy as np
    import torch
    from mace import modules  # before e3nn: mace lets e3nn 0.4.4 load its constants with torch >= 2.6
    from e3nn import o3

    if not path.is_file():
        torch.manual_seed(0)
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        hidden = "+".join(f"{channels}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(l_max + 1))
        model = modules.ScaleShiftMACE(
            r_max=r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=3, interaction_cls=block,
            interaction_cls_first=block, num_interactions=2, num_elements=1,
            hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.array([-4.0]), avg_num_neighbors=16.0, atomic_numbers=[14],
            correlation=3, gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64],
            atomic_inter_scale=1.0, atomic_inter_shift=0.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.double() if double else model.float(), path)
    return path


def structures(n: int, seed: int):
    """Si cells of 512 sites: strain, rattle and (every third cell) a few vacancies vary per cell."""
    import numpy as np
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    for _ in range(n):
        atoms = bulk("Si", "diamond", a=5.431 * (1 + rng.uniform(-0.04, 0.04)), cubic=True) * ((CELLS,) * 3)
        atoms.positions += rng.normal(0, rng.uniform(0.02, 0.30), atoms.positions.shape)
        if rng.random() < 1 / 3:
            del atoms[rng.choice(len(atoms), rng.integers(1, 6), replace=False).tolist()]
        yield atoms


def atom_latents(model, atoms):
    """The model's latent features of one structure (float32), in the model's own dtype."""
    import numpy as np
    import torch

    from ltau_lmp.model import evaluate, neighbor_list, species_indices

    dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else torch.float64
    c, n, s = neighbor_list(atoms, model.card.cutoff)
    res = evaluate(model, torch.tensor(atoms.positions, dtype=dtype),
                   torch.from_numpy(species_indices(atoms, list(model.card.species))),
                   torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms), forces=False)
    return res.latent.detach().numpy().astype(np.float32)


def latents(model, frames) -> list:
    from tqdm.auto import tqdm

    return [atom_latents(model, atoms) for atoms in tqdm(list(frames), desc="MACE latents", unit="structure")]


def latent_pool(channels: int = 128, n_structures: int = 400, n_held_out: int = 20, cache: Path = CACHE):
    """(training latents, their structure ids, held-out latents, model file), computed once and cached."""
    import numpy as np

    from ltau_lmp.model import load_model

    model_file = random_mace(channels, cache / f"random_mace_{channels}.model")
    dim = 2 * channels
    files = [cache / f"mace{dim}_{part}_{n_structures}_{n_held_out}.npy" for part in ("train", "structures", "heldout")]
    if not all(f.is_file() for f in files):
        model = load_model(model_file, family="mace", allow_pickle=True)  # our own file, written above
        train = latents(model, structures(n_structures, seed=1))
        held = latents(model, structures(n_held_out, seed=2))
        np.save(files[0], np.concatenate(train))
        np.save(files[1], np.repeat(np.arange(len(train)), [len(t) for t in train]))
        np.save(files[2], np.concatenate(held))
    return (*(np.load(f) for f in files), model_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=128, help="invariant channels per layer (latent dim = 2x)")
    ap.add_argument("--structures", type=int, default=400, help="training structures (512 sites each)")
    ap.add_argument("--held-out", type=int, default=20, help="held-out structures")
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    train, groups, held, model = latent_pool(args.channels, args.structures, args.held_out, args.cache)
    print(f"{model}: {train.shape[0]} training atoms in {groups.max() + 1} structures, "
          f"{held.shape[0]} held-out atoms, {train.shape[1]} dimensions")


if __name__ == "__main__":
    main()
