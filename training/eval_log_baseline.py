"""The classical peer: scikit-image Laplacian-of-Gaussian blobs on the hematoxylin channel.

    python training/eval_log_baseline.py [--data ../shared/data/brca_m2c]

Detection F1 on BRCA-M2C val at 3 um for a grid of thresholds and sigma ranges (tuned on val,
which flatters it), with the same settings bench_detector.py times. Prints JSON rows and the best.
"""

from __future__ import annotations

import argparse
import itertools
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/brca_m2c")
    a = ap.parse_args()
    from skimage.color import rgb2hed
    from skimage.feature import blob_log

    from napari_denuc.data import load_dataset
    from napari_denuc.metrics import PointScorer

    val = load_dataset("brca_m2c", a.data, "val")
    hema = []
    for s in val:
        h = rgb2hed(s.image)[..., 0]
        hema.append((h - h.min()) / (h.max() - h.min() + 1e-9))
    rows = []
    for (lo, hi), thr in itertools.product([(3, 6), (2, 5), (3, 8)], [0.02, 0.03, 0.05, 0.08, 0.12]):
        scorer = PointScorer()
        for s, h in zip(val, hema):
            xy = blob_log(h, min_sigma=lo, max_sigma=hi, num_sigma=4, threshold=thr)[:, [1, 0]]
            scorer.add(xy, s.points, 3.0 / s.mpp)
        rows.append({"min_sigma": lo, "max_sigma": hi, "threshold": thr, **scorer.result()["detection"]})
        print(json.dumps(rows[-1]), flush=True)
    print("BEST", json.dumps(max(rows, key=lambda r: r["f1"])))


if __name__ == "__main__":
    main()
