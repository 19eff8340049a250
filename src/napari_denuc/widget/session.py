"""Where the widget keeps the user's work: corrections autosave and versioned heads. No Qt.

Corrections of one image live in ``<image file>.denuc.json`` next to the image when the image
has a path in a writable folder, otherwise (or when a project folder is chosen) in
``<project>/corrections/<image name>-<key>.denuc.json``. The file records the image's content
key, so corrections are restored only onto the same pixels. Every write is atomic.

Retrained heads never overwrite an existing file: ``<project>/heads/head-<encoder>-vNNN.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.atomic import atomic_write

FORMAT = "napari-denuc corrections"
VERSION = 2  # 2: per-nucleus ids ("nid") and "tombstones" (deleted model nuclei); 1 still reads
_HASH_LIMIT = 256 * 2**20  # hash all pixels up to 256 MB; beyond, a strided sample + shape


def default_home() -> Path:
    """The folder for work that has no better place: ``$DENUC_HOME`` or ``~/.napari-denuc``."""
    return Path(os.environ.get("DENUC_HOME") or Path.home() / ".napari-denuc")


def image_key(image) -> str:
    """A short content hash of an image array (the same pixels give the same key)."""
    a = np.asarray(image)
    h = hashlib.sha1(f"{a.shape}|{a.dtype}".encode())
    if a.nbytes > _HASH_LIMIT:
        step = int(np.ceil((a.nbytes / _HASH_LIMIT) ** 0.5))
        a = a[::step, ::step]
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "image"


def corrections_path(image_name: str, key: str, image_path=None, project_dir=None) -> Path:
    if project_dir is None and image_path is not None:
        p = Path(image_path)
        if _writable(p.parent):
            return p.with_name(p.name + ".denuc.json")
    base = Path(project_dir) if project_dir is not None else default_home()
    return base / "corrections" / f"{_safe(image_name)}-{key}.denuc.json"


def numbered(path, k: int) -> Path:
    """The ``k``-th corrections file of one image: ``path`` itself for 1, else ``<name>-<k>.denuc.json``.

    The same image open in two layers (or two nuclei layers of one image) writes to files 1, 2, ...:
    one file each, so neither overwrites the other's corrections.
    """
    path = Path(path)
    if k <= 1:
        return path
    stem = path.name[: -len(".denuc.json")] if path.name.endswith(".denuc.json") else path.name
    return path.with_name(f"{stem}-{k}.denuc.json")


def _settings_path() -> Path:
    return default_home() / "widget.json"


def _load_settings() -> dict:
    try:
        settings = json.loads(_settings_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _save_setting(key: str, value) -> None:
    """Remember ``key`` for later sessions, keeping the other settings (an atomic write)."""
    settings = _load_settings()
    settings[key] = value
    atomic_write(_settings_path(), json.dumps(settings))


def load_project_dir() -> Path | None:
    """The project folder chosen in an earlier session, when it still exists."""
    d = _load_settings().get("project_dir")
    return Path(d) if isinstance(d, str) and d and Path(d).is_dir() else None


def save_project_dir(folder) -> None:
    _save_setting("project_dir", str(folder) if folder else None)


def load_head() -> str | None:
    """The head file in use when the widget last changed heads (None: the bundled head), when it still exists."""
    h = _load_settings().get("head")
    return h if isinstance(h, str) and h and Path(h).is_file() else None


def save_head(path) -> None:
    _save_setting("head", str(path) if path else None)


def heads_dir(project_dir=None) -> Path:
    return (Path(project_dir) if project_dir is not None else default_home()) / "heads"


def next_head_path(folder, encoder_id: str) -> Path:
    """A new, unused head file name: ``head-<encoder>-vNNN.safetensors`` (never an existing one)."""
    folder = Path(folder)
    stem = f"head-{_safe(encoder_id or 'encoder')}-v"
    taken = [int(m.group(1)) for p in folder.glob(f"{stem}*.safetensors") if (m := re.search(r"-v(\d+)\.safetensors$", p.name))]
    n = max(taken, default=0) + 1
    while (folder / f"{stem}{n:03d}.safetensors").exists():
        n += 1
    return folder / f"{stem}{n:03d}.safetensors"


def corrections_state(xy, features: pd.DataFrame, class_names, class_colors, key: str, extra=None) -> dict:
    """A JSON-able record of a points layer (library ``(x, y)`` coordinates)."""
    names = list(class_names)
    cls = features["class"].astype(str).tolist() if "class" in features else [names[0]] * len(xy)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "image_key": key,
        "class_names": names,
        "class_colors": [list(map(int, c)) for c in class_colors],
        "xy": np.round(np.asarray(xy, dtype=np.float64), 3).tolist(),
        "class": cls,
        "score": np.round(np.nan_to_num(np.asarray(features["score"], dtype=np.float64), nan=1.0), 5).tolist()
        if "score" in features
        else [1.0] * len(xy),
        "source": features["source"].astype(str).tolist() if "source" in features else ["model"] * len(xy),
        "reviewed": np.asarray(features["reviewed"], dtype=bool).tolist() if "reviewed" in features else [False] * len(xy),
    }
    if "nid" in features:
        state["nid"] = np.asarray(features["nid"], dtype=np.int64).tolist()
    pcols = [f"prob_{n}" for n in names]
    if len(xy) and all(c in features for c in pcols):
        p = np.asarray(features[pcols], dtype=np.float64)
        state["probs"] = [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in p]
    state.update(extra or {})
    return state


def save_corrections(path, state: dict) -> Path:
    return atomic_write(path, json.dumps(state, separators=(",", ":")))


def load_corrections(path, key: str | None = None) -> dict | None:
    """The saved state at ``path``, or None when there is none or it belongs to other pixels."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("format") != FORMAT or (key is not None and state.get("image_key") != key):
        return None
    return state


