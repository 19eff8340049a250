#!/usr/bin/env bash
# Reproduce the detector bundled before `shipped-travel` (docs/models.md): ShuffleNetV2 1.0x from scratch on the BRCA-M2C train split,
# checkpoint (and score threshold / NMS radius) selected on val. About 35 minutes on 2 CPU cores.
# Resumable: run it again after an interruption. Then copy the result into the package:
#   cp runs/detector/best.safetensors      src/napari_denuc/weights/detector.safetensors
#   cp runs/detector/best.safetensors.json src/napari_denuc/weights/detector.safetensors.json
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/brca_m2c}"
OUT="${2:-runs/detector}"
OMP_NUM_THREADS=1 denuc-train detector --data "brca_m2c=$DATA" --out "$OUT" \
  --backbone shufflenet_v2_x1_0 --epochs 100 --batch-size 16 --crop 256 --crops-per-image 4 --lr 2e-3 --threads 1
