"""What runs on a worker: its per-process state (threads, malloc, open slides) and the tasks.

The tasks (``compute_plan``, ``compute_tile``, ``class_info``) take and return small picklable
values, so the same functions run in this process or as Dask tasks on any worker.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict

import numpy as np

from ..errors import DenucError
from ..results import Detections
from .slides import open_slide, resolve_mpp
from .store import det_to_arrays
from .tiling import Tile, TilePlan, plan_tiles, tissue_mask

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def set_threads(n: int | None) -> None:
    """Limit torch, BLAS and OpenMP threads in this process to ``n`` (one per Dask worker).

    Environment variables are read once, when a library loads; by the time a pipeline is built
    numpy (and often torch) are loaded and ``OMP_NUM_THREADS`` has no effect. So torch is
    limited through ``torch.set_num_threads`` and the loaded BLAS/OpenMP pools through
    threadpoolctl; the variables are still set for libraries loaded later and child processes.
    """
    if not n:
        return
    n = int(n)
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    try:
        import torch  # loaded first, so that threadpoolctl sees its OpenMP runtime

        torch.set_num_threads(n)
    except ImportError:
        pass
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)  # stays in effect for the life of the process


def relax_malloc_trim() -> None:
    """Undo the cost of Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` in this process.

    Dask's nanny sets it in every worker; setting it also freezes glibc's mmap threshold at
    128 KiB, so each large temporary array is mmapped and page-faulted afresh, and the pipeline
    ran 2.3 times slower in a worker than in a plain process. Generous thresholds restore the
    plain-process speed; memory stays bounded by the tile batch as before.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)


_SOURCES: OrderedDict = OrderedDict()
_MAX_OPEN = 4


def source(path):
    key = os.path.abspath(path)
    src = _SOURCES.get(key)
    if src is None:
        src = open_slide(path)
        _SOURCES[key] = src
        while len(_SOURCES) > _MAX_OPEN:
            _, old = _SOURCES.popitem(last=False)
            try:
                old.close()
            except Exception:
                pass
    else:
        _SOURCES.move_to_end(key)
    return src


def forget_source(path) -> None:
    src = _SOURCES.pop(os.path.abspath(path), None)
    if src is not None:
        try:
            src.close()
        except Exception:
            pass


def compute_plan(path, mpp, fallback_mpp, target_mpp, tile_size, overlap, use_mask, mask_params) -> dict:
    """Open the slide, resolve its mpp, mask the tissue and cut tiles. Small, picklable result."""
    t0 = time.perf_counter()
    try:
        src = source(path)
        slide_mpp, mpp_source = resolve_mpp(src, mpp, fallback_mpp)
    except DenucError as exc:  # returned, not raised: an expected user error is no worker crash
        return {"error": str(exc)}
    mask, mask_ds = (None, 1.0)
    # Tiles and small images are nearly always all tissue, and a mask at 8 um per pixel is too
    # coarse to judge them (a pale all-tissue tile was masked out whole): mask slides only.
    if use_mask and max(src.dimensions) > mask_params.min_side_px:
        mask, mask_ds = tissue_mask(src, slide_mpp, mask_params)
    plan = plan_tiles(src, slide_mpp, target_mpp, tile_size, overlap, mask, mask_ds)
    return {
        "plan": plan,
        "mpp": slide_mpp,
        "mpp_source": mpp_source,
        "reader": src.reader,
        "dimensions": list(src.dimensions),
        "levels": [list(d) for d in src.level_dimensions],
        "tissue_fraction": float(mask.mean()) if mask is not None else 1.0,
        "plan_s": time.perf_counter() - t0,
    }


def compute_tile(path, geometry: TilePlan, tile: Tile, factory) -> dict:
    """Read one tile with its overlap, run ``process_tile``, keep what the tile owns, in level-0 pixels."""
    src = source(path)
    x, y, w, h = geometry.read_box(tile)
    rgb = src.read_level(geometry.level, x, y, w, h)
    det = factory()(rgb, geometry.level_mpp)
    if not isinstance(det, Detections):
        raise TypeError(f"process_tile returned {type(det).__name__}, expected Detections")
    xy_level = det.xy + np.array([x, y], np.float64)
    keep = geometry.owned(tile, xy_level)
    arrays = det_to_arrays(det)
    arrays["xy"] = geometry.to_level0(xy_level[keep])
    arrays["scores"] = arrays["scores"][keep]
    arrays["class_ids"] = arrays["class_ids"][keep]
    if arrays["probs"] is not None:
        arrays["probs"] = arrays["probs"][keep]
    return arrays


def class_info(factory, mpp: float) -> dict:
    """Class names/colours of the pipeline (for slides without any tissue tile)."""
    det = factory()(np.full((64, 64, 3), 255, np.uint8), mpp)
    return det_to_arrays(
        Detections(
            np.zeros((0, 2)), [], [], det.class_names, det.class_colors, None if det.probs is None else np.zeros((0, len(det.class_names)))
        )
    )
