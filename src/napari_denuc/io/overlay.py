"""A PNG picture of the result: the image with each nucleus drawn as a ring in its class colour,
and below it a key of the colours (class name and count)."""

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


SUFFIX = ".overlay.png"  # denuc-predict --overlay writes <stem>.overlay.png
KEY_LINE = 14  # px per class in the key; the default font is about 11 px high


def with_key(picture, det: Detections):
    """``picture`` (PIL) with a white band below it: one colour swatch, class name and count per
    class. Below, not over the image: no nucleus is hidden, and image pixels keep their coordinates."""
    from PIL import Image, ImageDraw

    counts = np.bincount(np.asarray(det.class_ids, np.int64), minlength=len(det.class_names))
    out = Image.new("RGB", (picture.width, picture.height + 6 + KEY_LINE * len(det.class_names)), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, (name, n, color) in enumerate(zip(det.class_names, counts, det.class_colors)):
        y = picture.height + 4 + KEY_LINE * k
        draw.rectangle((4, y, 15, y + 10), fill=tuple(int(c) for c in color))
        draw.text((20, y), f"{name}: {n}", fill=(0, 0, 0))
    return out


def write_overlay(path, image: np.ndarray, det: Detections, radius: int = 4) -> None:
    from PIL import Image

    picture = with_key(Image.fromarray(draw_overlay(image, det, radius)), det)
    buf = _io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
