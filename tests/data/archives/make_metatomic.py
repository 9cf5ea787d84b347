"""Make ``tests/data/archives/metatomic_si.pt``: a tiny metatrain PET (float64) trained on silicon and
exported as a metatomic ``AtomisticModel`` (the file ``pair_style metatomic`` reads).

This script does NOT run in the project's environment: it needs metatrain, which the project does
not depend on. It was run in a throwaway venv (CPU only, Python 3.11)::

    python3 -m venv /tmp/i24/metatomic/venv
    /tmp/i24/metatomic/venv/bin/pip install torch==2.13.0          # resolves to 2.13.0+cpu here
    /tmp/i24/metatomic/venv/bin/pip install metatomic-torch==0.1.19 metatrain==2026.4.1 ase

which resolved to: torch 2.13.0+cpu, metatomic-torch 0.1.19, metatensor-torch 0.10.8,
metatensor-core 0.2.6, metatensor-operations 0.5.0, metatensor-learn 0.5.0, metatomic-ase 0.1.4,
vesin 0.6.2, metatrain 2026.4.1, ase 3.29.0, numpy 2.4.6. PET needs no compiled extension besides
metatomic-torch's own (the archive's ``extensions`` list is empty), so *loading* the fixture only
needs ``torch`` + ``metatomic-torch`` (``import metatomic.torch`` registers the TorchScript classes).

Data: the project's own silicon training set (Stillinger-Weber labels, 120 frames of 64 atoms)::

    /work/main/.venv/bin/python -m ltau_lmp.cli generate si -o /tmp/i24/sidata --sets train

Command (3 min 43 s wall here, 2 CPU cores; training uses one thread)::

    /tmp/i24/metatomic/venv/bin/python tests/data/archives/make_metatomic.py \\
        --data /tmp/i24/sidata/train.xyz

What it does: takes every 5th frame (24 structures; 20 train / 4 validation), writes a metatrain
``options.yaml`` for a tiny PET (cutoff 4 A, d_pet = d_node = d_head = 16, 2 heads, 1 attention
layer, 2 GNN layers, float64), runs ``mtt train`` and then ``mtt export`` (the package's own tools;
``mtt export`` writes the checkpoint's *best-validation* weights, which is also what ``mtt train -o``
writes) with a metadata YAML, and checks the file: capabilities, and forces from the gradient of the
local atoms' energies on an explicit ghost-image cluster against metatomic's ASE calculator.

Receptive field (measured, see NOTES-metatomic.md): PET's default ``featurizer_type: feedforward``
makes an atom's energy depend on atoms out to (num_gnn_layers + 1) x cutoff = 12 A, while the
archive declares ``interaction_range`` = num_gnn_layers x cutoff = 8 A. ``--featurizer residual``
makes a PET whose declared range is exact. ``--epochs-dir DIR`` also exports every epoch's live
(not best) weights as ``DIR/epoch_N.pt`` (for replay tests).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

OPTIONS = """\
seed: 42
base_precision: 64
architecture:
  name: pet
  model:
    cutoff: 4.0
    cutoff_width: 0.5
    d_pet: 16
    d_head: 16
    d_node: 16
    d_feedforward: 32
    num_heads: 2
    num_attention_layers: 1
    num_gnn_layers: 2
    featurizer_type: {featurizer}
  training:
    batch_size: 2
    num_epochs: {epochs}
    learning_rate: 1.0e-2
    checkpoint_interval: {checkpoint_interval}
    num_workers: 0
training_set:
  systems:
    read_from: si_sub.xyz
    length_unit: angstrom
  targets:
    energy:
      key: energy
      unit: eV
      forces:
        key: forces
test_set: 0.0
validation_set: 0.2
"""

METADATA = """\
name: ltau_lmp test fixture - tiny PET on silicon
description: >-
  Tiny metatrain PET (float64, cutoff 4 A, 2 GNN layers, featurizer {featurizer}) trained for
  {epochs} epochs on 24 Stillinger-Weber silicon frames from `ltau-lmp generate si`.
  A test fixture, not a usable potential.
