"""Per-tile results on disk, so that an interrupted run resumes where it stopped.

Layout, in the output folder: ``.<stem>.tiles/manifest.json`` (the plan and a config hash) and
one ``tile_<index>.npz`` per finished tissue tile, each written atomically (temporary file +
rename), holding only the detections the tile owns, already in level-0 pixels. A manifest with a
different config hash (another model, tile size, mpp, slide...) makes the store start afresh,
so stale tiles are never reused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.atomic import atomic_write
from ..io.naming import content_hash
from ..results import Detections

STORE_VERSION = 1


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return content_hash([blob], digest_size=8)


def det_to_arrays(det: Detections) -> dict:
    return {
        "xy": np.asarray(det.xy, np.float64),
        "scores": np.asarray(det.scores, np.float32),
        "class_ids": np.asarray(det.class_ids, np.int64),
        "probs": np.asarray(det.probs, np.float32) if det.probs is not None else None,
        "class_names": list(det.class_names),
        "class_colors": [list(c) for c in det.class_colors],
    }


def arrays_to_det(a: dict) -> Detections:
    return Detections(a["xy"], a["scores"], a["class_ids"], tuple(a["class_names"]), tuple(tuple(c) for c in a["class_colors"]), a["probs"])


class TileStore:
    def __init__(self, folder, config: dict, plan: dict, resume: bool = True):
        self.folder = Path(folder)
        self.hash = config_hash(config)
        manifest = self.folder / "manifest.json"
        reuse = False
        if resume and manifest.is_file():
            try:
                reuse = json.loads(manifest.read_text()).get("config_hash") == self.hash
            except (OSError, ValueError):
                reuse = False
        if not reuse:
            self.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(
                manifest,
                json.dumps({"version": STORE_VERSION, "config_hash": self.hash, "config": config, "plan": plan}, default=str),
            )
        self.reused = reuse

    def _path(self, index: int) -> Path:
        return self.folder / f"tile_{index:06d}.npz"

    def done(self) -> set[int]:
        out = set()
        for p in self.folder.glob("tile_*.npz"):
            try:
                out.add(int(p.stem.split("_")[1]))
            except (IndexError, ValueError):
                pass
        return out

    def commit(self, index: int, arrays: dict) -> None:
        buf = io.BytesIO()
        meta = json.dumps({"class_names": arrays["class_names"], "class_colors": arrays["class_colors"]})
        probs = arrays["probs"]
        np.savez(
            buf,
            xy=arrays["xy"],
            scores=arrays["scores"],
            class_ids=arrays["class_ids"],
            probs=probs if probs is not None else np.zeros((0, 0), np.float32),
            has_probs=np.array(probs is not None),
            meta=np.array(meta),
        )
        atomic_write(self._path(index), buf.getvalue())

    def load(self, index: int) -> dict | None:
        """The tile's arrays, or None if the file is missing or unreadable (then it is recomputed)."""
        p = self._path(index)
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return {
                    "xy": z["xy"],
                    "scores": z["scores"],
                    "class_ids": z["class_ids"],
                    "probs": z["probs"] if bool(z["has_probs"]) else None,
                    "class_names": meta["class_names"],
                    "class_colors": meta["class_colors"],
                }
        except Exception:
            try:
                p.unlink()
            except OSError:
                pass
            return None

    def iter_detections(self, indices, compute):
        """Yield the tiles ``indices`` as Detections, one tile in memory at a time.

        A tile that vanished or became unreadable is recomputed with ``compute(index)`` and
        committed; tiles must agree on the classes (else DenucError). Without any index, one
        empty chunk from ``compute(None)`` still carries the pipeline's classes, so headers and
        schemas can be written for a slide without tissue.
        """
        indices = list(indices)
        if not indices:
            yield arrays_to_det(compute(None))
            return
        names = None
        for i in indices:
            a = self.load(i)
            if a is None:
                a = compute(i)
                self.commit(i, a)
            if names is None:
                names = list(a["class_names"])
            elif list(a["class_names"]) != names:
                raise DenucError(f"tiles disagree on the classes ({names} vs {a['class_names']}); delete {self.folder} and run again")
            yield arrays_to_det(a)

    def clear(self) -> None:
        """Remove the store (only files this module writes, then the folder if empty)."""
        if not self.folder.is_dir():
            return
        for p in list(self.folder.glob("tile_*.npz")) + list(self.folder.glob(".*.tmp")) + [self.folder / "manifest.json"]:
            try:
                p.unlink()
            except OSError:
                pass
        try:
            self.folder.rmdir()
        except OSError:  # something else is in there: leave it
            pass
