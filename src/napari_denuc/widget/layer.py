"""Points layers of nuclei: Detections <-> napari Points layer, with bulk feature updates.

No Qt here (napari layers only), so the reader, the writer and the widget share it.

A DeNuC points layer has the features

- ``nid``: a stable per-nucleus integer id (undo/redo diffs are keyed by it),
- ``class``: pandas Categorical over the head's class names,
- ``score``: detection score (1.0 for nuclei added by hand),
- ``prob_<class>``: one column per class (NaN where unknown),
- ``source``: Categorical ``"model"`` or ``"edited"``,
- ``reviewed``: bool, the user has checked this nucleus (edited nuclei are reviewed),
- ``confidence``: top class probability (1.0 where unknown), for the confidence view,

and ``metadata["denuc"]`` keeps ``token`` (the layer's identity: napari hands plugins a new
proxy object on every access, so ``id(layer)`` means nothing), ``class_names``,
``class_colors`` and ``tombstones`` (positions of deleted model nuclei).

napari turns a categorical column into plain strings when it appends rows for added points
(pandas concat of a Categorical with a default value), so :func:`recategorise` runs after every
data change. All updates are whole-column assignments followed by one ``refresh_colors``:
per-point updates do not scale to tens of thousands of points (napari issue 6275).
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd

from ..results import Detections, default_colors
from .coords import rc_to_xy, xy_to_rc

SOURCES = ("model", "edited")
MARKER_DIAMETER_UM = 7.0  # drawn size of a point: a typical nucleus
FACE_ALPHA = 0.45  # semi-transparent faces: the nuclear shape stays visible underneath
# Okabe-Ito (colour-blind safe). Blue and sky blue come last: napari draws selected points
# with a blue highlight, so the first classes (lymphocyte, tumour, stromal) must not be blue.
PALETTE = (
    (213, 94, 0),  # vermillion
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (204, 121, 167),  # reddish purple
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 114, 178),  # blue
    (120, 120, 120),  # grey
)
REVIEWED_BORDER = (1.0, 1.0, 1.0, 1.0)
UNREVIEWED_BORDER = (0.0, 0.0, 0.0, 0.3)


def prob_column(name: str) -> str:
    return f"prob_{name}"


def new_token() -> str:
    return uuid.uuid4().hex[:12]


def token_of(layer) -> str | None:
    meta = getattr(layer, "metadata", None) or {}
    d = meta.get("denuc") if hasattr(meta, "get") else None
    return d.get("token") if isinstance(d, dict) else None


def palette(n: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(PALETTE[i % len(PALETTE)] for i in range(n))


def display_colors(class_names, class_colors) -> tuple[tuple[int, int, int], ...]:
    """The colours to draw: the library's stock colours become the colour-blind-safe palette,
    colours the user chose (a head or file with its own colours) are kept."""
    n = len(class_names)
    cols = tuple(tuple(int(v) for v in c) for c in (class_colors or ()))
    if len(cols) != n or cols == default_colors(n):
        return palette(n)
    return cols


def rgba(color, alpha: float = 1.0) -> tuple[float, float, float, float]:
    """RGB 0-255 -> RGBA 0-1."""
    r, g, b = (float(v) / 255.0 for v in tuple(color)[:3])
    return (r, g, b, alpha)


def color_map(class_names, class_colors, alpha: float = FACE_ALPHA) -> dict:
    colors = display_colors(class_names, class_colors)
    return {name: rgba(colors[k], alpha) for k, name in enumerate(class_names)}


def make_features(det: Detections, source="model", reviewed=False, first_nid: int = 0) -> pd.DataFrame:
    """The feature table of ``det``; ``source`` and ``reviewed`` may be scalars or per-point arrays."""
    n = len(det)
    names = list(det.class_names)
    cols = {
        "nid": np.arange(first_nid, first_nid + n, dtype=np.int64),
        "class": pd.Categorical.from_codes(np.clip(det.class_ids, 0, len(names) - 1), categories=names),
        "score": np.asarray(det.scores, dtype=np.float32),
    }
    for k, name in enumerate(names):
        cols[prob_column(name)] = (
            det.probs[:, k].astype(np.float32) if det.probs is not None else np.full(n, np.nan, np.float32)
        )
    src = np.broadcast_to(np.asarray(source, dtype=object), (n,))
    # files may carry any source text ("user", "imported"...): all that is not the model's is the user's
    src = np.where(src.astype(str) == "model", "model", "edited")
    cols["source"] = pd.Categorical(src, categories=list(SOURCES))
    cols["reviewed"] = np.broadcast_to(np.asarray(reviewed, dtype=bool), (n,)).copy()
    f = pd.DataFrame(cols)
    f["confidence"] = confidence(f, names)
    return f


def confidence(features: pd.DataFrame, names) -> np.ndarray:
    cols = [prob_column(n) for n in names if prob_column(n) in features]
    if not cols or not len(features):
        return np.ones(len(features), np.float32)
    p = np.asarray(features[cols], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        top = np.nanmax(np.where(np.isfinite(p), p, -np.inf), axis=1)
    return np.where(np.isfinite(top), top, 1.0).astype(np.float32)


def margins(features: pd.DataFrame, names) -> np.ndarray:
    """Top-1 minus top-2 class probability per nucleus (NaN where probabilities are unknown)."""
    cols = [prob_column(n) for n in names]
    n = len(features)
    if not n or not all(c in features for c in cols):
        return np.full(n, np.nan, np.float32)
    p = np.asarray(features[cols], dtype=np.float32)
    if p.shape[1] < 2:
        return np.where(np.isfinite(p[:, 0]), 1.0, np.nan).astype(np.float32)
    part = -np.partition(-p, 1, axis=1)
    return (part[:, 0] - part[:, 1]).astype(np.float32)


def feature_defaults(class_names, current_class: str | None = None) -> dict:
    """Features given to a nucleus the user adds by hand (``nid`` -1: assigned on the data event)."""
    names = list(class_names)
    d = {"nid": -1, "class": current_class if current_class in names else names[0], "score": 1.0}
    d.update({prob_column(n): np.nan for n in names})
    d.update({"source": "edited", "reviewed": True, "confidence": 1.0})
    return d


def point_size(mpp: float | None, diameter_um: float = MARKER_DIAMETER_UM) -> float:
    """Marker diameter in data pixels for a nucleus of ``diameter_um`` at ``mpp``."""
    return max(2.0, float(diameter_um) / float(mpp or 0.5))


def layer_kwargs(det: Detections, name: str, *, source="model", reviewed=False, mpp=None, extra_metadata=None) -> dict:
    """Keyword arguments of ``viewer.add_points`` (``data`` included) showing ``det``."""
    if source is None:
        source = getattr(det, "source", None)
        source = "model" if source is None else source
    if reviewed is None:
        reviewed = getattr(det, "reviewed", None)
        reviewed = False if reviewed is None else reviewed
    meta = {
        "denuc": {
            "token": new_token(),
            "class_names": list(det.class_names),
            "class_colors": [list(c) for c in det.class_colors],
            "tombstones": [],
        }
    }
    if extra_metadata:
        meta["denuc"].update(extra_metadata)
    features = make_features(det, source, reviewed)
    return {
        "data": xy_to_rc(det.xy),
        "name": name,
        "features": features,
        "feature_defaults": feature_defaults(det.class_names),
        "face_color": "class",
        "face_color_cycle": color_map(det.class_names, det.class_colors),
        "border_color": "reviewed",
        "border_color_cycle": {True: REVIEWED_BORDER, False: UNREVIEWED_BORDER},
        "border_width": 0.2,
        "border_width_is_relative": True,
        "size": point_size(mpp),
        "metadata": meta,
    }


def layer_data_tuple(det: Detections, name: str, **kw) -> tuple:
    kwargs = layer_kwargs(det, name, **kw)
    data = kwargs.pop("data")
    return (data, kwargs, "points")


def is_denuc_layer(layer) -> bool:
    return layer.__class__.__name__ == "Points" and token_of(layer) is not None


def _names(features, metadata) -> tuple[str, ...]:
    meta = (metadata or {}).get("denuc", {})
    if meta.get("class_names"):
        return tuple(meta["class_names"])
    if "class" in features.columns:
        col = features["class"]
        if isinstance(col.dtype, pd.CategoricalDtype):
            return tuple(str(c) for c in col.cat.categories)
        if len(col):
            return tuple(dict.fromkeys(str(c) for c in col))
    return ("nucleus",)


def _colors(names, metadata) -> tuple[tuple[int, int, int], ...]:
    cols = (metadata or {}).get("denuc", {}).get("class_colors") or ()
    if len(cols) != len(names):
        cols = default_colors(len(names))
    return tuple(tuple(int(v) for v in c) for c in cols)


def _ids(features, names, n) -> np.ndarray:
    if "class" not in features.columns:
        return np.zeros(n, dtype=np.int64)
    col = features["class"]
    if isinstance(col.dtype, pd.CategoricalDtype) and tuple(str(c) for c in col.cat.categories) == names:
        return np.asarray(col.cat.codes, dtype=np.int64).clip(0)
    lookup = {nm: k for k, nm in enumerate(names)}
    return np.array([lookup.get(str(v), 0) for v in col], dtype=np.int64)


def class_names(layer) -> tuple[str, ...]:
    return _names(layer.features, layer.metadata)


def class_colors(layer) -> tuple[tuple[int, int, int], ...]:
    return _colors(class_names(layer), layer.metadata)


def class_ids(layer) -> np.ndarray:
    return _ids(layer.features, class_names(layer), len(layer.data))


def flags(features: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(edited, reviewed) boolean arrays."""
    if "source" not in features:
        edited = np.zeros(n, bool)
    elif isinstance(features["source"].dtype, pd.CategoricalDtype) and list(features["source"].cat.categories) == list(SOURCES):
        edited = np.asarray(features["source"].cat.codes) == SOURCES.index("edited")  # no string conversion
    else:
        edited = np.asarray(features["source"].astype(str)) == "edited"
    reviewed = np.asarray(features["reviewed"], dtype=bool) if "reviewed" in features else np.zeros(n, bool)
    return edited, reviewed


