#!/usr/bin/env bash
# Set up napari-denuc and run it on the bundled defaults:
#   bash scripts/quickstart.sh [OUTPUT_DIR]
# Creates the project's virtual environment .venv (see scripts/_venv.sh; works with Debian's
# and Ubuntu's own python3), installs the package into it, detects and classifies nuclei in the
# bundled BRCA-M2C sample tile with the bundled detector, the default encoder (the offline
# effnet-lite0-nuclei, or UNI2-h when its weights are cached) and its bundled head, writes
# QuPath GeoJSON, CSV, Parquet and a PNG overlay, and opens napari with the result and the
# DeNuC widget when a display is available.
# Afterwards:  . .venv/bin/activate   then   napari, denuc-predict, denuc-train, denuc-eval
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
OUT="${1:-denuc-output}"

denuc_venv "napari,wsi"
"$PY" -m napari_denuc.cli.predict --sample --out "$OUT" --overlay

SAMPLE=$("$PY" -c "from napari_denuc._sample_data import SAMPLE_IMAGE; print(SAMPLE_IMAGE)")
STEM=$(basename "$SAMPLE" .png)
echo "QuPath GeoJSON: $OUT/$STEM.geojson   overlay: $OUT/$STEM.overlay.png"
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && [ -z "${CI:-}" ]; then
  echo "opening napari (close the window to finish)"
  "$PY" -m napari "$SAMPLE" "$OUT/$STEM.geojson" -w napari-denuc
else
  echo "no display: skipping napari (run 'napari $SAMPLE $OUT/$STEM.geojson -w napari-denuc' on a desktop)"
fi
echo "to use the tools from this shell:  . ${DENUC_VENV:-.venv}/bin/activate   (then napari, denuc-predict, denuc-train ...)"