authors:
  - ltau_lmp
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/i24/sidata/train.xyz",
                   help="extxyz with energy/forces/stress (ltau-lmp generate si --sets train)")
    p.add_argument("--out", default=str(HERE / "metatomic_si.pt"))
    p.add_argument("--workdir", default=None, help="training folder (default: a temporary one, removed)")
    p.add_argument("--stride", type=int, default=5, help="take every N-th frame of --data")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--featurizer", choices=("feedforward", "residual"), default="feedforward",
                   help="PET featurizer_type (metatrain's default: feedforward)")
    p.add_argument("--epochs-dir", default=None,
                   help="also export each epoch's live weights as DIR/epoch_N.pt")
    args = p.parse_args(argv)

    import ase.io

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="make_metatomic_"))
    workdir.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(args.data, index=f"::{args.stride}")
    ase.io.write(workdir / "si_sub.xyz", frames)
    print(f"{len(frames)} frames of {len(frames[0])} atoms from {args.data}")
    (workdir / "options.yaml").write_text(OPTIONS.format(
        featurizer=args.featurizer, epochs=args.epochs,
        checkpoint_interval=1 if args.epochs_dir else args.epochs + 1))
    (workdir / "metadata.yaml").write_text(METADATA.format(featurizer=args.featurizer, epochs=args.epochs))

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mtt = [sys.executable, "-m", "metatrain"]
    with open(workdir / "mtt.log", "w") as log:
        subprocess.run(mtt + ["train", "options.yaml", "-o", "trained.pt"], cwd=workdir, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
        subprocess.run(mtt + ["export", "trained.ckpt", "-o", "exported.pt", "-m", "metadata.yaml"],
                       cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    out = Path(args.out)
    shutil.copyfile(workdir / "exported.pt", out)

    if args.epochs_dir:
        export_epochs(workdir, Path(args.epochs_dir))

    check(out, frames[0])
    data = out.read_bytes()
    print(f"wrote {out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    if not args.workdir:
        shutil.rmtree(workdir)


def export_epochs(workdir: Path, epochs_dir: Path) -> None:
    """Every per-epoch checkpoint (``model_N.ckpt``) exported with its *live* weights
    (``context="restart"``: ``model_state_dict``; ``mtt export`` would take ``best_model_state_dict``)."""
    import metatomic.torch  # noqa: F401  (registers the TorchScript classes the checkpoint pickles)
    import torch
    from metatrain.utils.architectures import import_architecture

    epochs_dir.mkdir(parents=True, exist_ok=True)
    for ckpt_path in sorted(workdir.glob("outputs/*/*/model_*.ckpt"), key=lambda q: int(q.stem.split("_")[1])):
        # metatrain writes pickles holding TorchScript objects; these are the ones this script's own mtt train
        # run just wrote into its work folder (never a file from elsewhere)
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        model = import_architecture(ckpt["architecture_name"]).__model__.load_checkpoint(ckpt, context="restart")
        model.export().save(str(epochs_dir / f"epoch_{ckpt_path.stem.split('_')[1]}.pt"))
    print(f"per-epoch exports in {epochs_dir}")


def check(path: Path, atoms) -> None:
    """Load the archive, print what a model card needs, and compare forces from our route
    (explicit ghost images, energies of the local atoms only, -dE/dpositions folded onto owners)
    with metatomic's own ASE calculator on a periodic cell."""
    import numpy as np
    import torch
    from ase import Atoms
    from ase.neighborlist import neighbor_list
    from metatensor.torch import Labels, TensorBlock
    import metatomic.torch as mta
    from metatomic_ase import MetatomicCalculator

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    model = mta.load_atomistic_model(str(path))
    caps = model.capabilities()
    (nl,) = model.requested_neighbor_lists()
    inner = model.module
    print(textwrap.dedent(f"""\
        atomic_types {caps.atomic_types}  interaction_range {caps.interaction_range}  length_unit {caps.length_unit}
        dtype {caps.dtype}  outputs {sorted(caps.outputs)}
        neighbor list: cutoff {nl.cutoff} full_list {nl.full_list} strict {nl.strict}
        PET: featurizer_type {inner.featurizer_type} num_gnn_layers {inner.num_gnn_layers} cutoff {inner.cutoff}"""))
    assert caps.dtype == "float64" and caps.atomic_types == [14] and "feature" in caps.outputs
    dtype = torch.float64
    layers = inner.num_gnn_layers + (1 if inner.featurizer_type == "feedforward" else 0)
    shell = layers * inner.cutoff  # the receptive field actually measured for PET

    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(str(path), device="cpu")
    f_ref = atoms.get_forces()
    atoms.calc = None

    # explicit ghost images of the periodic cell out to `shell` from any local atom
    pos, cell, n = atoms.positions, atoms.cell.array, len(atoms)
    heights = atoms.cell.volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    reps = np.ceil(shell / heights).astype(int)
    images, owner = [pos], [np.arange(n)]
    for a in range(-reps[0], reps[0] + 1):
        for b in range(-reps[1], reps[1] + 1):
            for c in range(-reps[2], reps[2] + 1):
                if (a, b, c) == (0, 0, 0):
                    continue
                q = pos + np.array([a, b, c]) @ cell
                keep = np.min(np.linalg.norm(q[:, None] - pos[None], axis=2), axis=1) < shell
                images.append(q[keep]); owner.append(np.arange(n)[keep])
    allpos, owner = np.concatenate(images), np.concatenate(owner)
    i, j = neighbor_list("ij", Atoms("Si%d" % len(allpos), positions=allpos), nl.cutoff)

    x = torch.tensor(allpos, dtype=dtype, requires_grad=True)
    system = mta.System(types=torch.full((len(allpos),), 14, dtype=torch.int32), positions=x,
                        cell=torch.zeros(3, 3, dtype=dtype), pbc=torch.tensor([False] * 3))
    ii, jj = torch.tensor(i), torch.tensor(j)
    system.add_neighbor_list(nl, TensorBlock(
        values=(x[jj] - x[ii]).reshape(-1, 3, 1),
        samples=Labels(["first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"],
                       torch.cat([ii[:, None], jj[:, None], torch.zeros(len(i), 3, dtype=torch.int64)], 1)
                       .to(torch.int32)),
        components=[Labels("xyz", torch.tensor([[0], [1], [2]]))],
        properties=Labels("distance", torch.tensor([[0]]))))
    local = Labels(["system", "atom"], torch.stack([torch.zeros(n, dtype=torch.int32),
                                                    torch.arange(n, dtype=torch.int32)], 1))
    options = mta.ModelEvaluationOptions(length_unit="angstrom", selected_atoms=local, outputs={
        "energy": mta.ModelOutput(unit="eV", sample_kind="atom"),
        "feature": mta.ModelOutput(sample_kind="atom")})
    out = model([system], options, check_consistency=True)
    energy = out["energy"].block().values
    (grad,) = torch.autograd.grad(energy.sum(), x)
    forces = np.zeros((n, 3))
    np.add.at(forces, owner, -grad.numpy())
    err = np.abs(forces - f_ref).max()
    print(f"{n} local + {len(allpos) - n} ghost atoms (shell {shell} A): energy {tuple(energy.shape)}, "
          f"feature {tuple(out['feature'].block().values.shape)}; max |F - F(MetatomicCalculator)| = {err:.2e} eV/A")
    assert err < 1e-10, err


if __name__ == "__main__":
    main()
