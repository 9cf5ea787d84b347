#!/usr/bin/env bash
# Makes the nequip-deploy (nequip 0.5/0.6, what pair_nequip / pair_allegro read) fixtures in this
# folder: tiny NequIP and Allegro models trained for a few epochs on Stillinger-Weber silicon from
# `ltau_lmp.cli generate si`, deployed with the packages' own `nequip-deploy build`.
# Findings and the code that uses them: NOTES-nequip-deploy.md beside this file.
#
# Throwaway venvs (python3.11 -m venv), NOT the project env; CPU torch only:
#   $W/oldnequip     torch 2.13.0+cpu, nequip 0.6.2, nequip-allegro 0.3.0 (the nequip-0.6-era
#                    Allegro, requires nequip>=0.6.1,<0.7), e3nn 0.5.9, numpy 1.26.4, ase 3.29.0
#   $W/oldnequip056  torch 2.13.0+cpu, nequip 0.5.6 installed --no-deps (it pins torch<1.13; the only
#                    torch 1.x wheels reachable here are CUDA builds, so not used), e3nn 0.5.1,
#                    numpy 1.26.4
# Both need numpy<2 (np.in1d) and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (nequip's torch.load of its own
# processed dataset / checkpoints predates torch 2.6's weights_only default; our own files only).
# The data step uses the project env (/work/main/.venv, or $PROJECT_PY).
#
# Outputs (each ~0.2-0.3 MB):
#   nequip_si_deployed.pth        nequip 0.6.2, default_dtype = model_dtype = float64
#   nequip_si_f32_deployed.pth    nequip 0.6.2 defaults: default_dtype float64, model_dtype float32
#   allegro_si_deployed.pth       nequip-allegro 0.3.0 on nequip 0.6.2, float64
#   nequip056_si_f32_deployed.pth nequip 0.5.6, float32 (0.5.x default; no dtype metadata)
# Runtime on 2 cores: ~6 min including venvs. Usage: bash make_nequip_deployed.sh  (W=/tmp/... to move
# the work dir, OUT=... to write the archives elsewhere)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
W="${W:-/tmp/i24}"
OUT="${OUT:-$HERE}"
PROJECT_PY="${PROJECT_PY:-$REPO/.venv/bin/python}"
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 OMP_NUM_THREADS=1
mkdir -p "$W" "$OUT"

# ---- 1. venvs
if [ ! -x "$W/oldnequip/bin/nequip-train" ]; then
  python3.11 -m venv "$W/oldnequip"
  "$W/oldnequip/bin/pip" install -q torch==2.13.0 nequip==0.6.2 'e3nn<0.6' 'numpy<2'
  "$W/oldnequip/bin/pip" install -q --no-deps nequip-allegro==0.3.0
fi
if [ ! -x "$W/oldnequip056/bin/nequip-train" ]; then
  python3.11 -m venv "$W/oldnequip056"
  "$W/oldnequip056/bin/pip" install -q torch==2.13.0 e3nn==0.5.1 'numpy<2' ase tqdm pyyaml \
      'torch-runstats>=0.2.0' 'torch-ema>=0.3.0'
  "$W/oldnequip056/bin/pip" install -q --no-deps nequip==0.5.6
fi

# ---- 2. silicon data: 120 frames of 64 / 216 atoms, extxyz with energy, forces, stress (SW labels)
if [ ! -f "$W/sidata/train.xyz" ]; then
  (cd "$REPO" && "$PROJECT_PY" -m ltau_lmp.cli generate si -o "$W/sidata" --sets train)
fi

