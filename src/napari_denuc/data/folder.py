"""Your own images and point files: a folder of images with a point file of the same stem.

::

    <root>/<split>/slide1.png   + slide1.csv       (x,y,class; see io/csv.py)
    <root>/<split>/slide2.tif   + slide2.geojson   (QuPath export; also .json, .geojson.gz)

With split ``"all"`` or None the images are taken from ``<root>`` itself. Images without a
point file are skipped with a warning. Class names are mapped as for QuPath exports on whole
slides (``data.slides.map_classes``): ``class_map`` first, derived classes (``Tumor: Positive``)
by their base name; unclassified objects among classified ones (e.g. a region outline) are left
out and counted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.images import read_image
from ..io.points import POINT_SUFFIXES, read_points
from . import Sample, clean_points
from .slides import map_classes

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


def _used_names(det) -> list[str]:
    return [det.class_names[k] for k in np.unique(det.class_ids)]


def _read(path: Path, class_names):
    det = read_points(path)
    if class_names is None or not det.class_names:
        return det
    ids = all(n.isdigit() for n in det.class_names)  # 1-based class ids name the given classes (io/csv.py)
    one = det.class_names == ("nucleus",) and len(class_names) == 1  # no class column: the only class
    return read_points(path, class_names) if ids or one else det


def load(root, split: str | None = "all", class_names=None, mpp: float | None = None, class_map=None,
         extend: bool = False, default_mpp: float | None = None) -> list[Sample]:
    """Load every annotated image of ``<root>/<split>`` (or of ``root`` for split "all"/None).

    Parameters
    ----------
    class_names : sequence of str, optional
        Fix the classes and their order (e.g. a head's): the files' names are matched to them by
        name, whatever their order; names that match none raise DenucError listing them all.
        By default the classes found across the folder, sorted.
    class_map : dict, optional
        ``{name in the files: class, or None to ignore}`` (``data.slides.parse_class_map``).
    extend : bool
        With ``class_names``: classes ``class_map`` maps to but ``class_names`` lacks are added after them.
    mpp : float, optional
        Resolution of all images, overriding their files.
    default_mpp : float, optional
        Resolution of images whose files state none (default 0.5, with a warning).
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

    dets = [_read(p, class_names) for _, p in pairs]
    found = sorted({n for d in dets for n in _used_names(d)}, key=_natural_key)
    mapping, mapped = map_classes(found, class_map, class_names, extend=extend)
    if class_names is None and not class_map:
        mapped = tuple(sorted(mapped, key=_natural_key))
    class_names = tuple(mapped) or ("nucleus",)
    index = {n: k for k, n in enumerate(class_names)}

    samples, assumed, left_out = [], [], 0
    for (image_path, pts_path), det in zip(pairs, dets):
        image, file_mpp = read_image(image_path)
        if mpp is None and file_mpp is None and default_mpp is None:
            assumed.append(image_path.name)
        remap = np.array([index[mapping[n]] if mapping.get(n) is not None else -1 for n in det.class_names], np.int64)
        labels = remap[det.class_ids] if len(det) else np.zeros(0, np.int64)
        left_out += int((labels < 0).sum())
        pts, labels = clean_points(det.xy[labels >= 0], labels[labels >= 0], image.shape, str(pts_path))
        samples.append(Sample(image_path.stem, image, pts, labels, class_names,
                              float(mpp or file_mpp or default_mpp or DEFAULT_MPP)))
    if left_out:
        warnings.warn(f"{folder}: left out {left_out} unclassified or ignored object(s)", stacklevel=2)
    if assumed:
        warnings.warn(
            f"{folder}: {len(assumed)} image(s) state no resolution (e.g. {assumed[0]}); assumed {DEFAULT_MPP} mpp "
            "(20x); if they are not 20x, give their mpp with --mpp (mpp= in Python)",
            stacklevel=2,
        )
    return samples
