"""npe2 reader: whole slides (.svs, .ndpi, .mrxs, .scn, pyramidal .tif/.tiff) as lazy multiscale images.

Each pyramid level becomes a lazy array (:class:`LazyLevel`: shape, dtype, slicing) whose
slices are read from the slide on demand through the same readers as ``denuc-predict``
(``wsi.slides.open_slide``: tiffslide, else OpenSlide), so opening a slide reads only the region
napari displays. Not dask: importing ``dask.array`` alone costs about 1 s on this machine, half
of the 2 s budget to first display, and napari slices the levels itself. The layer's metadata carries the level-0 ``mpp``
(the widget's resolution), the slide ``path`` and, under ``"slide"``, the reader and the level
downsamples, which is what the widget needs to read features from the slide itself
(``napari_denuc.wsi.slide_features.slide_features``).

Plain (single-resolution) TIFFs open as ordinary in-memory images with their mpp
(:func:`read_plain_tiff`). napari asks the user which reader opens a ``.tif``; when DeNuC's
declined plain TIFFs, picking DeNuC for a tile ended in napari's "Reader 'napari-denuc' ...
refused the file", and a remembered choice refused every tile after it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff")


def _is_pyramidal_tiff(path: Path) -> bool:
    """A tiled TIFF with more than one resolution (SubIFDs or a series of reduced pages)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0] if tif.series else None
            return bool(series is not None and len(series.levels) > 1 and tif.pages[0].is_tiled)
    except Exception:  # noqa: BLE001 -- any parse failure means: not a slide, let napari try its readers
        return False


MAX_PLAIN_TIFF_PIXELS = 2**28  # 16384 x 16384: beyond, a single-resolution TIFF is a slide saved without a pyramid


def get_reader(path):
    """:func:`read_slide` for a whole slide, :func:`read_plain_tiff` for a plain TIFF, None for anything else."""
    if isinstance(path, (list, tuple)):
        return read_slide if path and all(get_reader(p) is not None for p in path) else None
    p = Path(str(path))
    suffix = p.suffix.lower()
    if suffix not in SLIDE_SUFFIXES or not (p.is_file() or (suffix == ".mrxs" and p.exists())):
        return None
    if suffix in (".tif", ".tiff") and not _is_pyramidal_tiff(p):
        return read_plain_tiff
    return read_slide


def read_plain_tiff(path) -> list[tuple]:
    """Layer data tuples: a single-resolution TIFF as an RGB uint8 image, ``metadata["mpp"]`` from its tags."""
    import tifffile

    from .errors import DenucError
    from .io.images import read_image

    paths = path if isinstance(path, (list, tuple)) else [path]
    out = []
    for p in paths:
        p = Path(str(p))
        with tifffile.TiffFile(p) as tif:
            shape = tif.pages[0].shape
        if len(shape) >= 2 and shape[0] * shape[1] > MAX_PLAIN_TIFF_PIXELS:
            raise DenucError(
                f"{p.name} is {shape[1]} x {shape[0]} px with no pyramid, too large to load whole; "
                "save it as a pyramidal TIFF (QuPath or vips) and open that"
            )
        rgb, mpp = read_image(p)
        meta = {"path": str(p)} | ({"mpp": float(mpp)} if mpp else {})
        out.append((rgb, {"name": p.stem, "rgb": True, "metadata": meta}, "image"))
    return out


class LazyLevel:
    """One pyramid level as a read-only (h, w, 3) uint8 array-like; every read is counted."""

    def __init__(self, source, level: int, lock: threading.Lock):
        self.source, self.level, self._lock = source, level, lock
        w, h = source.level_dimensions[level]
        self.shape, self.dtype, self.ndim = (h, w, 3), np.dtype(np.uint8), 3
        self.pixels_read = 0
        self.reads = 0

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * 3

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):  # a whole level: only ever asked of small levels
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (4 - len(key)) + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        if isinstance(key[0], (int, np.integer)) or isinstance(key[1], (int, np.integer)):  # a row or a column
            rows = slice(int(key[0]), int(key[0]) + 1) if isinstance(key[0], (int, np.integer)) else key[0]
            cols = slice(int(key[1]), int(key[1]) + 1) if isinstance(key[1], (int, np.integer)) else key[1]
            block = self[rows, cols, key[2]]
            return block[tuple(0 if isinstance(k, (int, np.integer)) else slice(None) for k in key[:2])]
        (y0, y1, sy), (x0, x1, sx) = (k.indices(n) for k, n in zip(key[:2], self.shape[:2]))
        if sy != 1 or sx != 1:  # napari and dask read contiguous blocks; a stride reads the block first
            return self[y0:y1, x0:x1][::sy, ::sx][(slice(None), slice(None), key[2])]
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        if h == 0 or w == 0:
            return np.zeros((h, w, 3), np.uint8)[:, :, key[2]]
        with self._lock:
            block = self.source.read_level(self.level, x0, y0, w, h)
        self.pixels_read += w * h
        self.reads += 1
        return block[:, :, key[2]]


def slide_levels(path):
    """(LazyLevel per level, SlideSource) of the slide at ``path``."""
    from .wsi.slides import open_slide

    src = open_slide(path)
    lock = threading.Lock()  # one file handle, and napari may slice from several threads
    return [LazyLevel(src, lv, lock) for lv in range(src.level_count)], src


def read_slide(path) -> list[tuple]:
    """Layer data tuples: one multiscale RGB image per slide, ``metadata["mpp"]`` its level-0 mpp."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    out = []
    for p in paths:
        p = Path(str(p))
        arrays, src = slide_levels(p)
        meta = {
            "path": str(p),
            "slide": {"reader": src.reader, "level_downsamples": list(src.level_downsamples),
                      "level_dimensions": [list(d) for d in src.level_dimensions]},
        }
        if src.mpp is not None:
            meta["mpp"] = float(src.mpp)
        out.append((arrays, {"name": p.stem, "multiscale": True, "rgb": True, "metadata": meta}, "image"))
    return out
