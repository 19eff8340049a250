#!/usr/bin/env bash
# Reproduce the bundled lite head: lite features (filter bank + the bundled detector's neck) at
# every annotated nucleus of the BRCA-M2C train split, a linear head with balanced class weights
# and weight decay 0.03 (chosen on val by training/tune_lite_head.py); reports val F1. ~2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/brca_m2c}"
OUT="${2:-src/napari_denuc/weights/lite_head.safetensors}"
OMP_NUM_THREADS=1 denuc-train head --encoder lite --data "brca_m2c=$DATA" --out "$OUT" \
  --class-weight balanced --weight-decay 0.03
