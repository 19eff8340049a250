"""Sliding-window inference on images of any size, at the model's resolution.

The image is resampled from its mpp to the model's mpp, cut into overlapping
windows (batched), and each window keeps only the detections in the part of the
image it *owns* (the overlap between two neighbours is split at its middle),
plus a few pixels of margin; point NMS with a radius in micrometres then merges
the two reports of a nucleus on a seam into one. Points are mapped back to
input pixels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..errors import DenucError
from ..geometry import rescale_points
from ..io.images import as_rgb_uint8
from .model import PointDetector

MULTIPLE = 32  # the backbone's total stride: window sizes are rounded up to it
SEAM_MARGIN = 4  # pixels kept beyond a window's owned region (see detect_at_model_mpp)
# Resampling factors (image mpp / model mpp) that still give trustworthy detections. Shrinking
# 40x (0.25 mpp, factor 0.5) or even 80x scans is harmless; shrinking more than ~4.5x (mpp < 0.11
# for a 0.5-mpp model) or enlarging more than 1.6x (mpp > 0.8: nuclei only a few pixels wide)
# is far outside training (scale jitter 0.8-1.25) and most often a wrong --mpp.
SAFE_FACTORS = (0.22, 1.6)
# Beyond this enlargement the stated mpp is wrong (nuclei under 2 px wide at a 0.5-mpp model's
# 8x), and the enlarged image would not fit in memory: --mpp 50 (a magnification typed as an
# mpp) made a 1000 x 1000 tile 100 000 px wide and took 11 GB before anything was detected.
MAX_ENLARGE = 8.0
CANDIDATE_TAU = 0.1  # score floor of detect_candidates: re-thresholding above it is exact


class ResolutionWarning(UserWarning):
    """The stated mpp makes the detector resample the image far outside its training range."""


def check_resolution(mpp: float, model_mpp: float) -> float:
    """The resampling factor for ``mpp``; warns (ResolutionWarning) when it is far outside training.

    DenucError beyond ``MAX_ENLARGE``.
    """
    factor = mpp / model_mpp
    if factor > MAX_ENLARGE:
        raise DenucError(
            f"mpp {mpp:g} would enlarge the image {factor:.3g}x for the detector's {model_mpp:g} mpp (at most "
            f"{MAX_ENLARGE:g}x); the mpp is micrometres per pixel, not the magnification: 0.25 for 40x, 0.5 for 20x"
        )
    lo, hi = SAFE_FACTORS
    if not lo <= factor <= hi:
        what = "enlarged" if factor > 1 else "shrunk"
        warnings.warn(
            f"mpp {mpp:g} is far from the detector's {model_mpp:g} mpp: the image is resampled by a factor "
            f"{factor:.3g} ({what} {max(factor, 1 / factor):.3g}x) before detection, outside the trained range "
            f"{lo:g}-{hi:g}; check the mpp (0.5 = 20x, 0.25 = 40x)",
            ResolutionWarning,
            stacklevel=3,
        )
    return factor


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an RGB uint8 image by ``scale`` (area-averaging when shrinking)."""
    if abs(scale - 1.0) < 1e-3:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample_filter = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, resample_filter))


