"""Tissue mask, tile plan and seam ownership.

The plan is a partition of the chosen level into *cores* (``tile_size`` square, the last row and
column smaller); each tile reads its core grown by ``overlap`` pixels on every side, and owns
exactly its core: a detection is kept by the tile whose core contains its position. The cores
partition the plane (the outer tiles' cores extend to infinity), so every nucleus is kept by
exactly one tile, whatever the order the tiles run in, and the seams sit in the middle of the
``2 * overlap`` band two neighbours both see.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import DenucError
from ..geometry import rescale_points
from .slides import SlideSource


@dataclass(frozen=True)
class MaskParams:
    resolution_um: float = 8.0  # mask pixel size (about a 1.25x objective), unless that exceeds max_size
    max_size: int = 2048  # longest side of the mask image, pixels
    min_tissue_um2: float = 20000.0  # objects smaller than this are dropped (dust, debris)
    dilate_um: float = 32.0  # grow tissue by this much so tissue edges aren't cut off
    min_threshold: float = 0.05  # the saturation threshold is Otsu's, clamped to this range
    max_threshold: float = 0.15
    min_side_px: int = 4096  # inputs no larger than this (level 0) are processed whole, unmasked


def thumbnail(source: SlideSource, max_size: int = 2048, min_downsample: float = 1.0) -> tuple[np.ndarray, float]:
    """An RGB thumbnail and its downsample w.r.t. level 0.

    The downsample is at least ``min_downsample`` and large enough for the thumbnail to fit in
    ``max_size`` pixels. Reads the coarsest level that is fine enough, in blocks,
    block-averaging by an integer factor, so memory stays bounded even for a single-level slide.
    """
    w0, h0 = source.dimensions
    want = max(min_downsample, max(w0, h0) / max_size, 1.0)
    level = 0
    for lvl, ds in enumerate(source.level_downsamples):
        if ds <= want * 1.01:
            level = lvl
    lw, lh = source.level_dimensions[level]
    f = max(1, int(math.floor(want / source.level_downsamples[level] + 1e-6)))
    f = max(f, int(math.ceil(max(lw, lh) / max_size)))
    tw, th = lw // f or 1, lh // f or 1
    out = np.empty((th, tw, 3), np.uint8)
    block = max(f, (4096 // f) * f)
    for y in range(0, th * f, block):
        for x in range(0, tw * f, block):
            bw, bh = min(block, tw * f - x), min(block, th * f - y)
            a = source.read_level(level, x, y, bw, bh).astype(np.float32)
            a = a[: bh // f * f, : bw // f * f].reshape(bh // f, f, bw // f, f, 3).mean(axis=(1, 3))
            out[y // f : y // f + a.shape[0], x // f : x // f + a.shape[1]] = np.clip(a + 0.5, 0, 255).astype(np.uint8)
    ds = source.level_downsamples[level] * f
    return out, float(ds)


def tissue_mask(source: SlideSource, mpp: float, params: MaskParams = MaskParams()) -> tuple[np.ndarray, float]:
    """Boolean tissue mask on a thumbnail, and its downsample w.r.t. level 0.

    Otsu threshold on the HSV saturation (H&E tissue is coloured, glass background is grey/white),
    clamped to ``[min_threshold, max_threshold]`` so that an all-tissue or all-glass image is
    handled sensibly, then small objects removed and the tissue slightly dilated.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    thumb, ds = thumbnail(source, params.max_size, params.resolution_um / mpp)
    rgb = thumb.astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    sat = ndi.uniform_filter(sat, 3)
    try:
        thr = float(threshold_otsu(sat)) if sat.size > 1 and np.ptp(sat) > 0 else params.max_threshold
    except ValueError:
        thr = params.max_threshold
    thr = min(max(thr, params.min_threshold), params.max_threshold)
    mask = sat > thr
    px_um = mpp * ds  # micrometres per mask pixel
    min_px = int(params.min_tissue_um2 / px_um**2)
    if min_px > 1 and mask.any():
        labels, n = ndi.label(mask)
        sizes = np.bincount(labels.ravel())
        small = sizes < min_px
        small[0] = False
        mask[small[labels]] = False
    r = int(round(params.dilate_um / px_um))
    if r > 0 and mask.any() and not mask.all():
        mask = ndi.distance_transform_edt(~mask) <= r
    return mask, ds


