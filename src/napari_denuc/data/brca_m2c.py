"""BRCA-M2C (Abousamra et al., ICCV 2021), in its official layout.

``images/<stem>.png``, ``labels/<stem>_gt_class_coords.txt`` with one ``Y X class`` row
per nucleus (1 lymphocyte, 2 tumor/epithelial, 3 stromal) and split files
``brca_ds_{train,val,test}.txt`` listing image file names. 20x, about 0.5 mpp.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.images import read_image
from . import Sample, clean_points

CLASS_NAMES = ("lymphocyte", "tumor", "stromal")
MPP = 0.5
SPLITS = ("train", "val", "test")


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``Y X class`` rows; malformed rows are skipped with a warning naming the line."""
    pts, cls = [], []
    bad = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.replace(",", " ").split()
        try:
            y, x, c = float(parts[0]), float(parts[1]), float(parts[2])
            # "2.5" or "inf" as a class is as malformed as a missing column.
            if len(parts) != 3 or c not in range(1, len(CLASS_NAMES) + 1) or not np.isfinite([x, y]).all():
                raise ValueError
            c = int(c)
        except (ValueError, IndexError):
            bad.append(lineno)
            continue
        pts.append((x, y))
        cls.append(c - 1)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed row(s), first at line {bad[0]}", stacklevel=2)
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2), np.asarray(cls, dtype=np.int64)


def load(root, split: str = "train") -> list[Sample]:
    """Load one split (``train``, ``val``; ``test`` when its split file is present).

    Raises DenucError for an unknown or missing split and for missing image/label files.
    """
    root = Path(root)
    if split not in SPLITS:
        raise DenucError(f"unknown BRCA-M2C split {split!r}; use one of {', '.join(SPLITS)}")
    split_file = root / f"brca_ds_{split}.txt"
    if not split_file.is_file():
        hint = " (the test split is held back for independent evaluation)" if split == "test" else ""
        raise DenucError(f"BRCA-M2C split file {split_file} not found{hint}; check the data folder or pick another split")
    samples = []
    for name in split_file.read_text().split():
        stem = Path(name).stem
        image_path = root / "images" / f"{stem}.png"
        label_path = root / "labels" / f"{stem}_gt_class_coords.txt"
        if not image_path.is_file() or not label_path.is_file():
            raise DenucError(f"BRCA-M2C: {image_path.name} or its label file is missing under {root}")
        image, _ = read_image(image_path)
        pts, cls = read_labels(label_path)
        pts, cls = clean_points(pts, cls, image.shape, str(label_path))
        samples.append(Sample(stem, image, pts, cls, CLASS_NAMES, MPP))
    return samples
