"""Your own images and point files: a folder of images with a point file of the same stem.

::

    <root>/<split>/slide1.png   + slide1.csv       (x,y,class; see io/csv.py)
    <root>/<split>/slide2.tif   + slide2.geojson   (QuPath export; also .json, .geojson.gz)

With split ``"all"`` or None the images are taken from ``<root>`` itself. Images without a
point file are skipped with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.images import read_image
from ..io.points import POINT_SUFFIXES, read_points
from . import Sample, clean_points

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_MPP = 0.5


def _natural_key(name: str):
    # Integer class ids from CSV files ("1", "2", "10") sort as numbers.
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _point_file(image_path: Path) -> Path | None:
    for suffix in POINT_SUFFIXES:
        p = image_path.with_name(image_path.stem + suffix)
        if p.is_file():
            return p
    return None


def load(root, split: str | None = "all", class_names=None, mpp: float | None = None) -> list[Sample]:
    """Load every annotated image of ``<root>/<split>`` (or of ``root`` for split "all"/None).

    Parameters
    ----------
    class_names : sequence of str, optional
        Fix the classes (and their order); names not listed raise DenucError. By default the
        classes found across the folder, sorted.
    mpp : float, optional
        Resolution of all images. By default each TIFF's own resolution, else 0.5 with a warning.
    """
    root = Path(root)
    folder = root if split in (None, "all") else root / split
    if not folder.is_dir():
        hint = "" if split in (None, "all") else "; use split 'all' to read images directly from the root folder"
        raise DenucError(f"folder {folder} not found{hint}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    pairs, unannotated = [], []
    for image_path in images:
        pts_path = _point_file(image_path)
        if pts_path is None:
            unannotated.append(image_path.name)
        else:
            pairs.append((image_path, pts_path))
    if unannotated:
        n = len(unannotated)
        warnings.warn(f"{folder}: skipped {n} image(s) without a point file, e.g. {unannotated[0]}", stacklevel=2)
    if not pairs:
        raise DenucError(f"no images with point files (same name, .csv or .geojson) in {folder}")

    dets = [read_points(p, class_names) for _, p in pairs]
    if class_names is None:
        used = {d.class_names[k] for d in dets for k in np.unique(d.class_ids)}
        class_names = tuple(sorted(used, key=_natural_key)) or ("nucleus",)
    class_names = tuple(class_names)

    samples, assumed = [], []
    for (image_path, pts_path), det in zip(pairs, dets):
        image, file_mpp = read_image(image_path)
        if mpp is None and file_mpp is None:
            assumed.append(image_path.name)
        remap = np.array([class_names.index(n) if n in class_names else -1 for n in det.class_names], dtype=np.int64)
        pts, labels = clean_points(det.xy, remap[det.class_ids], image.shape, str(pts_path))
        samples.append(Sample(image_path.stem, image, pts, labels, class_names, float(mpp or file_mpp or DEFAULT_MPP)))
    if assumed:
        warnings.warn(
            f"{folder}: {len(assumed)} image(s) state no resolution (e.g. {assumed[0]}); "
            f"assumed {DEFAULT_MPP} mpp, pass mpp= to override",
            stacklevel=2,
        )
    return samples
