"""npe2 writers: a Points layer to QuPath GeoJSON or to CSV (x, y, class, score, prob_<class>)."""

from __future__ import annotations

from pathlib import Path


def _write(path: str, data, attributes: dict, suffix: str) -> list[str]:
    from .io.points import write_points
    from .widget.layer import layer_to_detections

    p = Path(path)
    if not p.name.lower().endswith((suffix, suffix + ".gz")):
        p = p.with_name(p.name + suffix)
    det = layer_to_detections(data=data, features=attributes.get("features"), metadata=attributes.get("metadata"))
    write_points(p, det)
    return [str(p)]


def write_geojson(path: str, data, attributes: dict) -> list[str]:
    """Write a Points layer as QuPath GeoJSON (one Point feature per nucleus, classified)."""
    return _write(path, data, attributes, ".geojson")


def write_csv(path: str, data, attributes: dict) -> list[str]:
    """Write a Points layer as CSV with header ``x,y,class,score[,prob_<class>...]``."""
    return _write(path, data, attributes, ".csv")
