"""Regenerate the nequip >= 0.7 TorchScript fixtures of this folder (issue 24):

    nequip_si_compiled.nequip.pth    tiny NequIP (2 convolutions, l_max 1, 8 features, r_max 4 A), float64
    allegro_si_compiled.nequip.pth   tiny Allegro (2 layers, l_max 1, 8 scalar / 4 tensor features), float64

Run with the nequip environment (nequip 0.19.1, nequip-allegro 0.8.3, torch 2.13), from anywhere:

    .venv-nequip/bin/python tests/data/archives/make_nequip_compiled.py

What it does, with nequip's own tools only: labels 12 rattled 8-atom diamond Si cells with
Stillinger-Weber (LAMMPS, ltau_lmp.data.reference), trains each model for 3 epochs with
``nequip-train`` (type names = chemical symbols), then runs ``nequip-compile --mode torchscript
--device cpu CKPT OUT.nequip.pth``. nequip 0.19.1 refuses TorchScript on torch >= 2.10 (the first
lines of ``nequip.scripts.compile.main``); that one refusal is lifted in a child process and the
rest of nequip-compile runs unchanged (same metadata, ``save_torchscript_model``). Finally every
archive is loaded with plain ``torch.jit.load`` and its energies/forces recomputed through the
inner energy model with per-pair offsets (NOTES-torchscript.md) and compared with its own forward.
About a minute on 2 cores. Training on CPU is deterministic only up to thread scheduling: the
archives' weights may differ from run to run; tests must compare an archive with itself.
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

COMMON = """\
run: [train]
seed: 1
cutoff_radius: 4.0
model_type_names: [Si]
train_file: ???
val_file: ???
data:
  _target_: nequip.data.datamodule.NequIPDataModule
  seed: ${seed}
  train_dataset:
    _target_: nequip.data.dataset.ASEDataset
    file_path: ${train_file}
    transforms:
      - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
        model_type_names: ${model_type_names}
        chemical_species_to_atom_type_map: {Si: Si}
      - _target_: nequip.data.transforms.NeighborListTransform
        r_max: ${cutoff_radius}
  val_dataset:
    _target_: nequip.data.dataset.ASEDataset
    file_path: ${val_file}
    transforms: ${data.train_dataset.transforms}
  train_dataloader: {_target_: torch.utils.data.DataLoader, batch_size: 2, shuffle: true}
  val_dataloader: {_target_: torch.utils.data.DataLoader, batch_size: 2}
  stats_manager:
    _target_: nequip.data.CommonDataStatisticsManager
    type_names: ${model_type_names}
trainer:
  _target_: lightning.Trainer
  max_epochs: 3
  enable_progress_bar: false
  logger: false
  callbacks:
    - _target_: lightning.pytorch.callbacks.ModelCheckpoint
      dirpath: ${hydra:runtime.output_dir}
      filename: last
training_module:
  _target_: nequip.train.EMALightningModule
  loss:
    _target_: nequip.train.EnergyForceLoss
    per_atom_energy: true
    coeffs: {total_energy: 1.0, forces: 10.0}
  val_metrics:
    _target_: nequip.train.EnergyForceMetrics
    coeffs: {total_energy_rmse: 1.0, forces_rmse: 1.0}
  optimizer: {_target_: torch.optim.Adam, lr: 0.01}
"""
STATS = """\
    seed: ${seed}
    model_dtype: float64
    type_names: ${model_type_names}
    r_max: ${cutoff_radius}
    avg_num_neighbors: ${training_data_stats:num_neighbors_mean}
    per_type_energy_shifts: ${training_data_stats:per_atom_energy_mean}
    per_type_energy_scales: ${training_data_stats:forces_rms}
"""
MODELS = {
    "nequip": """\
  model:
    _target_: nequip.model.NequIPGNNModel
    l_max: 1
    num_layers: 2
    num_features: 8
    radial_mlp_width: 16
""",
    "allegro": """\
  model:
    _target_: allegro.model.AllegroModel
    l_max: 1
    num_layers: 2
    num_scalar_features: 8
    num_tensor_features: 4
    radial_chemical_embed:
      _target_: allegro.nn.TwoBodyBesselScalarEmbed
      num_bessels: 8
    allegro_mlp_hidden_layers_width: 16
    readout_mlp_hidden_layers_width: 8
