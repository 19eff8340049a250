"""QuPath GeoJSON: point detections out, points / polygons / QuPath annotations in.

Coordinates. QuPath (like GeoJSON exported from it) uses continuous image coordinates in
which pixel (0, 0) covers [0, 1) x [0, 1), so the centre of that pixel is (0.5, 0.5). The
library puts pixel centres at integer coordinates (docs/architecture.md). Writing therefore
adds :data:`PIXEL_OFFSET` and reading subtracts it, so a nucleus drawn on a pixel in QuPath
lands on that pixel here and the other way round.

What is read (:func:`read_geojson`):

- a ``FeatureCollection``, a bare list of Features, or a single Feature; ``.gz`` files;
- ``Point`` and ``MultiPoint`` geometries, one nucleus per point (QuPath "Points"
  annotations are one MultiPoint per class);
- ``Polygon`` / ``MultiPolygon`` geometries, one nucleus each, at the area centroid
  (PUMA and QuPath cell exports draw nuclei as polygons);
- other geometries (lines, null) are skipped with a warning;
- ``classification`` as ``{"name", "color"}`` (QuPath >= 0.3), ``{"name", "colorRGB"}``
  (packed integer, QuPath 0.2) or a bare string; features without one get the class
  ``"nucleus"`` when no feature in the file is classified, else ``"Unclassified"``;
- ``measurements`` as a dict (QuPath >= 0.3) or a list of ``{"name", "value"}``: ``score``
  (default 1.0), ``reviewed`` (0/1, default 0) and ``prob <class>`` (when some nucleus has one
  for every class; NaN for the nuclei that have not, such as those placed by hand);
- the nucleus' ``source`` from ``metadata.source`` (a string; QuPath keeps ``metadata``), a
  plain ``source`` property, or the numeric ``source`` measurement (an index into
  :data:`SOURCE_CODES`); else ``"user"`` for a classified QuPath *annotation* (points a person
  placed with QuPath's Points tool; algorithms make *detections*), ``"model"`` for the rest.

What is written (:func:`write_geojson`, :func:`write_geojson_chunks`): one ``Point``
detection per nucleus, classified, with the measurements ``score``, ``prob <class>``,
``reviewed`` and ``source`` (code) and ``metadata.source`` (the string).
"""

from __future__ import annotations

import gzip as _gzip
import json
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..results import DEFAULT_SOURCE, Detections, default_colors, index_classes
from .atomic import atomic_writer

PIXEL_OFFSET = 0.5  # QuPath coordinate of the centre of pixel (0, 0)
UNLABELLED = "nucleus"  # class when the whole file is unclassified
UNCLASSIFIED = "Unclassified"  # class for unclassified features among classified ones


# QuPath keeps only numeric ``measurements`` and string ``metadata`` of what it imports
# (PathObjectTypeAdapters, QuPath 0.4-0.6; metadata of detections from 0.6 on). So ``reviewed``
# is a 0/1 measurement, ``source`` is a metadata string and, for filtering in QuPath 0.5,
# also a numeric ``source`` measurement: its index in SOURCE_CODES (absent for other sources).
SOURCE_CODES = ("model", "user", "imported", "edited")


def _num(v: float) -> str:
    return repr(float(v))  # shortest round-trip form; JSON-valid for finite values


def iter_features(det: Detections):
    """Yield the GeoJSON text of each nucleus of ``det``, one ``Feature`` object per string.

    Built as text, not via per-feature dicts, because a whole slide holds millions of nuclei
    (about 3 times faster than json.dumps of a dict per feature).
    """
    classes = [
        json.dumps({"name": n, "color": list(det.class_colors[k])}) for k, n in enumerate(det.class_names)
    ]
    prob_keys = [json.dumps(f"prob {n}") for n in det.class_names]
    xy = det.xy + PIXEL_OFFSET
    codes = {s: k for k, s in enumerate(SOURCE_CODES)}
    meta_cache: dict[str, tuple[str, str]] = {}
    for i in range(len(det)):
        m = [f'"score": {_num(det.scores[i])}']
        if det.probs is not None:
            m += [f"{prob_keys[j]}: {_num(p)}" for j, p in enumerate(det.probs[i]) if np.isfinite(p)]
        src = det.source[i]
        if src not in meta_cache:
            code = codes.get(src)
            meta_cache[src] = ("" if code is None else f', "source": {code}', json.dumps({"source": src}))
        code, meta = meta_cache[src]
        m.append(f'"reviewed": {1 if det.reviewed[i] else 0}{code}')
        yield (
            f'{{"type": "Feature", "id": "{uuid.uuid4()}", '
            f'"geometry": {{"type": "Point", "coordinates": [{_num(xy[i, 0])}, {_num(xy[i, 1])}]}}, '
            f'"properties": {{"objectType": "detection", "classification": {classes[int(det.class_ids[i])]}, '
            f'"measurements": {{{", ".join(m)}}}, "metadata": {meta}}}}}'
        )


