"""OCELOT 2023 cell annotations (Ryu et al., CVPR 2023), in the official layout.

::

    <root>/metadata.json                        {"sample_pairs": {"<id>": {"cell": {"resized_mpp_x": ..,
                                                                                    "resized_mpp_y": ..}, ...}}}
    <root>/images/<split>/cell/<id>.jpg         1024 x 1024 cell patches, about 0.2 mpp
    <root>/annotations/<split>/cell/<id>.csv    one ``x,y,class`` row per cell, no header,
                                                1 = background cell, 2 = tumor cell

The tissue patches are not used.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.images import read_image
from . import Sample, clean_points

CLASS_NAMES = ("background", "tumor")
MPP = 0.2  # used when metadata.json does not give a patch's resolution
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif")


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``x,y,class`` rows; malformed rows are skipped with a warning naming the first line."""
    pts, cls, bad = [], [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            x, y, c = float(parts[0]), float(parts[1]), float(parts[2])
            if len(parts) != 3 or c not in range(1, len(CLASS_NAMES) + 1) or not np.isfinite([x, y]).all():
                raise ValueError
        except (ValueError, IndexError):
            bad.append(lineno)
            continue
        pts.append((x, y))
        cls.append(int(c) - 1)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed row(s), first at line {bad[0]}", stacklevel=2)
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2), np.asarray(cls, dtype=np.int64)


def _mpp_table(root: Path) -> dict:
    path = root / "metadata.json"
    if not path.is_file():
        return {}
    try:
        pairs = json.loads(path.read_text()).get("sample_pairs", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DenucError(f"OCELOT: cannot read {path} ({exc}); restore it from the data set download") from None
    out = {}
    for sid, meta in pairs.items():
        cell = (meta or {}).get("cell") or {}
        vals = [cell.get(k) for k in ("resized_mpp_x", "resized_mpp_y") if isinstance(cell.get(k), (int, float))]
        if vals and min(vals) > 0:
            out[str(sid)] = float(np.mean(vals))
    return out


def load(root, split: str = "train") -> list[Sample]:
    """Load the cell patches of one split (``train``, ``val`` or ``test``).

    The resolution comes from ``metadata.json`` (the mean of ``resized_mpp_x`` and
    ``resized_mpp_y``); patches it does not cover get 0.2 mpp with a warning.
    """
    root = Path(root)
    label_dir = root / "annotations" / str(split) / "cell"
    image_dir = root / "images" / str(split) / "cell"
    if not label_dir.is_dir():
        raise DenucError(f"OCELOT split {split!r} not found: no folder {label_dir}; check --root or pick another split")
    mpps = _mpp_table(root)
    samples, no_mpp = [], []
    for label_path in sorted(label_dir.glob("*.csv")):
        sid = label_path.stem
        image_path = next((image_dir / f"{sid}{s}" for s in IMAGE_SUFFIXES if (image_dir / f"{sid}{s}").is_file()), None)
        if image_path is None:
            raise DenucError(f"OCELOT: no image for {label_path.name} in {image_dir}")
        image, _ = read_image(image_path)
        pts, cls = read_labels(label_path)
        pts, cls = clean_points(pts, cls, image.shape, str(label_path))
        if sid not in mpps:
            no_mpp.append(sid)
        samples.append(Sample(sid, image, pts, cls, CLASS_NAMES, mpps.get(sid, MPP)))
    if not samples:
        raise DenucError(f"OCELOT split {split!r}: no annotation files in {label_dir}")
    if no_mpp:
        warnings.warn(
            f"OCELOT: no resolution in metadata.json for {len(no_mpp)} patch(es) (e.g. {no_mpp[0]}); assumed {MPP} mpp",
            stacklevel=2,
        )
    return samples
