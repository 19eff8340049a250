"""Point files by suffix: QuPath GeoJSON (``.geojson``, ``.json``, ``.geojson.gz``) or CSV."""

from __future__ import annotations

from pathlib import Path

from ..errors import DenucError
from ..results import Detections
from .csv import read_csv, write_csv
from .geojson import read_geojson, write_geojson

GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
CSV_SUFFIXES = (".csv",)
POINT_SUFFIXES = GEOJSON_SUFFIXES + CSV_SUFFIXES


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(GEOJSON_SUFFIXES):
        return "geojson"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    raise DenucError(f"{path}: unknown point file type; use one of {', '.join(POINT_SUFFIXES)}")


def read_points(path, class_names=None, unclassified: str | None = None) -> Detections:
    """Read a GeoJSON or CSV point file (see :func:`read_geojson`, :func:`read_csv`).

    ``unclassified`` names the class of GeoJSON features without a classification (CSV files
    state their classes in a column).
    """
    path = Path(path)
    if _kind(path) == "csv":
        return read_csv(path, class_names)
    return read_geojson(path, class_names, unclassified=unclassified)


def write_points(path, det: Detections) -> Path:
    """Write ``det`` atomically as GeoJSON or CSV, chosen by the suffix of ``path``."""
    path = Path(path)
    if _kind(path) == "csv":
        return write_csv(path, det)
    return write_geojson(path, det)