def geojson_dict(det: Detections) -> dict:
    """Return ``det`` as a QuPath-readable GeoJSON ``FeatureCollection`` (a plain dict)."""
    return {"type": "FeatureCollection", "features": [json.loads(f) for f in iter_features(det)]}


def write_geojson(path, det: Detections, gzip: bool | None = None) -> Path:
    """Write ``det`` to ``path`` as QuPath GeoJSON, atomically.

    Parameters
    ----------
    path : path-like
        Output file; ``.geojson`` is what QuPath's File > Import objects expects.
    det : Detections
    gzip : bool or None
        Compress; by default when ``path`` ends in ``.gz``.
    """
    return write_geojson_chunks(path, [det], gzip=gzip)


def write_geojson_chunks(path, chunks, gzip: bool | None = None) -> Path:
    """Write the nuclei of an iterable of Detections as one FeatureCollection, streaming.

    Only one chunk and one text buffer are in memory at a time, so a whole slide's nuclei can
    be written from the per-tile store in bounded memory. Atomic like :func:`write_geojson`.
    """
    path = Path(path)
    if gzip is None:
        gzip = path.name.lower().endswith(".gz")
    with atomic_writer(path) as raw:
        out = _gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if gzip else raw
        try:
            out.write(b'{"type": "FeatureCollection", "features": [')
            sep = "\n"
            for det in chunks:
                buf = []
                for text in iter_features(det):
                    buf.append(sep)
                    buf.append(text)
                    sep = ",\n"
                    if len(buf) >= 8192:
                        out.write("".join(buf).encode("utf-8"))
                        buf = []
                out.write("".join(buf).encode("utf-8"))
            out.write(b"\n]}\n")
        finally:
            if gzip:
                out.close()  # flushes the gzip trailer into ``raw``; does not close ``raw``
    return path


# ---------------------------------------------------------------- reading


def _load_json(path: Path):
    if not path.is_file():
        raise DenucError(f"point file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
        try:
            raw = _gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DenucError(f"{path}: corrupt gzip file ({exc})") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = str(exc).splitlines()[0]
        raise DenucError(f"{path} is not valid JSON ({msg}); export it again from QuPath as GeoJSON") from None


def _features(obj, path: Path) -> list:
    if isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    else:
        raise DenucError(f"{path} is not GeoJSON (expected a FeatureCollection, a Feature or a list of Features)")
    if not isinstance(feats, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in feats):
        raise DenucError(f"{path} is not GeoJSON: every entry must be an object with \"type\": \"Feature\"")
    return feats


def _ring_centroid(ring) -> tuple[float, float, float]:
    """Signed area and area centroid of a closed or open ring (falls back to the vertex mean)."""
    p = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        raise ValueError("empty ring")
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    if abs(area) < 1e-12:  # degenerate (a line or a single point)
        return 0.0, float(x.mean()), float(y.mean())
    return area, float(((x + x1) * cross).sum() / (6 * area)), float(((y + y1) * cross).sum() / (6 * area))


def _polygon_centroid(polygons) -> tuple[float, float]:
    """Area centroid of a list of polygons, each a list of rings (exterior first, then holes)."""
    total, cx, cy = 0.0, 0.0, 0.0
    means = []
    for rings in polygons:
        for r, ring in enumerate(rings):
            a, x, y = _ring_centroid(ring)
            a = abs(a) * (1 if r == 0 else -1)  # holes subtract, whatever their winding
            total += a
            cx += a * x
            cy += a * y
            if r == 0:
                means.append((x, y))
    if abs(total) < 1e-12:
        if not means:
            raise ValueError("empty polygon")
        return tuple(np.mean(means, axis=0))
    return cx / total, cy / total


def _points_of(geom) -> list[tuple[float, float]] | None:
    """The nucleus positions of one geometry, or None for a geometry that is not a nucleus."""
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Point":
        return [(float(coords[0]), float(coords[1]))]
    if kind == "MultiPoint":
        return [(float(c[0]), float(c[1])) for c in coords]
    if kind == "Polygon":
        return [_polygon_centroid([coords])]
    if kind == "MultiPolygon":
        return [_polygon_centroid(coords)]
    if kind == "GeometryCollection":
        out = []
        for g in geom.get("geometries") or []:
            out += _points_of(g) or []
        return out
    return None


def _color(cls: dict):
    c = cls.get("color")
    if isinstance(c, (list, tuple)) and len(c) >= 3:
        return tuple(int(v) for v in c[:3])
    if isinstance(cls.get("colorRGB"), int):  # QuPath 0.2: packed (A)RGB, possibly negative
        v = cls["colorRGB"] & 0xFFFFFF
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    return None


def _measurements(props: dict) -> dict:
    m = props.get("measurements")
    if isinstance(m, dict):
        return m
    if isinstance(m, list):  # QuPath 0.2: [{"name": ..., "value": ...}, ...]
        return {e.get("name"): e.get("value") for e in m if isinstance(e, dict)}
    return {}


def _source_of(props: dict, m: dict) -> str:
    """Where a nucleus comes from: metadata string, plain property, numeric code, else "model"."""
    meta = props.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("source"), str):
        return meta["source"]
    if isinstance(props.get("source"), str):
        return props["source"]
    code = m.get("source")
    if isinstance(code, (int, float)) and float(code).is_integer() and 0 <= code < len(SOURCE_CODES):
        return SOURCE_CODES[int(code)]
    if props.get("objectType") == "annotation" and props.get("classification"):
        return "user"  # drawn and classified by a person in QuPath (its Points tool); algorithms make detections
    return DEFAULT_SOURCE