def state_to_detections_and_flags(state: dict):
    """(Detections, source array, reviewed array) from a saved state."""
    from ..results import Detections

    names = tuple(state["class_names"])
    lookup = {n: k for k, n in enumerate(names)}
    n = len(state["xy"])
    probs = None
    if state.get("probs") is not None and n:
        probs = np.array([[np.nan if v is None else v for v in row] for row in state["probs"]], dtype=np.float32)
    det = Detections(
        np.asarray(state["xy"], dtype=np.float64).reshape(-1, 2),
        np.asarray(state["score"], dtype=np.float32),
        np.array([lookup.get(c, 0) for c in state["class"]], dtype=np.int64),
        names,
        tuple(tuple(c) for c in state.get("class_colors") or ()),
        None,
    )
    det.probs = probs  # may hold NaN for hand-added nuclei; the layer keeps them as NaN
    return det, np.asarray(state["source"], dtype=object), np.asarray(state["reviewed"], dtype=bool)


class FeatureMemo:
    """Encoder features of points already sampled, per (image, encoder, level), keyed by position.

    "Retrain head" then samples the encoder only at nuclei it has not seen (added or moved
    ones); everything else comes from here. In memory, for the napari session.
    """

    def __init__(self, max_points: int = 2_000_000):
        self._store: dict = {}
        self.max_points = max_points

    @staticmethod
    def _coords(xy):
        q = np.round(np.asarray(xy, dtype=np.float64).reshape(-1, 2) * 100).astype(np.int64)
        return list(zip(q[:, 0].tolist(), q[:, 1].tolist()))

    def put(self, key, xy, features) -> None:
        features = np.asarray(features, dtype=np.float32)
        table = self._store.setdefault(key, {})
        if len(table) + len(features) > self.max_points:
            table.clear()
        table.update(zip(self._coords(xy), features))

    def get(self, key, xy):
        """(features (N, D) with zeros where unknown, found mask (N,)); features None when nothing is known."""
        table = self._store.get(key)
        n = len(np.asarray(xy).reshape(-1, 2))
        if not table or n == 0:
            return None, np.zeros(n, dtype=bool)
        rows = [table.get(c) for c in self._coords(xy)]
        found = np.array([r is not None for r in rows], dtype=bool)
        if not found.any():
            return None, found
        dim = len(next(r for r in rows if r is not None))
        out = np.zeros((n, dim), dtype=np.float32)
        idx = np.flatnonzero(found)
        out[idx] = np.stack([rows[i] for i in idx])
        return out, found
