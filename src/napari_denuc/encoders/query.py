"""Point query: one feature vector per nucleus from a dense encoder.

Steps (``query_features``):

1. Resample the image from its mpp to the encoder's mpp (scale = image_mpp / encoder_mpp).
   With pixel centres at integer coordinates, a point maps as ``x' = (x + 0.5) * s - 0.5``.
2. Tile the resampled image into windows (``encoder.window`` px, ``encoder.overlap`` overlap,
   window origins on the feature grid); only windows that contain query points are encoded.
   Each point is read from the window where it lies most central (nearest window centre),
   which keeps it at least ``overlap / 2`` px from a window edge unless it is near the image edge.
3. Bilinear sampling at sub-cell precision. A dense map with stride ``p`` (a ViT patch token
   of patch size ``p`` covers window pixels ``[i*p, (i+1)*p)``) has cell ``i`` centred at pixel
   ``(i + 0.5) * p - 0.5``; a point at window pixel ``x`` therefore sits at fractional cell
   ``u = (x + 0.5) / p - 0.5``. Outside the outermost cell centres the value is clamped.
4. Dense window features are cached on disk per (image content hash, encoder id, mpp, window),
   written atomically as ``.npy`` (no pickles), so a second query, a retrain or new points
   never re-encode a window. Windows are streamed in batches; at most one batch is held.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DenucError
from ..geometry import rescale_points
from ..io.naming import content_hash, safe_name

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------- geometry


def cell_coordinate(x, stride: int):
    """Window pixel coordinate -> fractional index on a stride-``stride`` grid.

    Cell ``i`` covers pixels ``[i*stride, (i+1)*stride)``, so its centre is at pixel
    ``(i + 0.5) * stride - 0.5`` (pixel centres at integers); this inverts that.
    """
    return (np.asarray(x, dtype=np.float64) + 0.5) / stride - 0.5


def bilinear_sample(fmap: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample a (C, h, w) map at fractional cell coordinates (u along w, v along h) -> (n, C).

    Coordinates outside [0, w-1] x [0, h-1] are clamped to the border cells.
    """
    c, h, w = fmap.shape
    u = np.clip(np.asarray(u, dtype=np.float64), 0, w - 1)
    v = np.clip(np.asarray(v, dtype=np.float64), 0, h - 1)
    u0 = np.minimum(np.floor(u).astype(np.int64), max(w - 2, 0))
    v0 = np.minimum(np.floor(v).astype(np.int64), max(h - 2, 0))
    u1 = np.minimum(u0 + 1, w - 1)
    v1 = np.minimum(v0 + 1, h - 1)
    fu = (u - u0)[:, None]
    fv = (v - v0)[:, None]
    f = fmap.reshape(c, -1).T  # (h*w, C) view for fancy indexing
    top = f[v0 * w + u0] * (1 - fu) + f[v0 * w + u1] * fu
    bot = f[v1 * w + u0] * (1 - fu) + f[v1 * w + u1] * fu
    return (top * (1 - fv) + bot * fv).astype(np.float32)


def resample_image(image: np.ndarray, xy: np.ndarray, image_mpp: float, target_mpp: float):
    """Resize ``image`` from ``image_mpp`` to ``target_mpp``; map ``xy`` into the new pixels."""
    scale = float(image_mpp) / float(target_mpp)
    if abs(scale - 1.0) < 1e-3:
        return image, np.asarray(xy, dtype=np.float64)
    h, w = image.shape[:2]
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    # antialias matters when shrinking (e.g. 0.25 mpp -> 0.5 mpp); align_corners=False is the
    # pixel-centre convention used for the point mapping below.
    out = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    out = out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out, rescale_points(xy, (nw / w, nh / h))


def window_origins(length: int, window: int, step: int) -> np.ndarray:
    """Origins of windows of size ``window`` every ``step`` px covering [0, length)."""
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    n = int(np.ceil((length - window) / step)) + 1
    return np.arange(n, dtype=np.int64) * step


def assign_windows(coord: np.ndarray, origins: np.ndarray, window: int) -> np.ndarray:
    """Index of the window whose centre is nearest (= where the point is most central)."""
    centres = origins + (window - 1) / 2.0
    step = origins[1] - origins[0] if len(origins) > 1 else 1
    k = np.rint((coord - centres[0]) / step).astype(np.int64)
    return np.clip(k, 0, len(origins) - 1)


def crop_window(image: np.ndarray, x0: int, y0: int, ww: int, wh: int) -> np.ndarray:
    """``image[y0:y0+wh, x0:x0+ww]`` with reflection padding where the window leaves the image."""
    h, w = image.shape[:2]
    crop = image[max(y0, 0) : min(y0 + wh, h), max(x0, 0) : min(x0 + ww, w)]
    pad_y = (max(0, -y0), max(0, y0 + wh - h))
    pad_x = (max(0, -x0), max(0, x0 + ww - w))
    if any(pad_y) or any(pad_x):
        crop = np.pad(crop, (pad_y, pad_x, (0, 0)), mode="symmetric")
    return np.ascontiguousarray(crop)