def choose_level(source: SlideSource, slide_mpp: float, target_mpp: float, tolerance: float = 1.15) -> int:
    """The coarsest level whose mpp is at most ``target_mpp * tolerance`` (never coarser than the model wants)."""
    best = 0
    for lvl, ds in enumerate(source.level_downsamples):
        if slide_mpp * ds <= target_mpp * tolerance:
            best = lvl
    return best


@dataclass
class Tile:
    index: int
    x: int  # core origin and size in pixels of the plan's level
    y: int
    w: int
    h: int
    tissue: bool = True


@dataclass
class TilePlan:
    level: int
    downsample: float  # of the level w.r.t. level 0 (level-0 points: geometry.rescale_points(xy, ds))
    level_size: tuple[int, int]
    level_mpp: float
    tile_size: int
    overlap: int
    tiles: list[Tile] = field(default_factory=list)

    @property
    def n_tissue(self) -> int:
        return sum(t.tissue for t in self.tiles)

    def read_box(self, t: Tile) -> tuple[int, int, int, int]:
        """(x, y, w, h) at the level: the core grown by the overlap, clipped to the slide.

        Clipped rather than padded: a white margin looks like the edge of the tissue to the
        detector, which then misses nuclei along the border of small images.
        """
        o = self.overlap
        lw, lh = self.level_size
        x0, y0 = max(0, t.x - o), max(0, t.y - o)
        x1, y1 = min(lw, t.x + t.w + o), min(lh, t.y + t.h + o)
        return x0, y0, x1 - x0, y1 - y0

    def owned(self, t: Tile, xy_level: np.ndarray) -> np.ndarray:
        """Which of the points (level pixels) lie in the tile's core; pixel i spans [i - 0.5, i + 0.5)."""
        lw, lh = self.level_size
        x0 = t.x - 0.5 if t.x > 0 else -np.inf
        y0 = t.y - 0.5 if t.y > 0 else -np.inf
        x1 = t.x + t.w - 0.5 if t.x + t.w < lw else np.inf
        y1 = t.y + t.h - 0.5 if t.y + t.h < lh else np.inf
        x, y = xy_level[:, 0], xy_level[:, 1]
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)

    def to_level0(self, xy_level: np.ndarray) -> np.ndarray:
        return rescale_points(xy_level, self.downsample)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tiles"] = [[t.index, t.x, t.y, t.w, t.h, int(t.tissue)] for t in self.tiles]
        return d


def check_tiling(tile_size: int, overlap: int) -> None:
    """DenucError for a tile size or overlap the plan cannot use (``--tile-size``, ``--overlap``)."""
    if tile_size < 16 or overlap < 0 or overlap > tile_size:
        raise DenucError(
            f"--tile-size must be at least 16 and --overlap between 0 and the tile size, got {tile_size} and {overlap}"
        )


def plan_tiles(
    source: SlideSource,
    slide_mpp: float,
    target_mpp: float,
    tile_size: int = 1024,
    overlap: int = 64,
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
) -> TilePlan:
    """Cut the level nearest ``target_mpp`` into tiles; tiles whose core has no tissue are marked background."""
    check_tiling(tile_size, overlap)
    level = choose_level(source, slide_mpp, target_mpp)
    ds = source.level_downsamples[level]
    lw, lh = source.level_dimensions[level]
    plan = TilePlan(level, float(ds), (lw, lh), float(slide_mpp * ds), int(tile_size), int(overlap))
    k = 0
    for y in range(0, lh, tile_size):
        for x in range(0, lw, tile_size):
            w, h = min(tile_size, lw - x), min(tile_size, lh - y)
            tissue = True
            if mask is not None:
                f = ds / mask_downsample  # level pixels -> mask pixels
                mx0, my0 = int(math.floor(x * f)) - 1, int(math.floor(y * f)) - 1
                mx1, my1 = int(math.ceil((x + w) * f)) + 1, int(math.ceil((y + h) * f)) + 1
                sub = mask[max(0, my0) : max(0, my1), max(0, mx0) : max(0, mx1)]
                tissue = bool(sub.any())
            plan.tiles.append(Tile(k, x, y, w, h, tissue))
            k += 1
    return plan
