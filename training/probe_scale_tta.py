"""Probe (issue 10): multi-scale test-time augmentation of the bundled detector, zero-shot.

Each tile is detected as if its mpp were 0.87x, 1x and 1.15x the stated one (the scale jitter the
detector trained with); each 1x candidate's score becomes the mean over the scales of the best
candidate within 2 um (0 where a scale found none), then threshold and the shipped NMS (4 um).

    python training/probe_scale_tta.py [--root ../shared/data/monuseg_subset]
"""

from __future__ import annotations

import argparse

import numpy as np

SCALES = (0.87, 1.0, 1.15)


def averaged(per_scale, scales, radius_px):
    """The 1x candidates with their scores averaged over ``scales``."""
    from scipy.spatial import cKDTree

    xy = per_scale[1.0][0]
    total = np.zeros(len(xy))
    for f in scales:
        pts, sc = per_scale[f]
        if len(pts) and len(xy):
            d, i = cKDTree(pts).query(xy, distance_upper_bound=radius_px)
            ok = np.isfinite(d)
            total[ok] += sc[i[ok]]
    return xy, total / len(scales)


def main():
    from napari_denuc.data import load_dataset
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.detection.infer import point_nms
    from napari_denuc.metrics import PointScorer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/monuseg_subset")
    a = ap.parse_args()
    det = load_detector(None)
    samples = load_dataset("folder", a.root, "all")
    found = [{f: det.detect(s.image, s.mpp * f, tau=0.05, nms_um=2.0) for f in SCALES} for s in samples]
    for label, scales in (("1x (as shipped)", (1.0,)), ("0.87x + 1x + 1.15x", SCALES), ("1x + 1.15x", (1.0, 1.15))):
        for tau in (0.4, 0.45, 0.5, 0.55):
            scorer = PointScorer()
            for s, per in zip(samples, found):
                xy, score = averaged(per, scales, 2.0 / s.mpp)
                xy, score = xy[score > tau], score[score > tau]
                keep = point_nms(xy, score, det.nms_um / s.mpp)
                scorer.add(xy[keep], s.points, 3.0 / s.mpp, score[keep])
            r = scorer.result()["detection"]
            print(f"| {label} | {tau} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