def recategorise(features: pd.DataFrame, names, next_nid: int) -> tuple[pd.DataFrame, int, bool]:
    """Restore the column types napari may have lost and give new rows fresh ids.

    Returns ``(features, next_nid, changed)``; ``features`` is a new frame only when something
    had to change. Rows with ``nid`` -1 (added by hand) or a duplicate id (pasted) get new ids.
    """
    f = features
    changed = False
    names = list(names)
    n = len(f)
    if "nid" not in f:
        f = f.copy()
        f["nid"] = -1
        changed = True
    nid = np.asarray(pd.to_numeric(f["nid"], errors="coerce").fillna(-1), dtype=np.int64)
    bad = nid < 0
    if n:
        _, first = np.unique(nid, return_index=True)
        dup = np.ones(n, bool)
        dup[first] = False
        bad |= dup
    if bad.any() or f["nid"].dtype != np.int64:
        nid = nid.copy()
        nid[bad] = np.arange(next_nid, next_nid + int(bad.sum()))
        f = f.copy() if not changed else f
        f["nid"] = nid
        changed = True
    next_nid = max(next_nid, int(nid.max()) + 1 if n else next_nid)
    col = f["class"] if "class" in f else pd.Series([names[0]] * n)
    if not (isinstance(col.dtype, pd.CategoricalDtype) and list(map(str, col.cat.categories)) == names):
        f = f.copy() if not changed else f
        vals = col.astype(str).where(col.astype(str).isin(names), names[0])
        f["class"] = pd.Categorical(vals, categories=names)
        changed = True
    if "source" in f and not (isinstance(f["source"].dtype, pd.CategoricalDtype) and list(f["source"].cat.categories) == list(SOURCES)):
        f = f.copy() if not changed else f
        s = f["source"].astype(str)
        f["source"] = pd.Categorical(s.where(s.isin(SOURCES), "edited"), categories=list(SOURCES))
        changed = True
    if "reviewed" in f and f["reviewed"].dtype != bool:
        f = f.copy() if not changed else f
        f["reviewed"] = f["reviewed"].fillna(False).astype(bool)
        changed = True
    return f, next_nid, changed


