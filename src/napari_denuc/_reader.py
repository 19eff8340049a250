"""npe2 reader: nuclei point files (QuPath GeoJSON, ``.geojson.gz``, CSV with x,y[,class]).

``get_reader`` returns None for anything it does not handle, so napari falls back to other
readers (a ``.csv`` or ``.json`` that is not a point file is left alone).
"""

from __future__ import annotations

import gzip
from pathlib import Path

_SNIFF_BYTES = 65536


def _sniff_json(path: Path) -> bool:
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(_SNIFF_BYTES).decode("utf-8", errors="ignore")
    except OSError:
        return False
    return '"Feature' in head or '"geometry"' in head


def _sniff_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig", errors="ignore") as f:
            first = f.readline()
    except OSError:
        return False
    cells = [c.strip().strip('"').lower() for c in first.split(",")]
    if "x" in cells and "y" in cells:
        return True
    try:  # headerless x,y[,class[,score]] (OCELOT layout)
        float(cells[0]), float(cells[1])
        return True
    except (ValueError, IndexError):
        return False


def get_reader(path):
    """Return a reader function when ``path`` is a point file this plugin reads, else None."""
    if isinstance(path, (list, tuple)):
        if not path:
            return None
        return read_point_files if all(get_reader(p) is not None for p in path) else None
    p = Path(str(path))
    name = p.name.lower()
    if not p.is_file():
        return None
    if name.endswith((".geojson", ".geojson.gz")):
        return read_point_files
    if name.endswith((".json", ".json.gz")):
        return read_point_files if _sniff_json(p) else None
    if name.endswith(".csv"):
        return read_point_files if _sniff_csv(p) else None
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".geojson.gz", ".json.gz", ".geojson", ".json", ".csv"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_point_files(path) -> list[tuple]:
    """Read one or more point files into Points layer data tuples (napari (row, col) coordinates)."""
    from .io.points import read_points
    from .widget.layer import layer_data_tuple

    paths = path if isinstance(path, (list, tuple)) else [path]
    out = []
    for p in paths:
        p = Path(str(p))
        det = read_points(p)
        out.append(layer_data_tuple(det, _stem(p), source=None, reviewed=None, extra_metadata={"path": str(p)}))
    return out
