"""The detection threshold that best reproduces nuclei a user has corrected.

On a site the detector never saw, its scores shift: each BRCA-M2C tile's own best tau, with
detectors trained without its site, would lift detection F1 by about 0.02 over the best fixed
tau, and rules that read tau from an image's own scores did worse than the fixed tau. Fitting
tau to a field of view the user corrected lifts detection on the rest of that slide
(docs/benchmarks.md, "End to end with site-held-out detectors"); with the bundled detector it
did not carry to other patients of the same site. No Qt here."""

from __future__ import annotations

import numpy as np

# The thresholds tried. Above 0.85 a detector keeps too few nuclei to be worth a choice.
TAUS = tuple(float(t) for t in np.round(np.arange(0.20, 0.851, 0.05), 2))
MATCH_UM = 3.0  # the benchmark's matching radius
# Keep the current tau unless another fits the corrections clearly better. Fitted to one corrected
# quadrant of a tile and scored on its other three (fold detectors, training/loso_end_to_end.py):
# 0.005 moved tau on noise with the bundled detector (-0.002 detection F1); 0.02 gave +0.001 with it
# and +0.005 with the detector before (+0.004 at 0.005); 0.03 and 0.05 held back real gains.
MIN_GAIN = 0.02


def threshold_counts(xy, scores, truth_xy, radius_px: float, taus=TAUS) -> np.ndarray:
    """(len(taus), 3): TP, FP, FN of the candidates scoring above each tau, matched to ``truth_xy``."""
    from ..metrics import match_points

    xy, scores = np.asarray(xy, float).reshape(-1, 2), np.asarray(scores, float)
    truth_xy = np.asarray(truth_xy, float).reshape(-1, 2)
    out = np.zeros((len(taus), 3))
    for i, tau in enumerate(taus):
        keep = scores > tau
        pi, gi = match_points(xy[keep], truth_xy, radius_px, scores[keep])
        out[i] = len(pi), keep.sum() - len(pi), len(truth_xy) - len(gi)
    return out


def f1(counts) -> np.ndarray:
    """F1 per row of TP, FP, FN counts."""
    c = np.asarray(counts, float).reshape(-1, 3)
    return 2 * c[:, 0] / np.maximum(2 * c[:, 0] + c[:, 1] + c[:, 2], 1)


def best_tau(counts, taus=TAUS, current: float | None = None, min_gain: float = MIN_GAIN) -> float:
    """The tau of highest F1, the one nearest ``current`` among ties. ``current`` itself (if one of
    ``taus``) is kept unless another tau beats it by at least ``min_gain``: a few corrections should
    not move tau on noise."""
    scores = f1(counts)
    taus = np.asarray(taus, float)
    top = np.flatnonzero(scores >= scores.max() - 1e-12)
    best = top[np.argmin(np.abs(taus[top] - current))] if current is not None else top[0]
    near = np.flatnonzero(np.abs(taus - current) < 1e-6) if current is not None else []
    if len(near) and scores[best] - scores[near[0]] < min_gain:
        best = near[0]
    return float(taus[best])
