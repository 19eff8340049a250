"""Per-slide output files: QuPath GeoJSON (optionally gzipped), CSV, Parquet, summary JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..results import Detections
from ..io.atomic import atomic_write

FORMATS = ("geojson", "csv", "parquet")


def parquet_bytes(det: Detections) -> bytes:
    """Columns ``x, y, class, score, prob_<class>...`` (x, y in level-0 pixels, pixel centres at integers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.array(det.class_names, dtype=object)
    cols = {
        "x": pa.array(det.xy[:, 0], pa.float64()),
        "y": pa.array(det.xy[:, 1], pa.float64()),
        "class": pa.array(names[det.class_ids].tolist() if len(det) else [], pa.string()),
        "score": pa.array(det.scores, pa.float32()),
    }
    if det.probs is not None:
        for j, n in enumerate(det.class_names):
            cols[f"prob_{n}"] = pa.array(det.probs[:, j], pa.float32())
    table = pa.table(cols)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def output_paths(out_dir: Path, stem: str, formats=FORMATS, gzip: bool = False) -> dict[str, Path]:
    paths = {}
    for f in formats:
        if f == "geojson":
            paths[f] = out_dir / (f"{stem}.geojson.gz" if gzip else f"{stem}.geojson")
        elif f == "csv":
            paths[f] = out_dir / f"{stem}.csv"
        elif f == "parquet":
            paths[f] = out_dir / f"{stem}.parquet"
        else:
            raise ValueError(f"unknown output format {f!r}; choose from {', '.join(FORMATS)}")
    return paths


def summary_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}.summary.json"


def write_outputs(paths: dict[str, Path], det: Detections, gzip: bool = False) -> None:
    from ..io.csv import write_csv
    from ..io.geojson import write_geojson

    for fmt, p in paths.items():
        if fmt == "geojson":
            write_geojson(p, det, gzip=gzip)
        elif fmt == "csv":
            write_csv(p, det)
        elif fmt == "parquet":
            atomic_write(p, parquet_bytes(det))


def write_summary(path: Path, summary: dict) -> None:
    atomic_write(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def read_summary(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
