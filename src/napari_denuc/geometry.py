"""Point geometry shared by every module that resizes images.

Pixel centres sit at integer coordinates: pixel ``i`` covers ``[i - 0.5, i + 0.5)``. Scaling an
image by ``factor`` therefore maps a point ``x`` to ``(x + 0.5) * factor - 0.5``, not
``x * factor``: the two differ by ``(factor - 1) / 2`` px, which is 0.5 px at a 2x level and
1.5 px at 4x.
"""

from __future__ import annotations

import numpy as np


def rescale_points(xy, factor):
    """Map points ``xy`` (..., 2) into an image resized by ``factor`` (a scalar or (fx, fy)).

    ``factor`` is new size / old size: 2.0 doubles the image, 0.25 is a level-2 pyramid
    downsample of 4. The result is float64.
    """
    xy = np.asarray(xy, dtype=np.float64)
    factor = np.broadcast_to(np.asarray(factor, dtype=np.float64), (2,))
    if np.all(factor == 1.0):
        return xy.copy()
    return (xy + 0.5) * factor - 0.5


def inside_image(xy, shape) -> np.ndarray:
    """Which points ``xy`` (N, 2) lie on an image of ``shape`` ``(h, w, ...)``: boolean (N,).

    The one rule for "on the image" (pixel ``i`` covers ``[i - 0.5, i + 0.5)``): a point off the
    image has no pixels to describe it, so its features would be read at a clamped border.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    h, w = shape[:2]
    return (xy[:, 0] >= -0.5) & (xy[:, 0] < w - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] < h - 0.5)
