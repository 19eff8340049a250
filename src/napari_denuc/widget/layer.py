"""Points layers of nuclei: Detections <-> napari Points layer, with bulk feature updates.

No Qt here (napari layers only), so the reader, the writer and the widget share it.

A DeNuC points layer has the features

- ``class``: pandas Categorical over the head's class names,
- ``score``: detection score (1.0 for nuclei added by hand),
- ``prob_<class>``: one column per class (NaN where unknown),
- ``source``: Categorical ``"model"`` or ``"edited"``,
- ``reviewed``: bool, the user has checked this nucleus (edited nuclei are reviewed),

its faces are coloured by ``class`` through a categorical colour map built from the head's
class colours, and ``metadata["denuc"]`` keeps ``class_names`` and ``class_colors``.
All updates go through whole-column assignments followed by one ``refresh_colors`` call:
per-point updates do not scale to tens of thousands of points (napari issue 6275).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..results import Detections, default_colors
from .coords import rc_to_xy, xy_to_rc

SOURCES = ("model", "edited")
NUCLEUS_DIAMETER_UM = 5.0  # drawn size of a point


def prob_column(name: str) -> str:
    return f"prob_{name}"


def rgba(color) -> tuple[float, float, float, float]:
    """RGB 0-255 -> RGBA 0-1."""
    r, g, b = (float(v) / 255.0 for v in tuple(color)[:3])
    return (r, g, b, 1.0)


def color_map(class_names, class_colors) -> dict:
    colors = tuple(class_colors) or default_colors(len(class_names))
    return {name: rgba(colors[k % len(colors)]) for k, name in enumerate(class_names)}


def make_features(det: Detections, source="model", reviewed=False) -> pd.DataFrame:
    """The feature table of ``det``; ``source`` and ``reviewed`` may be scalars or per-point arrays."""
    n = len(det)
    names = list(det.class_names)
    cols = {
        "class": pd.Categorical.from_codes(np.clip(det.class_ids, 0, len(names) - 1), categories=names),
        "score": np.asarray(det.scores, dtype=np.float32),
    }
    for k, name in enumerate(names):
        cols[prob_column(name)] = (
            det.probs[:, k].astype(np.float32) if det.probs is not None else np.full(n, np.nan, np.float32)
        )
    src = np.broadcast_to(np.asarray(source, dtype=object), (n,))
    cols["source"] = pd.Categorical(src, categories=list(SOURCES))
    cols["reviewed"] = np.broadcast_to(np.asarray(reviewed, dtype=bool), (n,)).copy()
    return pd.DataFrame(cols)


def feature_defaults(class_names, current_class: str | None = None) -> dict:
    """Features given to a nucleus the user adds by hand."""
    names = list(class_names)
    d = {"class": current_class if current_class in names else names[0], "score": 1.0}
    d.update({prob_column(n): np.nan for n in names})
    d.update({"source": "edited", "reviewed": True})
    return d


def point_size(mpp: float | None) -> float:
    return max(3.0, NUCLEUS_DIAMETER_UM / float(mpp or 0.5))


def layer_kwargs(det: Detections, name: str, *, source="model", reviewed=False, mpp=None, extra_metadata=None) -> dict:
    """Keyword arguments of ``viewer.add_points`` (``data`` included) showing ``det``."""
    meta = {"denuc": {"class_names": list(det.class_names), "class_colors": [list(c) for c in det.class_colors]}}
    if extra_metadata:
        meta["denuc"].update(extra_metadata)
    return {
        "data": xy_to_rc(det.xy),
        "name": name,
        "features": make_features(det, source, reviewed),
        "feature_defaults": feature_defaults(det.class_names),
        "face_color": "class",
        "face_color_cycle": color_map(det.class_names, det.class_colors),
        "border_color": "white",
        "border_width": 0.12,
        "border_width_is_relative": True,
        "size": point_size(mpp),
        "metadata": meta,
    }


def layer_data_tuple(det: Detections, name: str, **kw) -> tuple:
    kwargs = layer_kwargs(det, name, **kw)
    data = kwargs.pop("data")
    return (data, kwargs, "points")


def is_denuc_layer(layer) -> bool:
    return (
        layer.__class__.__name__ == "Points"
        and "class" in layer.features.columns
        and isinstance(layer.features["class"].dtype, pd.CategoricalDtype)
    )


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


def layer_to_detections(layer=None, *, data=None, features=None, metadata=None) -> Detections:
    """Detections from a Points layer, or from its ``data``/``features``/``metadata`` (what a writer gets)."""
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
    return Detections(xy, scores, ids, names, _colors(names, metadata), probs)


def counts(layer) -> dict[str, int]:
    names = class_names(layer)
    ids = class_ids(layer)
    binc = np.bincount(ids, minlength=len(names)) if len(ids) else np.zeros(len(names), int)
    return {nm: int(binc[k]) for k, nm in enumerate(names)}


def set_class(layer, indices, class_name: str, *, edited=True) -> int:
    """Give the points ``indices`` the class ``class_name`` in one bulk update; returns how many changed."""
    idx = np.asarray(sorted(indices), dtype=np.int64)
    if not len(idx):
        return 0
    f = layer.features
    before = np.asarray(f["class"].astype(str))[idx]
    f.loc[idx, "class"] = class_name
    if edited:
        f.loc[idx, "source"] = "edited"
        f.loc[idx, "reviewed"] = True
    layer.refresh_colors(update_color_mapping=False)
    return int((before != class_name).sum())


def mark(layer, indices, *, edited=None, reviewed=None) -> None:
    idx = np.asarray(sorted(indices), dtype=np.int64)
    if not len(idx):
        return
    f = layer.features
    if edited:
        f.loc[idx, "source"] = "edited"
        f.loc[idx, "reviewed"] = True
    if reviewed is not None:
        f.loc[idx, "reviewed"] = bool(reviewed)


def apply_predictions(layer, indices, class_ids_new, probs) -> int:
    """Write new model classes and probabilities for ``indices``; returns how many changed class."""
    idx = np.asarray(indices, dtype=np.int64)
    if not len(idx):
        return 0
    names = class_names(layer)
    f = layer.features
    old = np.asarray(f["class"].cat.codes)[idx]
    codes = np.asarray(f["class"].cat.codes).copy()
    codes[idx] = np.asarray(class_ids_new, dtype=codes.dtype)
    f["class"] = pd.Categorical.from_codes(codes, categories=list(names))
    if probs is not None:
        for k, nm in enumerate(names):
            col = np.asarray(f[prob_column(nm)], dtype=np.float32).copy() if prob_column(nm) in f else np.full(len(f), np.nan, np.float32)
            col[idx] = probs[:, k]
            f[prob_column(nm)] = col
    layer.refresh_colors(update_color_mapping=False)
    return int((old != np.asarray(class_ids_new)).sum())


def snapshot(layer) -> tuple:
    """A copy of what the widget's actions change (for undo)."""
    return (np.array(layer.data, copy=True), layer.features.copy(deep=True))


def restore(layer, snap) -> None:
    data, features = snap
    layer.data = data
    layer.features = features
    layer.refresh_colors(update_color_mapping=False)