""",
}

# nequip-compile, minus its torch >= 2.10 refusal of --mode torchscript (the only reader of this binding)
COMPILE = """
import sys
import nequip.scripts.compile as nc
nc._TORCH_GE_2_10 = False
nc.main(sys.argv[1:])
"""


def si_frames(path: Path) -> tuple[Path, Path]:
    """12 rattled, strained 8-atom diamond Si cells labelled by Stillinger-Weber: 10 train, 2 val."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from ltau_lmp.data.reference import reference_calculation

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        atoms = bulk("Si", "diamond", a=5.43 * rng.uniform(0.98, 1.02), cubic=True)
        atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
        frames.append(atoms)
    for atoms, (energy, forces, stress) in zip(frames, reference_calculation(frames)):
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    write(path / "train.xyz", frames[:10])
    write(path / "val.xyz", frames[10:])
    return path / "train.xyz", path / "val.xyz"


def run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def verify(path: Path) -> None:
    """Plain torch (no nequip import): forces from the inner energy model differentiated w.r.t.
    per-pair offsets equal the archive's own forces on a periodic, sheared 64-atom Si cell."""
    import torch
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    meta = {"r_max": "", "type_names": "", "num_types": "", "model_dtype": "", "allow_tf32": ""}
    model = torch.jit.load(str(path), map_location="cpu", _extra_files=meta)
    type_names = meta["type_names"].decode().split(" ")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(3).normal(0.0, 0.1, atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0.02, 0], [0, 1, 0.03], [0.01, 0, 1]]), scale_atoms=True)
    i, j, S = neighbor_list("ijS", atoms, float(meta["r_max"]))
    pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    types = torch.tensor([type_names.index(s) for s in atoms.get_chemical_symbols()])
    edge_index, unit = torch.tensor(np.stack([i, j])), torch.tensor(S, dtype=torch.float64)
    own = model({"pos": pos.clone(), "edge_index": edge_index, "atom_types": types, "cell": cell,
                 "edge_cell_shift": unit})
    offsets = (unit @ cell).requires_grad_()
    out = model.model.func({"pos": pos, "edge_index": edge_index, "atom_types": types,
                            "edge_vectors": pos[j] - pos[i] + offsets})
    (g,) = torch.autograd.grad(out["atomic_energy"].sum(), offsets)
    forces = torch.zeros_like(pos).index_add_(0, edge_index[0], g).index_add_(0, edge_index[1], -g)
    df = float((forces - own["forces"]).abs().max())
    de = float((out["atomic_energy"].detach() - own["atomic_energy"]).abs().max())
    stages = [f"{name}:{m.original_name}" for name, m in model.model.func.named_children()]
    print(f"{path.name}: {path.stat().st_size} bytes, metadata {{{', '.join(f'{k}={v.decode()}' for k, v in meta.items())}}}")
    print(f"  stages: {' '.join(stages)}")
    print(f"  max|dE_atom| {de:.1e}  max|dF| {df:.1e} (max|F| {float(own['forces'].abs().max()):.2f})")
    assert de < 1e-10 and df < 1e-10, path
    assert not any(k.split(".")[0] in ("nequip", "allegro", "e3nn") for k in sys.modules)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="nequip_archives_") as tmp:
        tmp = Path(tmp)
        train, val = si_frames(tmp)
        made = []
        for kind, model in MODELS.items():
            (tmp / f"{kind}.yaml").write_text(COMMON + model + STATS)
            out = tmp / f"run_{kind}"
            run([str(BIN / "nequip-train"), "-cp", str(tmp), "-cn", kind, f"train_file={train}",
                 f"val_file={val}", f"hydra.run.dir={out}"], cwd=tmp)
            archive = tmp / f"{kind}_si_compiled.nequip.pth"
            run([sys.executable, "-c", COMPILE, "--mode", "torchscript", "--device", "cpu",
                 str(out / "last.ckpt"), str(archive)], cwd=tmp)
            made.append(Path(shutil.copy(archive, HERE / archive.name)))
    for path in made:
        verify(path)


if __name__ == "__main__":
    main()