# ---- 3. configs
common() {  # $1 run_name, $2 dtype lines
cat <<EOF
root: $W/results
run_name: $1
seed: 123
dataset_seed: 456
append: false
$2
allow_tf32: false
device: cpu

dataset: ase
dataset_file_name: $W/sidata/train.xyz
ase_args:
  format: extxyz
chemical_symbols:
  - Si
n_train: 100
n_val: 20
batch_size: 5
validation_batch_size: 10
max_epochs: 6
learning_rate: 0.01
train_val_split: random
shuffle: true
metrics_key: validation_loss
use_ema: false
early_stopping_patiences:
  validation_loss: 100
loss_coeffs:
  forces: 1
  total_energy:
    - 1
    - PerAtomMSELoss
metrics_components:
  - - forces
    - mae
  - - total_energy
    - mae
    - PerAtom: true
optimizer_name: Adam
lr_scheduler_name: none
per_species_rescale_scales_trainable: false
per_species_rescale_shifts_trainable: false
per_species_rescale_shifts: dataset_per_atom_total_energy_mean
per_species_rescale_scales: dataset_forces_rms
log_batch_freq: 100
save_checkpoint_freq: -1
EOF
}
# NequIP: 2 convolutions, l_max 1, 8 features, r_max 4 A; default model_builders
# (SimpleIrrepsConfig, EnergyModel, PerSpeciesRescale, StressForceOutput [0.5.6: ForceOutput],
# RescaleEnergyEtc)
nequip_model() {
cat <<EOF
r_max: 4.0
num_layers: 2
l_max: 1
parity: true
num_features: 8
nonlinearity_type: gate
resnet: false
num_basis: 8
BesselBasis_trainable: true
PolynomialCutoff_p: 6
invariant_layers: 1
invariant_neurons: 16
avg_num_neighbors: auto
use_sc: true
EOF
}
# Allegro: 2 layers, l_max 1, 4 tensor features, 16-wide latents, r_max 4 A
allegro_model() {
cat <<EOF
model_builders:
  - allegro.model.Allegro
  - PerSpeciesRescale
  - StressForceOutput
  - RescaleEnergyEtc
r_max: 4.0
avg_num_neighbors: auto
PolynomialCutoff_p: 6
num_bessels_per_basis: 8
l_max: 1
parity: o3_full
num_layers: 2
num_tensor_features: 4
two_body_latent_mlp_latent_dimensions: [16, 16]
two_body_latent_mlp_nonlinearity: silu
two_body_latent_mlp_initialization: uniform
latent_mlp_latent_dimensions: [16]
latent_mlp_nonlinearity: silu
latent_mlp_initialization: uniform
latent_resnet: true
env_embed_mlp_latent_dimensions: []
env_embed_mlp_nonlinearity: null
env_embed_mlp_initialization: uniform
edge_eng_mlp_latent_dimensions: [8]
edge_eng_mlp_nonlinearity: null
edge_eng_mlp_initialization: uniform
EOF
}
F64=$'default_dtype: float64\nmodel_dtype: float64'
{ common nequip_si "$F64"; nequip_model; } > "$W/nequip_si.yaml"
{ common nequip_si_f32 "default_dtype: float64"; nequip_model; } > "$W/nequip_si_f32.yaml"
{ common allegro_si "$F64"; allegro_model; } > "$W/allegro_si.yaml"
{ common nequip056_si_f32 ""; nequip_model; } > "$W/nequip056_si_f32.yaml"   # 0.5.6: float32

# ---- 4. train (a few epochs, ~20-40 s each) and deploy
train_deploy() {  # $1 venv, $2 run name
  rm -rf "$W/results/$2"
  "$W/$1/bin/nequip-train" "$W/$2.yaml" > "$W/train_$2.log" 2>&1
  "$W/$1/bin/nequip-deploy" build --train-dir "$W/results/$2" "$OUT/$2_deployed.pth" > "$W/deploy_$2.log" 2>&1
  grep -A2 '! Train ' "$W/train_$2.log" | tail -2
  ls -l "$OUT/$2_deployed.pth"
}
train_deploy oldnequip nequip_si
train_deploy oldnequip nequip_si_f32
train_deploy oldnequip allegro_si
train_deploy oldnequip056 nequip056_si_f32