def plan_windows(length: int, window: int, overlap: int) -> tuple[int, list[int], list[tuple[int, int]]]:
    """Window size, starts and owned [lo, hi) ranges along one axis of ``length`` pixels.

    Windows are spread evenly and shrunk to the smallest multiple of 32 that still
    overlaps neighbours by at least ``overlap``, so little work is wasted. Their starts sit on
    the 32-px grid of the backbone's total stride (the last window may run up to 31 px past the
    end, into the white padding): the network is not shift-invariant below its stride, so
    starts off the grid made the points depend on the image's size. Windows spread by size
    alone moved a quarter of the points 1-2 px and changed 3.4 % of the detections between an
    image and a crop of it (docs/benchmarks.md, "Does the cut change the result?").
    """
    if length <= window:
        size = int(math.ceil(length / MULTIPLE) * MULTIPLE)
        return size, [0], [(0, length)]
    n = math.ceil((length - overlap) / (window - overlap))
    size = int(math.ceil((length + (n - 1) * overlap) / n / MULTIPLE) * MULTIPLE)
    while True:  # rounding the starts to the grid may cost an overlap up to 32 px: grow the windows until none is short
        starts = [MULTIPLE * round(i * (length - size) / (n - 1) / MULTIPLE) for i in range(n - 1)]
        starts.append(MULTIPLE * math.ceil((length - size) / MULTIPLE))
        if all(a + size - b >= overlap for a, b in zip(starts, starts[1:])):
            break
        size += MULTIPLE
    bounds = [0] + [(starts[i] + size + starts[i + 1]) // 2 for i in range(n - 1)] + [length]
    return size, starts, [(bounds[i], bounds[i + 1]) for i in range(n)]


def point_nms(xy: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of points kept by greedy NMS: highest score first, suppress others within ``radius``."""
    if len(xy) == 0 or radius <= 0:
        return np.arange(len(xy))
    from scipy.spatial import cKDTree

    order = np.argsort(-scores, kind="stable")
    tree = cKDTree(xy)
    suppressed = np.zeros(len(xy), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[tree.query_ball_point(xy[i], radius)] = True
    return np.sort(np.asarray(keep, dtype=np.int64))


@torch.inference_mode()
def detect_at_model_mpp(
    model: PointDetector,
    image: np.ndarray,
    tau: float = 0.5,
    window: int = 1024,
    overlap: int = 64,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Detect on an image already at the model's mpp. Returns (xy, scores) before NMS."""
    device = next(model.parameters()).device
    h, w = image.shape[:2]
    wy, ys, own_y = plan_windows(h, window, overlap)
    wx, xs, own_x = plan_windows(w, window, overlap)
    jobs = [(y0, x0, oy, ox) for y0, oy in zip(ys, own_y) for x0, ox in zip(xs, own_x)]
    # Pad with white (empty glass) so windows at the edge have full size.
    padded = np.full((max(h, ys[-1] + wy), max(w, xs[-1] + wx), 3), 255, dtype=np.uint8)
    padded[:h, :w] = image
    all_xy, all_scores = [], []
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b : b + batch_size]
        tiles = np.stack([padded[y0 : y0 + wy, x0 : x0 + wx] for y0, x0, _, _ in batch])
        logits, xy = model(model.normalize(torch.from_numpy(tiles).to(device)))
        prob = torch.sigmoid(logits).cpu().numpy()
        xy = xy.cpu().numpy()
        for k, (y0, x0, (ylo, yhi), (xlo, xhi)) in enumerate(batch):
            keep = prob[k] > tau
            pts = xy[k][keep] + (x0, y0)
            sc = prob[k][keep]
            # Keep what lies in the owned region plus a small margin: a nucleus on a seam may be
            # placed a pixel either side by the two windows, and NMS merges the pair afterwards.
            m = SEAM_MARGIN
            inside = (pts[:, 0] >= xlo - m) & (pts[:, 0] < xhi + m) & (pts[:, 1] >= ylo - m) & (pts[:, 1] < yhi + m)
            all_xy.append(pts[inside])
            all_scores.append(sc[inside])
        if progress is not None:
            progress(min(b + batch_size, len(jobs)), len(jobs))
    xy = np.concatenate(all_xy) if all_xy else np.zeros((0, 2))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    return xy.astype(np.float64), scores.astype(np.float32)


def detect(
    model: PointDetector,
    image,
    mpp: float,
    model_mpp: float = 0.5,
    tau: float = 0.5,
    nms_um: float = 2.0,
    window: int = 1024,
    overlap: int = 64,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find nuclei in an RGB image of any size stated at ``mpp`` micrometres per pixel.

    Returns ``(xy, scores)``: (N, 2) positions in input pixels and (N,) scores in (tau, 1].
    """
    if not (mpp and mpp > 0 and math.isfinite(mpp)):
        raise DenucError(f"the image mpp must be a positive number, got {mpp!r}")
    image = as_rgb_uint8(image)
    scale = check_resolution(mpp, model_mpp)
    work = resample(image, scale)
    xy, scores = detect_at_model_mpp(model, work, tau, window, overlap, batch_size, progress)
    # Back to input pixels; resample() leaves the image alone below a 0.1 % change, and so do we.
    xy = rescale_points(xy, 1.0 / scale) if abs(scale - 1.0) >= 1e-3 else xy
    h, w = image.shape[:2]
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= w - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= h - 0.5)
    xy, scores = xy[inside], scores[inside]
    keep = point_nms(xy, scores, nms_um / mpp)
    return xy[keep], scores[keep]


def threshold(xy: np.ndarray, scores: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """The detections of ``detect(..., tau=tau)`` from candidates found at a lower threshold.

    Exact, not an approximation: greedy NMS lets a point be suppressed only by a higher-scoring
    one, and window ownership does not depend on scores, so dropping candidates with score <= tau
    after NMS leaves the same set as thresholding before it. This lets the widget move tau with
    a live count without running the network again.
    """
    keep = np.asarray(scores) > tau
    return np.asarray(xy)[keep], np.asarray(scores)[keep]
