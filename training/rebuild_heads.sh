#!/usr/bin/env bash
# Both bundled heads for the bundled detector (they read its neck, so a new detector needs them anew):
# features at every ground-truth point and detection of the 90 train+val tiles, the leave-one-site-out
# option grid, then each head on all 90 tiles with the grid's best options (end to end).
# About 25 minutes on a quiet 2-core machine. Usage: bash training/rebuild_heads.sh docs/results/loso_heads_NAME.json
set -euo pipefail
JSON=${1:?usage: bash training/rebuild_heads.sh docs/results/loso_heads_NAME.json}
PY=${PYTHON:-python}
WEIGHTS=src/napari_denuc/weights
$PY training/loso_heads.py features --config eff0@0.5 --config lite
$PY training/loso_heads.py select --config "eff0@0.5|lite" --context-um 40 --weight-decay 0.1 --weight-decay 0.3 --weight-decay 1.0 \
    --class-weight balanced --class-weight none --json "$JSON"
$PY training/loso_heads.py select --config lite --context-um 40 --weight-decay 0.01 --weight-decay 0.03 --weight-decay 0.1 \
    --weight-decay 0.3 --weight-decay 1.0 --class-weight balanced --class-weight none --json "$JSON"
$PY training/train_default_head.py --config "eff0@0.5|lite" --encoder effnet-lite0 --context-um 40 --loso-json "$JSON" \
    --out "$WEIGHTS/effnet_lite0_head.safetensors"
$PY training/train_default_head.py --config lite --encoder lite --context-um 40 --loso-json "$JSON" \
    --out "$WEIGHTS/lite_head.safetensors"
