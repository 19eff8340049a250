"""PUMA (melanoma nuclei, 2024 challenge): per-image GeoJSON nucleus polygons.

::

    <root>/images/<id>.tif  (or .png)
    <root>/geojson/<id>_nuclei.geojson   Polygon features, properties.classification.name in
                                         nuclei_tumor, nuclei_lymphocyte, nuclei_plasma_cell,
                                         nuclei_histiocyte, nuclei_melanophage, nuclei_neutrophil,
                                         nuclei_stroma, nuclei_endothelium, nuclei_epithelium,
                                         nuclei_apoptosis
    <root>/<split>.txt                   optional: the ids of a split, one per line

Each polygon becomes one point at its centroid. The ten PUMA classes are merged into
the classes of ``mapping`` (default: tumor, lymphocyte = lymphocyte + plasma cell, other).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.geojson import read_geojson
from ..io.images import read_image
from . import Sample, clean_points

PUMA_CLASSES = (
    "tumor", "lymphocyte", "plasma_cell", "histiocyte", "melanophage",
    "neutrophil", "stroma", "endothelium", "epithelium", "apoptosis",
)  # fmt: skip
DEFAULT_MAPPING = {"tumor": "tumor", "lymphocyte": "lymphocyte", "plasma_cell": "lymphocyte"} | {
    c: "other" for c in PUMA_CLASSES[2:] if c != "plasma_cell"
}
MPP = 0.25  # the PUMA ROIs are 40x
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def _short(name: str) -> str:
    return name[len("nuclei_"):] if name.startswith("nuclei_") else name


def load(root, split: str = "all", mapping: dict | None = None, mpp: float = MPP) -> list[Sample]:
    """Load PUMA images and nuclei.

    Parameters
    ----------
    root : path-like
    split : str
        Ids are read from ``<root>/<split>.txt`` when it exists; ``"all"`` without such a
        file takes every image in ``<root>/images``.
    mapping : dict[str, str or None], optional
        PUMA class (with or without the ``nuclei_`` prefix) -> class name. Classes mapped to
        None are dropped; unmapped classes found in a file raise DenucError. The output
        classes are the mapping's values in first-seen order.
    mpp : float
        Resolution of the images (0.25, 40x, by default).
    """
    root = Path(root)
    mapping = {_short(k): v for k, v in (DEFAULT_MAPPING if mapping is None else mapping).items()}
    class_names = tuple(dict.fromkeys(v for v in mapping.values() if v is not None))
    if not class_names:
        raise DenucError("PUMA: the class mapping keeps no class; map at least one PUMA class to a name")
    image_dir, label_dir = root / "images", root / "geojson"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise DenucError(f"PUMA: expected folders images/ and geojson/ under {root}; check --root")
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        ids = [Path(s).stem for s in split_file.read_text().split()]
    elif split in (None, "all"):
        ids = sorted({p.stem for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
    else:
        raise DenucError(
            f"PUMA split {split!r} not found: no file {split_file}; list its image ids there or use split 'all'"
        )
    if not ids:
        raise DenucError(f"PUMA: no images (.tif or .png) in {image_dir}")

    samples = []
    for sid in ids:
        image_path = next((image_dir / f"{sid}{s}" for s in IMAGE_SUFFIXES if (image_dir / f"{sid}{s}").is_file()), None)
        label_path = label_dir / f"{sid}_nuclei.geojson"
        if image_path is None or not label_path.is_file():
            raise DenucError(f"PUMA: image {sid}.tif/.png or its {label_path.name} is missing under {root}")
        image, _ = read_image(image_path)
        det = read_geojson(label_path)
        names = [_short(n) for n in det.class_names]
        unknown = sorted(set(names[k] for k in np.unique(det.class_ids)) - set(mapping))
        if unknown:
            raise DenucError(f"PUMA: {label_path.name} has class(es) {', '.join(unknown)} that the mapping does not cover")
        target = np.array([class_names.index(mapping[n]) if n in mapping and mapping[n] is not None else -1 for n in names])
        labels = target[det.class_ids] if len(det) else np.zeros(0, dtype=np.int64)
        keep = labels >= 0
        pts, labels = clean_points(det.xy[keep], labels[keep], image.shape, str(label_path))
        samples.append(Sample(sid, image, pts, labels, class_names, float(mpp)))
    return samples
