"""Encoder features at points of a whole slide, reading only the windows around the points.

The slide is seen as a virtual image at the encoder's mpp: the pyramid level nearest the
encoder's resolution from the finer side, resampled when its mpp is not the encoder's. That
virtual image is cut into the same window grid the point query uses for an image in memory
(``encoders.query.plan_windows``), and only windows holding points are read from the slide,
one (batch of) window(s) at a time: memory is bounded by the window size, not the slide size.

When a level matches the encoder's mpp, a window is exactly the crop ``query_features`` would
take from the whole level held in memory (same origins, same reflection padding at the slide's
edges), so the features are identical to those of the level read as a PNG.

Dense features are cached per slide (``FeatureCache`` keyed by a fingerprint of the file, not a
hash of its pixels, which would mean reading the whole slide).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np

from ..encoders.query import FeatureCache, ProgressFn, query_windows
from ..errors import DenucError
from ..io.naming import file_fingerprint
from .slides import SlideSource, open_slide, resolve_mpp

MPP_TOLERANCE = 1e-3  # relative: a level within 0.1% of the encoder's mpp is read as is


def _libc():
    """glibc's ``malloc_trim``/``mallopt`` holder, or None (another libc, or not Linux)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MAP_LARGE_BLOCKS = 1 << 20  # while reading a slide: every block of 1 MB or more is its own mapping


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    A window's features allocate a few hundred MB in many threads' malloc arenas; without a trim
    glibc keeps most of it, and the process's footprint ratchets up window after window.
    """
    lib = _libc()
    if lib:
        lib.malloc_trim(0)


@contextmanager
def _large_blocks_mapped():
    """Serve blocks >= 1 MB by mmap while slide windows are encoded; glibc's usual setting after.

    glibc's default raises its mmap threshold to the largest block freed (up to 32 MB), so the
    encoder's 8-30 MB activations come from the heap; their frees leave holes that later, larger
    ones cannot reuse (``mallinfo2``: 160 MB free inside the heap at the detector's peak), and on
    a 2048 x 2048 ``lite`` window the peak RSS grew by 370-550 MB for 180-240 MB of live arrays,
    varying run to run. Mapped, a freed block goes straight back to the OS and the peak is the
    live arrays (docs/benchmarks.md, "Slide training memory"). The price is a page fault per
    fresh page: about +0.9 s of system time per window with 4 KB pages, little with the huge
    pages ``denuc-train`` asks torch for.
    glibc cannot return to its dynamic threshold, so the exit sets the values it reaches in a
    process that frees large arrays (32 MB, and twice that for trimming the heap's top). A
    process that set its own threshold (``MALLOC_MMAP_THRESHOLD_``) is left alone.
    """
    global _MAPPING
    lib = _libc()
    if not lib or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield
        return
    with _MAPPING_LOCK:  # nested or concurrent reads (napari threads): the last one out restores
        if _MAPPING == 0:
            lib.mallopt(M_MMAP_THRESHOLD, MAP_LARGE_BLOCKS)
        _MAPPING += 1
    try:
        yield
    finally:
        with _MAPPING_LOCK:
            _MAPPING -= 1
            if _MAPPING == 0:
                lib.mallopt(M_MMAP_THRESHOLD, 32 << 20)
                lib.mallopt(M_TRIM_THRESHOLD, 64 << 20)


_MAPPING = 0
_MAPPING_LOCK = threading.Lock()


def pick_level(source: SlideSource, mpp0: float, target_mpp: float) -> int:
    """The coarsest level whose mpp is not coarser than ``target_mpp`` (level 0 if all are)."""
    fine = [lv for lv, ds in enumerate(source.level_downsamples) if mpp0 * ds <= target_mpp * (1 + MPP_TOLERANCE)]
    return max(fine, key=lambda lv: source.level_downsamples[lv]) if fine else 0


class SlideWindows:
    """The slide as a virtual image at ``target_mpp``: ``shape``, level-0 -> virtual points, ``crop``."""

    def __init__(self, source: SlideSource, mpp0: float, target_mpp: float):
        self.source = source
        self.level = pick_level(source, mpp0, target_mpp)
        self.level_mpp = mpp0 * source.level_downsamples[self.level]
        lw, lh = source.level_dimensions[self.level]
        scale = self.level_mpp / target_mpp
        self.exact = abs(scale - 1.0) < MPP_TOLERANCE
        if self.exact:
            self.shape = (lh, lw)
        else:  # the size resample_image would give the level held in memory
            self.shape = (max(1, round(lh * scale)), max(1, round(lw * scale)))
        self.sx, self.sy = self.shape[1] / lw, self.shape[0] / lh  # virtual px per level px
        self.pixels_read = 0  # level pixels read so far (tests and benchmarks check it)

    def to_virtual(self, xy0) -> np.ndarray:
        """Level-0 points -> virtual image points (pixel centres at integers, at every step)."""
        from ..geometry import rescale_points

        xy = rescale_points(xy0, 1.0 / self.source.level_downsamples[self.level])
        return xy if self.exact else rescale_points(xy, (self.sx, self.sy))

    def _read_padded(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level pixels [x0, x0+w) x [y0, y0+h), reflection-padded outside the level like ``crop_window``."""
        lw, lh = self.source.level_dimensions[self.level]
        xa, ya, xb, yb = max(0, x0), max(0, y0), min(lw, x0 + w), min(lh, y0 + h)
        if xb <= xa or yb <= ya:  # wholly outside: background, as the slide reader fills it
            return self.source.read_level(self.level, x0, y0, w, h)
        inner = self.source.read_level(self.level, xa, ya, xb - xa, yb - ya)
        self.pixels_read += inner.shape[0] * inner.shape[1]
        pad = ((ya - y0, y0 + h - yb), (xa - x0, x0 + w - xb), (0, 0))
        if any(p for pair in pad[:2] for p in pair):
            inner = np.pad(inner, pad, mode="symmetric")
        return np.ascontiguousarray(inner)

    def crop(self, x0: int, y0: int, ww: int, wh: int) -> np.ndarray:
        _trim_heap()  # the previous window's buffers are free by now
        if self.exact:
            return self._read_padded(x0, y0, ww, wh)
        return self._resampled(x0, y0, ww, wh)

    def _resampled(self, x0, y0, ww, wh) -> np.ndarray:
        """Virtual window by bilinear sampling of the level (Gaussian pre-blur when shrinking).

        Virtual pixel ``i`` is level coordinate ``(i + 0.5) / s - 0.5`` (the pixel-centre rule), the
        mapping :func:`to_virtual` inverts, so points stay on their nuclei.
        """
        import torch
        import torch.nn.functional as F
        from scipy import ndimage as ndi

        gx = (np.arange(x0, x0 + ww) + 0.5) / self.sx - 0.5
        gy = (np.arange(y0, y0 + wh) + 0.5) / self.sy - 0.5
        m = 3
        ax, ay = int(np.floor(gx[0])) - m, int(np.floor(gy[0])) - m
        region = self._read_padded(ax, ay, int(np.ceil(gx[-1])) + m + 1 - ax, int(np.ceil(gy[-1])) + m + 1 - ay)
        img = region.astype(np.float32)
        sig = [0.5 * np.sqrt(max(1 / s**2 - 1, 0)) for s in (self.sy, self.sx)]
        if max(sig) > 0.05:  # anti-aliasing: the box of a coarser pixel, minus the one already there
            img = ndi.gaussian_filter(img, (sig[0], sig[1], 0), mode="nearest", truncate=3.0)
        h, w = img.shape[:2]
        u = (gx - ax + 0.5) / w * 2 - 1  # align_corners=False normalised coordinates
        v = (gy - ay + 0.5) / h * 2 - 1
        grid = torch.from_numpy(np.stack(np.meshgrid(u, v), -1)[None].astype(np.float32))
        t = torch.from_numpy(img).permute(2, 0, 1)[None]
        out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def slide_features(encoder, source, xy, mpp: float | None = None, progress: ProgressFn | None = None,
                   cache: bool = True, stats: dict | None = None) -> np.ndarray:
    """(N, D) float32 features at level-0 points ``xy`` of a slide, read window by window.

    Parameters
    ----------
    encoder : Encoder
        Any registry encoder (``encoder.mpp`` decides the level that is read).
    source : path-like or SlideSource
        The slide (opened with :func:`wsi.slides.open_slide` and closed again when a path).
    xy : (N, 2) array
        Points in level-0 pixels (x, y), pixel centres at integers.
    mpp : float, optional
        Level-0 mpp; overrides the slide's metadata (DenucError when neither is known).
    cache : bool
        Keep dense window features in the encoder's feature cache, keyed per slide.
    stats : dict, optional
        Filled with ``level`` (the level read), ``level_mpp`` and ``pixels_read`` (level pixels
        read from the file), to check that only the windows around the points were read.
    """
    own = not isinstance(source, SlideSource)
    src = open_slide(source) if own else source
    try:
        mpp0, _ = resolve_mpp(src, mpp)
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise DenucError(f"{src.path}: point coordinates contain NaN or infinity")
        windows = SlideWindows(src, mpp0, encoder.mpp)
        store = None
        if cache and getattr(encoder, "cache_dir", None) and hasattr(encoder, "encode_windows"):
            key = f"slide-{file_fingerprint(src.path, digest_size=16)}-L{windows.level}"
            store = FeatureCache(encoder.cache_dir, encoder.id, key, mpp0)
        with _large_blocks_mapped():
            feats = query_windows(encoder, windows.shape, windows.to_virtual(xy), windows.crop, store, progress)
        _trim_heap()
        if stats is not None:
            stats.update(level=windows.level, level_mpp=windows.level_mpp, pixels_read=windows.pixels_read)
        return feats
    finally:
        if own:
            src.close()