def plan_windows(shape, window: int, overlap: int, align: int):
    """Window size (per axis) and origins for an image of ``shape`` (H, W, ...).

    Windows shrink to the image (rounded up to ``align``) when the image is smaller; the step
    is a multiple of ``align`` so windows share one feature grid. The overlap is at least one
    cell (``align``), so a point is never read from outside its window's outermost cell centres.
    """
    h, w = shape[:2]
    window = max(align, (int(window) // align) * align)
    ww = min(window, -(-w // align) * align)
    wh = min(window, -(-h // align) * align)
    overlap = max(int(overlap), align)
    step = max(align, ((window - overlap) // align) * align)
    return ww, wh, window_origins(w, ww, step), window_origins(h, wh, step)


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("DENUC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "napari-denuc" / "features"


def image_hash(image: np.ndarray) -> str:
    return content_hash([repr((image.shape, str(image.dtype))), np.asarray(image)], digest_size=16)


class FeatureCache:
    """Dense window features on disk: ``<root>/<encoder id>/<image hash>_mpp<mpp>/<window>.npy``."""

    def __init__(self, root, encoder_id: str, image_key: str, mpp: float):
        self.dir = Path(root) / safe_name(encoder_id) / f"{image_key}_mpp{float(mpp):.4f}"

    def path(self, x0, y0, ww, wh) -> Path:
        return self.dir / f"x{x0}_y{y0}_{ww}x{wh}.npy"

    def get(self, x0, y0, ww, wh):
        p = self.path(x0, y0, ww, wh)
        if not p.is_file():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError):  # a damaged file: recompute and overwrite
            return None

    def put(self, x0, y0, ww, wh, fmap: np.ndarray) -> None:
        import io

        from ..io.atomic import atomic_write

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(fmap), allow_pickle=False)
        atomic_write(self.path(x0, y0, ww, wh), buf.getvalue())


# ----------------------------------------------------------------------------- query


def check_inputs(image, xy, mpp):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DenucError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    xy = np.asarray(xy, dtype=np.float64)
    if xy.size == 0:
        xy = xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DenucError(f"expected points as an (N, 2) array of (x, y), got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise DenucError("point coordinates contain NaN or infinity")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise DenucError(f"the image resolution (mpp) must be a positive number, got {mpp!r}; pass --mpp")
    return image, xy, float(mpp)


def query_features(encoder, image, xy, mpp, progress: ProgressFn | None = None) -> np.ndarray:
    """(N, D) float32 features at ``xy`` (input pixels) of ``image`` (RGB uint8 at ``mpp``).

    ``encoder`` provides ``id, feature_dim, mpp, window, overlap, align`` and either
    ``encode_windows(batch (B, h, w, 3) uint8) -> (B, C, h/stride, w/stride)`` with
    ``stride`` (dense, cacheable) or ``window_features(crop, local_xy) -> (n, D)`` (point-wise).
    """
    image, xy, mpp = check_inputs(image, xy, mpp)
    if len(xy) == 0:
        return np.zeros((0, encoder.feature_dim), dtype=np.float32)
    image_key = image_hash(image) if getattr(encoder, "cache_dir", None) else None
    img, pts = resample_image(image, xy, mpp, encoder.mpp)
    cache = FeatureCache(encoder.cache_dir, encoder.id, image_key, mpp) if image_key else None
    return query_windows(encoder, img.shape[:2], pts, lambda x0, y0, ww, wh: crop_window(img, x0, y0, ww, wh), cache, progress)


def query_windows(encoder, shape, pts, crop, cache: FeatureCache | None = None, progress: ProgressFn | None = None) -> np.ndarray:
    """(N, D) features at ``pts`` of an image of ``shape`` (H, W) at the encoder's mpp, read window by window.

    ``crop(x0, y0, ww, wh)`` returns that window as RGB uint8 (reflection-padded where it leaves
    the image, as :func:`crop_window` does); only windows that hold points are asked for, so the
    image itself need not be in memory (whole slides: ``napari_denuc.wsi.slide_features``).
    """
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((len(pts), encoder.feature_dim), dtype=np.float32)
    if not len(pts):
        return out
    ww, wh, ox, oy = plan_windows(tuple(shape), encoder.window, encoder.overlap, encoder.align)
    kx = assign_windows(pts[:, 0], ox, ww)
    ky = assign_windows(pts[:, 1], oy, wh)
    win = ky * len(ox) + kx
    needed = np.unique(win)
    total = len(needed)
    dense = hasattr(encoder, "encode_windows")
    batch_size = max(1, int(getattr(encoder, "batch_size", 1))) if dense else 1

    done = 0
    if progress:
        progress(0, total)
    pending: list[tuple[int, int, int]] = []  # (window id, x0, y0) waiting to be encoded

    def finish(wid, x0, y0, fmap=None, window=None):
        idx = np.nonzero(win == wid)[0]
        local = pts[idx] - (x0, y0)
        if dense:
            stride = encoder.stride
            out[idx] = bilinear_sample(fmap, cell_coordinate(local[:, 0], stride), cell_coordinate(local[:, 1], stride))
        else:
            out[idx] = encoder.window_features(window, local)

    def flush():
        nonlocal done
        if not pending:
            return
        crops = np.stack([crop(x0, y0, ww, wh) for _, x0, y0 in pending])
        fmaps = np.asarray(encoder.encode_windows(crops), dtype=np.float32)
        for (wid, x0, y0), fmap in zip(pending, fmaps):
            fmap = fmap.astype(encoder.cache_dtype)  # round as the cache does: hits and misses agree
            if cache is not None:
                cache.put(x0, y0, ww, wh, fmap)
            finish(wid, x0, y0, fmap=fmap.astype(np.float32))
            done += 1
            if progress:
                progress(done, total)
        pending.clear()

    for wid in needed:
        x0, y0 = int(ox[wid % len(ox)]), int(oy[wid // len(ox)])
        if not dense:
            finish(wid, x0, y0, window=crop(x0, y0, ww, wh))
            done += 1
            if progress:
                progress(done, total)
            continue
        fmap = cache.get(x0, y0, ww, wh) if cache is not None else None
        if fmap is not None:
            finish(wid, x0, y0, fmap=fmap.astype(np.float32))
            done += 1
            if progress:
                progress(done, total)
            continue
        pending.append((int(wid), x0, y0))
        if len(pending) >= batch_size:
            flush()
    flush()
    return out
