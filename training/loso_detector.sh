#!/usr/bin/env bash
# Leave-one-site-out comparison of detector recipes (docs/benchmarks.md, "Detector: leave-one-site-out").
# One training process at a time, one thread; resumable (re-run after an interruption).
#   bash training/loso_detector.sh scratch-x1_0 lite0 lite0-travel
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
for recipe in "$@"; do
  for site in A7 A8 AC; do
    python training/loso_detector.py train --recipe "$recipe" --holdout "$site" --out runs/loso
  done
done
python training/loso_detector.py select --out runs/loso $(printf -- '--recipe %s ' "$@") --json runs/loso/select.json
