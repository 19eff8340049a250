"""A PNG picture of the result: the image with each nucleus drawn as a ring in its class colour."""

from __future__ import annotations

import io as _io

import numpy as np

from ..results import Detections
from .atomic import atomic_write


def draw_overlay(image: np.ndarray, det: Detections, radius: int = 4) -> np.ndarray:
    """Return a copy of ``image`` (RGB uint8) with a ring of ``radius`` px per nucleus."""
    from skimage.draw import circle_perimeter

    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    colors = np.asarray(det.class_colors, dtype=np.uint8)
    for (x, y), k in zip(det.xy, det.class_ids):
        for r in (radius, radius + 1):  # two pixels wide, visible at 100 %
            rr, cc = circle_perimeter(int(round(y)), int(round(x)), r, shape=(h, w))
            out[rr, cc] = colors[k]
    return out


def write_overlay(path, image: np.ndarray, det: Detections, radius: int = 4) -> None:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(draw_overlay(image, det, radius)).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
