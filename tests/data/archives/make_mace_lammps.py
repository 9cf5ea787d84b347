"""Regenerate the MACE TorchScript fixtures of this folder (issue 24):

    mace_si.model-lammps.pt   what ``mace_create_lammps_model`` writes for ``pair_style mace`` (LAMMPS_MACE)
    mace_si_compiled.model    what ``mace_run_train`` writes next to ``mace_si.model`` (scripted ScaleShiftMACE)

Both from one tiny ScaleShiftMACE (8 channels, max_L 1, max_ell 2, correlation 2, r_max 4 A,
2 interactions), float64. Run with the main environment (mace-torch 0.3.16, torch 2.13), from anywhere:

    .venv/bin/python tests/data/archives/make_mace_lammps.py

What it does, with MACE's own command-line tools only: labels 12 rattled 8-atom diamond Si cells
with Stillinger-Weber (LAMMPS, ltau_lmp.data.reference), trains 6 epochs with ``mace_run_train``,
runs ``mace_create_lammps_model mace_si.model`` (default libtorch format, float64), copies the two
TorchScript files here (the pickled ``mace_si.model`` is not kept), then loads them with plain
``torch.jit.load`` (this process never imports mace) and checks forces computed through the inner
scripted MACE with ``compute_force=False`` and per-pair offsets (NOTES-torchscript.md) against the
archives' own forces on a periodic 64-atom Si cell. About a minute on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

TRAIN_ARGS = [
    "--name", "mace_si", "--seed", "1", "--model", "ScaleShiftMACE", "--num_channels", "8", "--max_L", "1",
    "--max_ell", "2", "--r_max", "4.0", "--num_interactions", "2", "--correlation", "2",
    "--MLP_irreps", "8x0e", "--radial_MLP", "[16]", "--num_radial_basis", "6", "--E0s", "average",
    "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--batch_size", "2",
    "--valid_batch_size", "2", "--max_num_epochs", "6", "--lr", "0.01", "--default_dtype", "float64",
    "--device", "cpu", "--save_cpu", "--num_workers", "0",
]


def si_frames(path: Path) -> tuple[Path, Path]:
    """12 rattled, strained 8-atom diamond Si cells labelled by Stillinger-Weber: 10 train, 2 valid."""
    from ase.build import bulk
    from ase.io import write

    from ltau_lmp.data.reference import reference_calculation

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        atoms = bulk("Si", "diamond", a=5.43 * rng.uniform(0.98, 1.02), cubic=True)
        atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
        frames.append(atoms)
    for atoms, (energy, forces, _stress) in zip(frames, reference_calculation(frames)):
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = forces
    write(path / "train.xyz", frames[:10])
    write(path / "valid.xyz", frames[10:])
    return path / "train.xyz", path / "valid.xyz"


def run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def verify(lammps_path: Path, compiled_path: Path) -> None:
    import torch
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    extra = {"config.yaml": "", "commit.txt": ""}
    lmp = torch.jit.load(str(lammps_path), map_location="cpu")
    compiled = torch.jit.load(str(compiled_path), map_location="cpu", _extra_files=extra)
    assert not any(k.split(".")[0] in ("mace", "e3nn") for k in sys.modules)
    z = lmp.atomic_numbers.tolist()
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(3).normal(0.0, 0.1, atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0.02, 0], [0, 1, 0.03], [0.01, 0, 1]]), scale_atoms=True)
    i, j, S = neighbor_list("ijS", atoms, float(lmp.r_max))
    n = len(atoms)
    pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    unit = torch.tensor(S, dtype=torch.float64)
    edge_index = torch.tensor(np.stack([i, j]))  # MACE: [sender, receiver], vector x[recv] - x[send] + shift

    def data(shifts):
        return {"positions": pos.clone(), "edge_index": edge_index, "shifts": shifts, "unit_shifts": unit,
                "cell": cell, "batch": torch.zeros(n, dtype=torch.long), "ptr": torch.tensor([0, n]),
                "node_attrs": torch.nn.functional.one_hot(torch.tensor([z.index(a) for a in atoms.numbers]),
                                                          len(z)).double(),
                "head": lmp.head}

    own = lmp(data(unit @ cell), torch.ones(n, dtype=torch.float64), compute_virials=True)
    own_compiled = compiled(data(unit @ cell), training=False, compute_force=True)
    for name, inner in (("LAMMPS_MACE.model", lmp.model), ("compiled", compiled)):
        shifts = (unit @ cell).requires_grad_()
        out = inner(data(shifts), training=False, compute_force=False)
        (g,) = torch.autograd.grad(out["node_energy"].sum(), shifts)
        forces = torch.zeros_like(pos).index_add_(0, edge_index[0], g).index_add_(0, edge_index[1], -g)
        virial = -(pos[j] - pos[i] + unit @ cell).T @ g
        df = float((forces - own["forces"]).abs().max())
        dv = float((virial - own["virials"].view(3, 3)).abs().max())
        dc = float((forces - own_compiled["forces"]).abs().max())
        print(f"  {name}: max|dF| vs LAMMPS_MACE {df:.1e}, vs compiled's own {dc:.1e}; max|dW| {dv:.1e}; "
              f"node_feats {tuple(out['node_feats'].shape)}")
        assert df < 1e-10 and dc < 1e-10 and dv < 1e-9
    for path in (lammps_path, compiled_path):
        print(f"{path.name}: {path.stat().st_size} bytes")
    print(f"  LAMMPS_MACE buffers: atomic_numbers={z} r_max={float(lmp.r_max)} "
          f"num_interactions={int(lmp.num_interactions)} head={lmp.head.tolist()} heads={list(lmp.model.heads)}")
    print(f"  compiled extra files: {sorted(extra)}; config.yaml {extra['config.yaml'][:80]!r}...")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mace_archives_") as tmp:
        tmp = Path(tmp)
        train, valid = si_frames(tmp)
        run([str(BIN / "mace_run_train"), *TRAIN_ARGS, f"--train_file={train}", f"--valid_file={valid}"], cwd=tmp)
        run([str(BIN / "mace_create_lammps_model"), "mace_si.model"], cwd=tmp)  # -> mace_si.model-lammps.pt
        lammps_path = Path(shutil.copy(tmp / "mace_si.model-lammps.pt", HERE))
        compiled_path = Path(shutil.copy(tmp / "mace_si_compiled.model", HERE))
    verify(lammps_path, compiled_path)


if __name__ == "__main__":
    main()