def layer_to_detections(layer=None, *, data=None, features=None, metadata=None) -> Detections:
    """Detections from a Points layer, or from its ``data``/``features``/``metadata`` (what a writer gets).

    ``source``/``reviewed`` are attached as attributes when the features carry them (the
    writers store them where the file format has room).
    """
    if layer is not None:
        data, features, metadata = layer.data, layer.features, layer.metadata
    data = np.asarray(data if data is not None else np.zeros((0, 2)))
    features = features if features is not None and len(features.columns) else pd.DataFrame(index=range(len(data)))
    xy = rc_to_xy(data) if len(data) else np.zeros((0, 2))
    n = len(xy)
    names = _names(features, metadata)
    ids = _ids(features, names, n)
    scores = (
        np.nan_to_num(np.asarray(features["score"], dtype=np.float32), nan=1.0)
        if "score" in features.columns
        else np.ones(n, np.float32)
    )
    probs = None
    pcols = [prob_column(nm) for nm in names]
    if n and all(c in features.columns for c in pcols):
        p = np.asarray(features[pcols], dtype=np.float32)
        if np.isfinite(p).all():
            probs = p
    kw = {}
    fields = getattr(Detections, "__dataclass_fields__", {})
    if "source" in features.columns and "source" in fields:
        kw["source"] = np.asarray(features["source"].astype(str), dtype=object)
    if "reviewed" in features.columns and "reviewed" in fields:
        kw["reviewed"] = np.asarray(features["reviewed"], dtype=bool)
    return Detections(xy, scores, ids, names, _colors(names, metadata), probs, **kw)


