#!/usr/bin/env bash
# Default silicon pipeline: generate -> train (+ estimator) -> measure LTAU quality.
# About 1 min of data generation and a few minutes of training on 2 CPU cores.
# --overwrite: a rerun replaces the outputs of the previous run (and nothing else).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ltau-lmp generate "$here/config.yaml" --overwrite          # -> $here/data/{train,test,liquid,...}.xyz
ltau-lmp train "$here/config.yaml" --overwrite             # -> $here/run/{model.pt,error_log.npz,estimator/,...}
# Optional: rebuild the estimator with another index from the saved log and descriptors.
ltau-lmp build-estimator --error-log "$here/run/error_log.npz" --descriptors "$here/run/descriptors.npy" \
    --index hnsw -o "$here/run/estimator_hnsw" --model "$here/run/model.pt" --overwrite
ltau-lmp evaluate --model "$here/run/model.pt" --estimator "$here/run/estimator" --data-dir "$here/data" -o "$here/run/evaluation" --overwrite
