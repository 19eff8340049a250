"""Probe: does the way an image is cut change what is found and how it is classified?

A 3 x 3 mosaic of BRCA-M2C val tiles (their ground truth kept) is written as a TIFF and run
twice: whole, through ``Pipeline.run`` (what the widget and ``denuc-predict`` do for an image
that fits in memory), and tiled, through ``predict_slides`` (the whole-slide path, each tile read
with its overlap) at several tile sizes and overlaps. Reported: nuclei found, how many tiled
detections lie within 1 px of a whole-image one, class agreement among those, and end-to-end
``f_avg`` of both against the ground truth. Also the detector alone on the whole mosaic against
its top-left 1088 x 1088 crop (same origin), compared away from the crop's cut.

    python training/probe_tiling_agreement.py [--root ../shared/data/brca_m2c] [--out /tmp/tiling]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main():
    import pandas as pd
    import tifffile
    from scipy.spatial import cKDTree

    from napari_denuc.data import load_dataset
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.metrics import PointScorer
    from napari_denuc.pipeline import Pipeline
    from napari_denuc.wsi.factory import PipelineFactory
    from napari_denuc.wsi.run import predict_slides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--out", default="/tmp/tiling")
    a = ap.parse_args()
    tiles = load_dataset("brca_m2c", a.root, "val")[:9]
    side = min(min(s.image.shape[:2]) for s in tiles)
    mosaic = np.zeros((3 * side, 3 * side, 3), np.uint8)
    pts, labels = [], []
    for i, s in enumerate(tiles):
        r, c = divmod(i, 3)
        mosaic[r * side:(r + 1) * side, c * side:(c + 1) * side] = s.image[:side, :side]
        keep = (s.points < side).all(1)
        pts.append(s.points[keep] + [c * side, r * side])
        labels.append(s.labels[keep])
    pts, labels = np.concatenate(pts), np.concatenate(labels)
    mpp = float(tiles[0].mpp)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tif = out / "mosaic.tif"
    tifffile.imwrite(tif, mosaic, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")

    whole = Pipeline.from_defaults().run(mosaic, mpp=mpp)
    names = whole.class_names

    def f_avg(xy, cls, scores):
        sc = PointScorer(names)
        sc.add(xy, pts, 3.0 / mpp, scores, cls, labels)
        return sc.result()["f_avg"]

    print(f"mosaic {mosaic.shape[1]} x {mosaic.shape[0]} px at {mpp} mpp, {len(pts)} annotated nuclei")
    print(f"whole image: {len(whole.xy)} nuclei, f_avg {f_avg(whole.xy, whole.class_ids, whole.scores):.4f}")
    tree = cKDTree(whole.xy)
    for tile, overlap in ((1024, 64), (512, 64), (1024, 256)):
        d = out / f"tile{tile}_overlap{overlap}"
        predict_slides([str(tif)], d, PipelineFactory(), tile_size=tile, overlap=overlap, formats=("csv",), progress=False,
                       tissue=False, overwrite=True)
        df = pd.read_csv(next(d.glob("*.csv")))
        xy = df[["x", "y"]].to_numpy()
        cls = np.array([names.index(c) for c in df["class"]])
        dist, j = tree.query(xy)
        near = dist < 1.0
        print(f"tiles {tile} px, overlap {overlap}: {len(xy)} nuclei, {near.mean():.1%} within 1 px of a whole-image one, "
              f"class agreement there {np.mean(whole.class_ids[j[near]] == cls[near]):.3f}, f_avg {f_avg(xy, cls, df['score'].to_numpy()):.4f}")
    det = load_detector(None)
    full, crop = det.detect(mosaic, mpp)[0], det.detect(mosaic[:1088, :1088], mpp)[0]
    inner = (crop < 850).all(1)
    dist, _ = cKDTree(full).query(crop[inner])
    q = np.quantile(dist, [0.5, 0.9, 0.99])
    print(f"detector, whole vs top-left crop, {inner.sum()} detections > 238 px from the cut: distance to the nearest "
          f"whole-image detection median {q[0]:.2f} px, 90 % {q[1]:.2f} px, 99 % {q[2]:.2f} px; > 3 px: {np.mean(dist > 3):.1%}")


if __name__ == "__main__":
    main()
