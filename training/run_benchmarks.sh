#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, written as JSON into docs/results/. Run on a quiet machine.
#   bash training/run_benchmarks.sh [BRCA-M2C root]        (about 15 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/brca_m2c}"
R=docs/results
mkdir -p "$R"
W=src/napari_denuc/weights

# Accuracy on BRCA-M2C val (3 um): detector alone, full offline pipeline, head at ground-truth points.
denuc-eval --dataset brca_m2c --root "$DATA" --split val --json "$R/eval_val_detector.json" > /dev/null
denuc-eval --dataset brca_m2c --root "$DATA" --split val --head "$W/lite_head.safetensors" --json "$R/eval_val_lite.json" > /dev/null
denuc-eval --dataset brca_m2c --root "$DATA" --split val --head "$W/lite_head.safetensors" --gt-points --json "$R/eval_val_lite_gt_points.json" > /dev/null

# Detector speed and memory on 2048 x 2048 (bundled detector vs scikit-image LoG), and each width untrained.
python training/bench_detector.py --data "$DATA" > "$R/bench_detector.json"
for w in shufflenet_v2_x0_5 shufflenet_v2_x1_0 shufflenet_v2_x1_5 shufflenet_v2_x2_0; do
  python training/bench_detector.py --data "$DATA" --only denuc --detector "untrained:$w"
done > "$R/bench_detector_widths.jsonl"

# lite encode + classify on 1000 x 1000, head fit on 20,000 cached vectors; UNI2-h window cost.
python training/bench_lite.py --data "$DATA" > "$R/bench_lite.json"
python training/bench_uni2h.py --windows 2 --threads 2 > "$R/bench_uni2h.json"

# napari: Detect & classify on the sample, Retrain head with 20,000 points (under Xvfb).
xvfb-run -a -s "-screen 0 1280x1024x24" python training/bench_widget.py --json "$R/bench_widget.json" > /dev/null

# Whole slide: 8192 x 8192 pyramidal TIFF, default offline pipeline; Dask 1 vs 2 workers; resume.
python training/bench_wsi.py --size 8192 > "$R/bench_wsi.json"

# Export from the per-tile store: 2 million synthetic nuclei, peak RSS (GeoJSON, CSV, Parquet); head fit time.
python training/bench_export.py > "$R/bench_export.json"
python training/bench_head.py > "$R/bench_head.json"