def counts(layer) -> dict[str, int]:
    names = class_names(layer)
    ids = class_ids(layer)
    binc = np.bincount(ids, minlength=len(names)) if len(ids) else np.zeros(len(names), int)
    return {nm: int(binc[k]) for k, nm in enumerate(names)}


def with_class(features: pd.DataFrame, indices, class_name: str, *, edited=True) -> pd.DataFrame:
    """A copy of ``features`` where ``indices`` have ``class_name`` (and become edited + reviewed)."""
    idx = np.asarray(sorted(indices), dtype=np.int64)
    f = features.copy()
    if not len(idx):
        return f
    names = list(f["class"].cat.categories)
    codes = np.asarray(f["class"].cat.codes).copy()
    codes[idx] = names.index(class_name)
    f["class"] = pd.Categorical.from_codes(codes, categories=names)
    if edited:
        src = np.asarray(f["source"].cat.codes).copy()
        src[idx] = SOURCES.index("edited")
        f["source"] = pd.Categorical.from_codes(src, categories=list(SOURCES))
        rev = np.asarray(f["reviewed"], dtype=bool).copy()
        rev[idx] = True
        f["reviewed"] = rev
    return f


def placed_by_hand(features: pd.DataFrame, indices) -> pd.DataFrame:
    """A copy of ``features`` where ``indices`` are nuclei the user placed (added or pasted):
    edited and reviewed, with no model score or probabilities (a copied nucleus's belong to
    another spot). Their class stays."""
    f = with_flags(features, indices, edited=True)
    idx = np.asarray(sorted(indices), dtype=np.int64)
    if not len(idx):
        return f
    for col in [c for c in f.columns if c.startswith("prob_")] + ["score", "confidence"]:
        if col in f:
            v = np.asarray(f[col], dtype=np.float32).copy()
            v[idx] = np.nan if col.startswith("prob_") else 1.0
            f[col] = v
    return f


def with_flags(features: pd.DataFrame, indices, *, edited=None, reviewed=None) -> pd.DataFrame:
    idx = np.asarray(sorted(indices), dtype=np.int64)
    f = features.copy()
    if not len(idx):
        return f
    if edited:
        src = np.asarray(f["source"].cat.codes).copy()
        src[idx] = SOURCES.index("edited")
        f["source"] = pd.Categorical.from_codes(src, categories=list(SOURCES))
        reviewed = True
    if reviewed is not None:
        rev = np.asarray(f["reviewed"], dtype=bool).copy()
        rev[idx] = bool(reviewed)
        f["reviewed"] = rev
    return f


def with_predictions(features: pd.DataFrame, indices, class_ids_new, probs) -> tuple[pd.DataFrame, int]:
    """A copy with new model classes and probabilities for ``indices``; and how many changed class."""
    idx = np.asarray(indices, dtype=np.int64)
    f = features.copy()
    if not len(idx):
        return f, 0
    names = list(f["class"].cat.categories)
    codes = np.asarray(f["class"].cat.codes).copy()
    old = codes[idx].copy()
    codes[idx] = np.asarray(class_ids_new, dtype=codes.dtype)
    f["class"] = pd.Categorical.from_codes(codes, categories=names)
    if probs is not None:
        for k, nm in enumerate(names):
            c = prob_column(nm)
            col = np.asarray(f[c], dtype=np.float32).copy() if c in f else np.full(len(f), np.nan, np.float32)
            col[idx] = probs[:, k]
            f[c] = col
        f["confidence"] = confidence(f, names)
    return f, int((old != np.asarray(class_ids_new)).sum())
