"""Per-slide output files: QuPath GeoJSON (optionally gzipped), CSV, Parquet, summary JSON.

Every writer streams: it takes a *callable* returning a fresh iterator of Detections (one per
tile from the per-tile store) and holds only one tile and one write buffer at a time, so the
peak memory of an export does not grow with the number of nuclei on the slide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write, atomic_writer
from ..io.naming import safe_name
from ..results import Detections

FORMATS = ("geojson", "csv", "parquet")
PARQUET_ROW_GROUP = 1 << 16  # rows per Parquet row group: big enough for fast scans, small in memory

Chunks = Callable[[], Iterable[Detections]]


def _parquet_schema(det: Detections):
    import pyarrow as pa

    fields = [("x", pa.float64()), ("y", pa.float64()), ("class", pa.string()), ("score", pa.float32())]
    if det.probs is not None:
        fields += [(f"prob_{n}", pa.float32()) for n in det.class_names]
    fields += [("source", pa.string()), ("reviewed", pa.bool_())]
    return pa.schema(fields)


def _parquet_table(dets: list[Detections], schema):
    import pyarrow as pa

    det = dets[0]
    cat = lambda f: np.concatenate([f(d) for d in dets])  # noqa: E731
    names = np.array(det.class_names, dtype=object)
    cols = [cat(lambda d: d.xy[:, 0]), cat(lambda d: d.xy[:, 1]), names[cat(lambda d: d.class_ids)], cat(lambda d: d.scores)]
    if det.probs is not None:
        probs = np.concatenate([d.probs for d in dets])
        cols += [probs[:, j] for j in range(len(det.class_names))]
    cols += [cat(lambda d: d.source), cat(lambda d: d.reviewed)]
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, schema)], schema=schema)


def write_parquet_chunks(path, chunks: Iterable[Detections]) -> Path:
    """Columns ``x, y, class, score, prob_<class>..., source, reviewed``, streamed in row groups.

    x, y are level-0 pixels with pixel centres at integers. The schema follows the first chunk;
    a chunk with other classes raises ValueError (and no file is written).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    with atomic_writer(path) as f:
        writer = schema = None
        buf: list[Detections] = []
        rows = 0

        def flush():
            nonlocal buf, rows
            if buf:
                writer.write_table(_parquet_table(buf, schema), row_group_size=PARQUET_ROW_GROUP)
            buf, rows = [], 0

        try:
            for det in chunks:
                if schema is None:
                    first = det
                    schema = _parquet_schema(det)
                    writer = pq.ParquetWriter(f, schema, compression="zstd")
                elif det.class_names != first.class_names or (det.probs is None) != (first.probs is None):
                    raise ValueError(f"chunks disagree on the classes ({det.class_names} vs {first.class_names})")
                if len(det):
                    buf.append(det)
                    rows += len(det)
                if rows >= PARQUET_ROW_GROUP:
                    flush()
            if writer is None:  # no chunk at all: an empty table of the class-free schema
                empty = Detections(np.zeros((0, 2)), [], [])
                schema = _parquet_schema(empty)
                writer = pq.ParquetWriter(f, schema, compression="zstd")
                buf = [empty]
            flush()
        finally:
            if writer is not None:
                writer.close()
    return path


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


def per_class_path(geojson_path: Path, class_name: str) -> Path:
    """``<stem>.<class>.geojson[.gz]`` beside ``<stem>.geojson[.gz]`` (class name made file-safe)."""
    name = geojson_path.name
    suffix = ".geojson.gz" if name.endswith(".geojson.gz") else ".geojson"
    return geojson_path.with_name(f"{name[: -len(suffix)]}.{safe_name(class_name)}{suffix}")


def summary_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}.summary.json"


def write_outputs(paths: dict[str, Path], chunks: Chunks, gzip: bool = False, per_class=None) -> dict[str, Path]:
    """Write every format in ``paths`` from ``chunks()`` (called once per file), streaming.

    ``per_class``: class names; with it, the GeoJSON is also written as one file per class
    (``<stem>.<class>.geojson``; some QuPath users import classes as separate layers).
    Returns every file written, keyed by format (``geojson:<class>`` for per-class files).
    """
    from ..io.csv import write_csv_chunks
    from ..io.geojson import write_geojson_chunks

    written = {}
    for fmt, p in paths.items():
        if fmt == "geojson":
            written[fmt] = write_geojson_chunks(p, chunks(), gzip=gzip)
            seen: set[Path] = set()
            for k, name in enumerate(per_class or ()):
                target = per_class_path(p, name)
                if target in seen:  # two class names with the same file-safe form
                    target = per_class_path(p, f"{name}-{k + 1}")
                seen.add(target)
                one = (d.take(d.class_ids == k) for d in chunks())
                written[f"geojson:{name}"] = write_geojson_chunks(target, one, gzip=gzip)
        elif fmt == "csv":
            written[fmt] = write_csv_chunks(p, chunks())
        elif fmt == "parquet":
            written[fmt] = write_parquet_chunks(p, chunks())
    return written


def write_summary(path: Path, summary: dict) -> None:
    atomic_write(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def read_summary(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
