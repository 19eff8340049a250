"""Data set loaders. Each returns a list of :class:`Sample`.

``load_dataset("brca_m2c", root, "train")`` picks the loader by name; the generic
``folder`` format lets users bring their own images and point files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DenucError
from ..geometry import inside_image


@dataclass
class Sample:
    """One annotated image.

    ``image`` is (H, W, 3) uint8 RGB; ``points`` (N, 2) float (x, y) in its pixels;
    ``labels`` (N,) int, 0-based indices into ``class_names``; ``mpp`` micrometres per pixel.
    """

    name: str
    image: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    mpp: float


DATASET_NAMES = ("brca_m2c", "ocelot", "puma", "folder")


def load_dataset(name: str, root, split: str = "train", **options) -> list[Sample]:
    """Load ``split`` of data set ``name`` (one of DATASET_NAMES) stored under ``root``."""
    import importlib

    if name not in DATASET_NAMES:
        raise DenucError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").load(root, split, **options)


def clean_points(points, labels, shape, source: str):
    """Drop points outside the image (with a warning naming ``source``); return float/int arrays."""
    import warnings

    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    h, w = shape[:2]
    inside = inside_image(points, shape)
    if not inside.all():
        # most points outside: typically a QuPath export of a region's objects, in whole-slide pixels
        hint = "; are they in whole-slide coordinates? They must be in this image's own pixels" if inside.sum() < (~inside).sum() else ""
        warnings.warn(f"{source}: dropped {int((~inside).sum())} point(s) outside the {w}x{h} image{hint}", stacklevel=3)
    return points[inside], labels[inside]
