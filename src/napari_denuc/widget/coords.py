"""The one place where library (x, y) meets napari (row, col).

The library speaks ``(x, y)`` in full-resolution pixels (x to the right, y down); napari
speaks ``(row, col)`` = ``(y, x)`` in the data coordinates of the full-resolution image.
Extra leading napari dimensions (z, t) are dropped on the way in.
"""

from __future__ import annotations

import numpy as np


def xy_to_rc(xy) -> np.ndarray:
    """(N, 2) library ``(x, y)`` -> (N, 2) napari ``(row, col)``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.ascontiguousarray(xy[:, ::-1])


def rc_to_xy(rc) -> np.ndarray:
    """(N, >=2) napari ``(..., row, col)`` -> (N, 2) library ``(x, y)``."""
    rc = np.asarray(rc, dtype=np.float64)
    if rc.ndim != 2 or rc.shape[1] < 2:
        rc = rc.reshape(-1, 2)
    return np.ascontiguousarray(rc[:, -2:][:, ::-1])


def box_rc_to_xy(r0, c0, r1, c1) -> tuple[float, float, float, float]:
    """A napari box (row/col corners) -> library ``(x0, y0, x1, y1)``."""
    return (float(min(c0, c1)), float(min(r0, r1)), float(max(c0, c1)), float(max(r0, r1)))
