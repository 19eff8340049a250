"""Synthetic H&E-like whole-slide images and a cheap blob detector, for tests and benchmarks.

``make_test_slide`` writes a tiled pyramidal TIFF (level 0 plus 2x-downsampled sub-resolutions
stored as SubIFDs, the layout tiffslide and OpenSlide read as a generic pyramidal TIFF) with the
resolution in the TIFF resolution tags (pixels per centimetre), which tiffslide reports as
``tiffslide.mpp-x``. The picture: white background, pink tissue ellipses, and dark purple round
nuclei (radius about 3 um) only inside the tissue. Reproducible for a given seed.

``BlobFactory`` is a picklable factory of a ``process_tile(tile, mpp) -> Detections`` callable
based on a threshold + centroid detector: deterministic, fast, torch-free. It finds the synthetic
nuclei exactly, which makes it a good stand-in for the real pipeline in tests.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..results import Detections

BACKGROUND = (242, 240, 243)
TISSUE = (236, 170, 200)  # eosin pink
NUCLEUS = (80, 40, 130)  # haematoxylin purple


def synthetic_slide_array(width: int, height: int, mpp: float = 0.5, seed: int = 0, nuclei_per_mm2: float = 1500.0):
    """Return ``(rgb uint8 (H, W, 3), nuclei_xy (N, 2))`` of a synthetic H&E-like slide.

    Builds the image in horizontal strips so that an 8192x8192 slide needs ~200 MB at most.
    """
    rng = np.random.default_rng(seed)
    # tissue: a few ellipses covering roughly half of the slide
    ellipses = []
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        ax, ay = rng.uniform(0.15, 0.3) * width, rng.uniform(0.15, 0.3) * height
        ellipses.append((cx, cy, ax, ay))

    def in_tissue(x, y):
        m = np.zeros(np.broadcast(x, y).shape, bool)
        for cx, cy, ax, ay in ellipses:
            m |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
        return m

    area_mm2 = width * height * (mpp / 1000.0) ** 2
    n_try = rng.poisson(nuclei_per_mm2 * area_mm2 * 2)
    radius = 3.0 / mpp  # 3 um
    spacing = 2.6 * radius
    cand = rng.uniform([radius + 1, radius + 1], [width - radius - 2, height - radius - 2], size=(n_try, 2))
    cand = cand[in_tissue(cand[:, 0], cand[:, 1])]
    # thin out so that blobs never touch (grid-hash rejection, deterministic)
    keep, cells = [], {}
    cs = spacing
    for i, (x, y) in enumerate(cand):
        gx, gy = int(x // cs), int(y // cs)
        ok = True
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in cells.get((gx + dx, gy + dy), ()):
                    if (cand[j, 0] - x) ** 2 + (cand[j, 1] - y) ** 2 < spacing**2:
                        ok = False
                        break
        if ok:
            keep.append(i)
            cells.setdefault((gx, gy), []).append(i)
    nuclei = np.round(cand[keep]).astype(np.float64)  # blob centres on pixel centres

    img = np.empty((height, width, 3), np.uint8)
    strip = 512
    xs = np.arange(width, dtype=np.float32)
    r = int(np.ceil(radius))
    for y0 in range(0, height, strip):
        y1 = min(height, y0 + strip)
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        m = in_tissue(xs[None, :], ys)
        block = np.where(m[..., None], np.array(TISSUE, np.uint8), np.array(BACKGROUND, np.uint8))
        noise = rng.integers(-6, 7, size=block.shape[:2], dtype=np.int16)[..., None]
        block = np.clip(block.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        sel = nuclei[(nuclei[:, 1] >= y0 - r - 1) & (nuclei[:, 1] < y1 + r + 1)]
        for x, y in sel:
            xi, yi = int(x), int(y)
            ya, yb = max(y0, yi - r), min(y1, yi + r + 1)
            xa, xb = max(0, xi - r), min(width, xi + r + 1)
            if ya >= yb:
                continue
            yy, xx = np.mgrid[ya:yb, xa:xb]
            disk = (yy - yi) ** 2 + (xx - xi) ** 2 <= radius**2
            sub = block[ya - y0 : yb - y0, xa:xb]
            sub[disk] = NUCLEUS
        img[y0:y1] = block
    return img, nuclei


def make_test_slide(
    path,
    size: int | tuple[int, int] = 1024,
    mpp: float | None = 0.5,
    seed: int = 0,
    tile: int = 256,
    min_level_size: int = 256,
    compression: str | None = "zlib",
) -> np.ndarray:
    """Write a synthetic pyramidal TIFF at ``path`` and return the true nucleus centres (N, 2) in level-0 pixels.

    ``size`` is the level-0 width (and height, or give ``(width, height)``). With ``mpp=None`` no
    resolution is written (to test the "give --mpp" error).
    """
    import tifffile

    width, height = (size, size) if isinstance(size, int) else size
    img, nuclei = synthetic_slide_array(width, height, mpp or 0.5, seed)
    levels = [img]
    while max(levels[-1].shape[:2]) // 2 >= min_level_size:
        prev = levels[-1]
        h2, w2 = prev.shape[0] // 2, prev.shape[1] // 2
        small = prev[: h2 * 2, : w2 * 2].reshape(h2, 2, w2, 2, 3).mean(axis=(1, 3), dtype=np.float32)
        levels.append(np.clip(small + 0.5, 0, 255).astype(np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=(tile, tile), photometric="rgb", compression=compression, metadata=None)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        for i, level in enumerate(levels):
            kw = dict(options)
            if mpp:
                ds = 2**i
                kw.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            if i == 0:
                kw["subifds"] = len(levels) - 1
                kw["description"] = "napari-denuc synthetic slide"
            else:
                kw["subfiletype"] = 1
            tif.write(level, **kw)
    return nuclei


def blob_detect(tile: np.ndarray, threshold: int = 140, min_area: int = 5):
    """Centroids of dark connected blobs in an RGB uint8 tile: ``(xy (N, 2), scores (N,))``."""
    from scipy import ndimage as ndi

    grey = tile.astype(np.float32).mean(axis=-1)
    mask = grey < threshold
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0, np.float32)
    idx = np.arange(1, n + 1)
    area = ndi.sum_labels(mask, labels, idx)
    cy, cx = np.array(ndi.center_of_mass(mask, labels, idx)).reshape(-1, 2).T
    darkness = ndi.mean(grey, labels, idx)
    keep = area >= min_area
    xy = np.stack([cx[keep], cy[keep]], axis=1)
    scores = np.clip(1.0 - np.asarray(darkness)[keep] / 255.0, 0, 1).astype(np.float32)
    return xy, scores


@dataclass(frozen=True)
class BlobFactory:
    """Picklable factory of a fake ``process_tile``: dark blobs -> nuclei, two classes by x parity.

    ``delay`` (seconds per tile) makes runs slow enough to be killed mid-way in tests; it
    doesn't enter ``config()``, so it doesn't invalidate resumable tiles.
    """

    threshold: int = 140
    target_mpp: float = 0.5
    delay: float = 0.0

    def config(self) -> dict:
        return {"kind": "blob", "threshold": self.threshold, "target_mpp": self.target_mpp}

    def __call__(self):
        factory = self
        names = ("tumour", "other")

        def process_tile(tile, mpp):
            if factory.delay:
                time.sleep(factory.delay)
            xy, scores = blob_detect(tile, factory.threshold)
            cls = (np.floor(xy[:, 0] / 50.0).astype(np.int64) % 2) if len(xy) else np.zeros(0, np.int64)
            probs = np.where(cls[:, None] == np.arange(2)[None, :], 0.8, 0.2)
            return Detections(xy, scores, cls, names, probs=probs)

        return process_tile

    def dump(self) -> dict:
        return asdict(self)
