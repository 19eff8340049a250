"""Scoring a pipeline on annotated samples with the distance-based F1 (see metrics.py)."""

from __future__ import annotations

import sys

from .metrics import PointScorer


def score_pipeline(pipeline, samples, radius_um: float = 3.0, gt_points: bool = False, matching: str = "greedy",
                   tau=None, nms_um=None, desc: str | None = None) -> dict:
    """Detection F1, and per-class F1 and ``f_avg`` when the pipeline has a head.

    ``gt_points`` classifies the ground-truth points instead of detections: it scores the
    encoder + head alone. Radii are converted to pixels with each sample's mpp.
    """
    from tqdm import tqdm

    with_head = pipeline.head is not None
    scorer = PointScorer(pipeline.class_names if with_head else None, matching)
    for s in tqdm(samples, desc=desc, disable=desc is None or not sys.stderr.isatty(), leave=False):
        radius = radius_um / s.mpp
        if gt_points:
            cls, probs, _ = pipeline.classify(s.image, s.points, s.mpp)
            scorer.add(s.points, s.points, radius, probs.max(1) if len(probs) else None, cls, s.labels)
        else:
            det = pipeline.run(s.image, s.mpp, tau=tau, nms_um=nms_um)
            scorer.add(det.xy, s.points, radius, det.scores, det.class_ids if with_head else None, s.labels if with_head else None)
    return scorer.result()