def _reviewed_of(props: dict, m: dict) -> bool:
    v = m.get("reviewed", props.get("reviewed"))
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return isinstance(v, (int, float)) and bool(v) and v == v  # NaN is not reviewed


def read_geojson(path, class_names=None, unclassified: str | None = None) -> Detections:
    """Read nuclei from a GeoJSON file (see the module docstring for what is accepted).

    Parameters
    ----------
    path : path-like
        ``.geojson``, ``.json`` or gzip-compressed (``.geojson.gz``).
    class_names : sequence of str, optional
        Fix the class order (e.g. the classes of a trained head). Classes in the file that
        are not listed raise DenucError naming them. By default classes are ordered by
        first appearance in the file.
    unclassified : str, optional
        Class of the features without a classification, whether or not others have one
        (training from QuPath exports passes ``"Unclassified"`` to leave them out).

    Returns
    -------
    Detections
        Points in library pixel coordinates (see :data:`PIXEL_OFFSET`).
    """
    path = Path(path)
    feats = _features(_load_json(path), path)
    classified = any(isinstance((f.get("properties") or {}).get("classification"), (dict, str)) for f in feats)
    xy, names, scores, meas, sources, reviewed = [], [], [], [], [], []
    colors: dict[str, tuple] = {}
    skipped = 0
    for i, f in enumerate(feats):
        props = f.get("properties") or {}
        cls = props.get("classification")
        if isinstance(cls, str):
            name = cls
        elif isinstance(cls, dict) and isinstance(cls.get("name"), str):
            name = cls["name"]
            if _color(cls) is not None:
                colors.setdefault(name, _color(cls))
        else:
            name = unclassified or (UNCLASSIFIED if classified else UNLABELLED)
        geom = f.get("geometry")
        try:
            pts = _points_of(geom) if isinstance(geom, dict) else None
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise DenucError(f"{path}: feature {i} has malformed {geom.get('type')} coordinates ({exc})") from None
        if pts is None:
            skipped += 1
            continue
        m = _measurements(props)
        try:
            score = float(m.get("score", 1.0))
        except (TypeError, ValueError):
            raise DenucError(f"{path}: feature {i} has a non-numeric score {m.get('score')!r}") from None
        src, rev = _source_of(props, m), _reviewed_of(props, m)
        for p in pts:
            xy.append(p)
            names.append(name)
            scores.append(score)
            meas.append(m)
            sources.append(src)
            reviewed.append(rev)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} feature(s) that are not points or polygons", stacklevel=2)

    class_names, ids = index_classes(names, class_names, str(path), "rename them in QuPath or pick matching classes")
    defaults = default_colors(len(class_names))
    class_colors = tuple(colors.get(n, defaults[k]) for k, n in enumerate(class_names))

    probs = None
    keys = [f"prob {n}" for n in class_names]
    has = [all(isinstance(m.get(k), (int, float)) for k in keys) for m in meas]
    if any(has):  # nuclei placed by hand have none (the writer leaves NaN out): NaN rows for them
        probs = np.array([[m[k] for k in keys] if ok else [np.nan] * len(keys) for m, ok in zip(meas, has)], dtype=np.float32)

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        raise DenucError(f"{path}: some coordinates are NaN or infinite")
    return Detections(
        xy=xy - PIXEL_OFFSET,
        scores=np.asarray(scores, dtype=np.float32),
        class_ids=np.asarray(ids, dtype=np.int64),
        class_names=class_names,
        class_colors=class_colors,
        probs=probs,
        source=np.array(sources, dtype=object),
        reviewed=np.array(reviewed, dtype=bool),
    )
