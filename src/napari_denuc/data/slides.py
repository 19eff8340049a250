"""Whole slides with point files (QuPath exports) as a training set: ``--data slides=LIST.csv``.

``LIST.csv`` has a header naming its columns::

    slide,points,mpp
    /data/case1.svs,/exports/case1.geojson,
    case2.ndpi,case2.geojson.gz,0.2525

``slide`` and ``points`` are required (relative paths are relative to the list's folder); ``mpp``
is optional and overrides the slide's own metadata. Point files are anything
``io.points.read_points`` reads: QuPath GeoJSON (detections or annotations; ``Point``,
``MultiPoint``, polygons -> centroids; ``.geojson.gz``) or CSV.

No pixels are read here: a :class:`SlideSample` holds the slide's path and its points, and the
features are read window by window from the slide (``wsi.slide_features``) when a head is trained.

Class names are mapped as QuPath writes them (:func:`map_classes`): an explicit map first
(``"Tumor=tumour,Immune cells=lymphocyte"``; ``"Necrosis="`` ignores a class), then derived
classes (``Tumor: Positive``) by their base name, then names that already are target classes.
Unclassified objects are ignored and counted; names that map nowhere are listed in one error.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..geometry import inside_image

UNCLASSIFIED = "Unclassified"  # what io.geojson names objects without a classification
REQUIRED_COLUMNS = ("slide", "points")


@dataclass
class SlideSample:
    """One slide's annotated nuclei. ``points`` (N, 2) level-0 (x, y); ``labels`` index ``class_names``;
    ``mpp`` is the level-0 mpp (from the list, else the slide's metadata); ``skipped`` counts what
    was left out (``unclassified``, ``ignored``, ``outside``)."""

    name: str
    path: Path
    points: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    mpp: float
    points_path: Path
    reader: str = ""
    skipped: dict = field(default_factory=dict)


def parse_class_map(text: str | None) -> dict[str, str | None]:
    """``"Tumor=tumour,Immune cells=lymphocyte,Necrosis="`` -> {QuPath name: head class or None (ignore)}."""
    if not text:
        return {}
    out: dict[str, str | None] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        src, sep, dst = part.partition("=")
        src, dst = src.strip(), dst.strip()
        if not sep or not src:
            raise DenucError(f"--class-map expects 'QuPath name=class' pairs separated by commas, got {part.strip()!r}")
        out[src] = dst or None
    return out


def base_name(name: str) -> str:
    """QuPath's derived classes are written ``Base: Sub`` (e.g. ``Tumor: Positive``)."""
    return name.split(":", 1)[0].strip()


def map_classes(names, class_map: dict | None = None, targets=None, extend: bool = False):
    """Map QuPath class names to head classes.

    Parameters
    ----------
    names : iterable of str
        The class names found in the point files.
    class_map : dict, optional
        From :func:`parse_class_map`; a value of None ignores that name.
    targets : sequence of str, optional
        The head's classes (e.g. those of the head being retrained). Without them the classes are
        the map's values (in map order) followed by any other names that pass through unmapped.
    extend : bool
        With ``targets``: classes that ``class_map`` maps to but the head lacks are appended as new
        classes (retraining grows them) instead of being an error.

    Returns
    -------
    (mapping, class_names)
        ``mapping[name]`` is a class name, or None for a name that is ignored (unclassified, or
        mapped to nothing). Raises DenucError listing every name that maps to no class.
    """
    class_map = class_map or {}
    fixed = tuple(targets) if targets is not None else None
    mapping: dict[str, str | None] = {}
    unmapped = []
    for n in dict.fromkeys(names):
        if n == UNCLASSIFIED:
            mapping[n] = None
        elif n in class_map:
            mapping[n] = class_map[n]
        elif base_name(n) in class_map:
            mapping[n] = class_map[base_name(n)]
        elif fixed is not None:
            if n in fixed:
                mapping[n] = n
            elif base_name(n) in fixed:
                mapping[n] = base_name(n)
            else:
                unmapped.append(n)
        elif class_map:  # a map was given: every name must be in it (a typo must not become a class)
            unmapped.append(n)
        else:
            mapping[n] = base_name(n)
    if fixed is not None:
        unknown = sorted({v for v in mapping.values() if v is not None and v not in fixed})
        if unknown and extend:
            fixed = fixed + tuple(v for v in dict.fromkeys(class_map.values()) if v in unknown)
        elif unknown:
            raise DenucError(
                f"--class-map maps to {', '.join(map(repr, unknown))}, which the head does not know "
                f"(its classes: {', '.join(fixed)})"
            )
    if unmapped:
        hint = f'add them to --class-map (e.g. "{unmapped[0]}={(fixed or tuple(v for v in class_map.values() if v) or ("class",))[0]}"), or "{unmapped[0]}=" to ignore them'
        raise DenucError(f"{len(unmapped)} class name(s) in the point files map to no class: {', '.join(map(repr, unmapped))}; {hint}")
    if fixed is not None:
        return mapping, fixed
    used = [v for v in mapping.values() if v is not None]
    ordered = [v for v in dict.fromkeys(class_map.values()) if v] + sorted(set(used) - set(class_map.values()))
    return mapping, tuple(dict.fromkeys(ordered))


def read_slide_list(path) -> list[tuple[Path, Path, float | None]]:
    """``(slide, points, mpp or None)`` rows of a LIST.csv (see the module docstring)."""
    from ..wsi.slides import _valid_mpp

    path = Path(path)
    if not path.is_file():
        raise DenucError(f"slide list not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise DenucError(f"the slide list {path} is empty; it needs a header slide,points[,mpp] and one row per slide")
    head = [c.strip().lower() for c in rows[0]]
    for col in REQUIRED_COLUMNS:
        if col not in head:
            raise DenucError(f"{path}: no {col!r} column; the first row must name the columns slide,points[,mpp]")
    i_s, i_p, i_m = head.index("slide"), head.index("points"), (head.index("mpp") if "mpp" in head else None)
    out = []
    for k, r in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in r] + [""] * len(head)
        if not cells[i_s] or not cells[i_p]:
            missing = "slide" if not cells[i_s] else "points"
            raise DenucError(f"{path}, row {k}: the {missing!r} column is empty")
        slide, pts = (Path(os.path.expanduser(cells[i])) for i in (i_s, i_p))
        slide, pts = (p if p.is_absolute() else path.parent / p for p in (slide, pts))
        mpp = None
        if i_m is not None and cells[i_m]:
            mpp = _valid_mpp(cells[i_m])
            if mpp is None:
                raise DenucError(f"{path}, row {k}: the mpp {cells[i_m]!r} is not a number between 0.01 and 100")
        out.append((slide, pts, mpp))
    if not out:
        raise DenucError(f"the slide list {path} has a header but no slides")
    return out


def load_slides(list_paths, class_map: dict | None = None, class_names=None, log=print, extend: bool = False) -> list[SlideSample]:
    """Read one or more LIST.csv files into :class:`SlideSample` s (points only; no pixels).

    Every slide is opened once, to check it can be read and to drop points outside it (with a
    count); ``class_names`` fixes the classes (e.g. the head being retrained), and ``extend``
    lets ``class_map`` add new ones after them (see :func:`map_classes`).
    """
    from ..io.points import read_points
    from ..wsi.slides import open_slide, resolve_mpp

    if isinstance(list_paths, (str, os.PathLike)):
        list_paths = [list_paths]
    rows = [row for p in list_paths for row in read_slide_list(p)]
    dets = [read_points(pts, unclassified=UNCLASSIFIED) for _, pts, _ in rows]
    names = [n for d in dets for n in d.class_names]
    mapping, classes = map_classes(names, class_map, class_names, extend=extend)
    index = {n: k for k, n in enumerate(classes)}
    samples = []
    for (slide, pts_path, mpp), det in zip(rows, dets):
        per_class = np.array([index[mapping[n]] if mapping[n] is not None else -1 for n in det.class_names], np.int64)
        labels = per_class[det.class_ids] if len(det) else np.zeros(0, np.int64)
        is_unclassified = np.array([n == UNCLASSIFIED for n in det.class_names])[det.class_ids] if len(det) else np.zeros(0, bool)
        skipped = {"unclassified": int(is_unclassified.sum()), "ignored": int(((labels < 0) & ~is_unclassified).sum())}
        xy = det.xy[labels >= 0]
        labels = labels[labels >= 0]
        with open_slide(slide) as src:
            mpp0, _ = resolve_mpp(src, mpp)
            w, h = src.dimensions
            reader = src.reader
        inside = inside_image(xy, (h, w))
        skipped["outside"] = int((~inside).sum())
        if skipped["outside"]:
            warnings.warn(f"{pts_path}: skipped {skipped['outside']} point(s) outside the {w}x{h} slide {slide.name}", stacklevel=2)
        s = SlideSample(slide.stem, slide, xy[inside], labels[inside], classes, float(mpp0), pts_path, reader, skipped)
        samples.append(s)
        left = ", ".join(f"{v} {k}" for k, v in skipped.items() if v)
        log(f"{slide.name}: {len(s.points)} nuclei from {pts_path.name}" + (f" (skipped {left})" if left else ""))
    if not sum(len(s.points) for s in samples):
        raise DenucError("the point files hold no classified nuclei inside their slides; classify some objects in QuPath and export again")
    return samples
