"""Resumable whole-slide batch prediction, in one process or as Dask tasks.

``predict_slides(inputs, out_dir, factory, ...)`` is what ``denuc-predict`` calls. For every
input it opens the slide, computes a cheap tissue mask on a low-resolution level, plans tiles
at the level nearest the model's mpp, runs ``process_tile`` on every tissue tile (reading the
tile with its overlap through ``read_region``, never a whole level), keeps the detections each
tile owns, commits them to ``OUT/.<stem>.tiles/`` as each tile finishes, and at the end merges
them into ``<stem>.geojson[.gz]``, ``<stem>.csv``, ``<stem>.parquet`` and
``<stem>.summary.json`` (written last: its presence with the same config hash means "done").

The model is not passed as an object but as a picklable *factory*: ``factory()`` returns a
``process_tile(rgb_uint8_tile, mpp) -> Detections`` callable (tile-local coordinates at the
resolution read) and caches what it builds per process, so every Dask worker loads the model
once. ``factory.config()`` (a JSON-able dict) identifies the results for resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..results import Detections
from .outputs import FORMATS, output_paths, read_summary, summary_path, write_outputs, write_summary
from .slides import expand_inputs, open_slide, resolve_mpp
from .store import TileStore, arrays_to_det, config_hash, det_to_arrays
from .tiling import MaskParams, Tile, TilePlan, plan_tiles, tissue_mask

log = logging.getLogger("napari_denuc.wsi")

DEFAULT_TARGET_MPP = 0.5
RUN_VERSION = 1

# ----------------------------------------------------------------------------- the factory
_PIPELINES: dict[str, object] = {}


def _file_identity(value):
    """A path's size and mtime (so a retrained model at the same path invalidates stale tiles)."""
    if value is None:
        return None
    p = Path(str(value))
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return str(value)


def set_threads(n: int | None) -> None:
    """Limit BLAS/OpenMP and torch threads in this process (one per Dask worker)."""
    if not n:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(int(n))
    except Exception:  # torch missing
        pass


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


@dataclass(frozen=True)
class PipelineFactory:
    """Builds ``napari_denuc.pipeline.Pipeline.from_defaults(...)`` once per process.

    ``detector``, ``encoder``, ``head``: as for ``Pipeline.from_defaults`` (None = defaults);
    ``device``: "cpu", "cuda", "cuda:1"...; ``batch_size``: detector windows per forward pass;
    ``threads``: torch/OpenMP threads per process (None: torch's default; ``predict_slides``
    sets 1 for Dask workers); ``target_mpp``: the tiling resolution, by default the detector's mpp.
    """

    detector: str | None = None
    encoder: str | None = None
    head: str | None = None
    device: str | None = None
    batch_size: int | None = None
    threads: int | None = None
    encoder_weights: str | None = None
    target_mpp: float | None = None

    def config(self) -> dict:
        # device/batch_size/threads don't change what is detected; model files are identified by content stamp
        return {
            "kind": "pipeline",
            "detector": _file_identity(self.detector),
            "encoder": self.encoder,
            "head": _file_identity(self.head),
            "encoder_weights": _file_identity(self.encoder_weights),
            "target_mpp": self.target_mpp,
        }

    def pipeline(self):
        key = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        pipe = _PIPELINES.get(key)
        if pipe is None:
            set_threads(self.threads)
            relax_malloc_trim()
            from ..pipeline import Pipeline

            pipe = Pipeline.from_defaults(
                detector=self.detector,
                encoder=self.encoder,
                head=self.head,
                device=self.device,
                encoder_weights=self.encoder_weights,
            )
            if self.batch_size:
                det = pipe.detector
                det.detect = functools.partial(type(det).detect, det, batch_size=int(self.batch_size))
            _PIPELINES[key] = pipe
        return pipe

    def resolve_target_mpp(self) -> float:
        if self.target_mpp:
            return float(self.target_mpp)
        return float(getattr(self.pipeline().detector, "mpp", DEFAULT_TARGET_MPP))

    def __call__(self):
        pipe = self.pipeline()
        return lambda tile, mpp: pipe.run(tile, mpp)


def factory_config(factory) -> dict:
    if hasattr(factory, "config"):
        return factory.config()
    return {"repr": repr(factory)}


def _resolve_target_mpp(factory) -> float:
    t = getattr(factory, "target_mpp", None)
    if t:
        return float(t)
    if hasattr(factory, "resolve_target_mpp"):
        return float(factory.resolve_target_mpp())
    return DEFAULT_TARGET_MPP


# ----------------------------------------------------------------------------- tasks (run on workers)
_SOURCES: OrderedDict = OrderedDict()
_MAX_OPEN = 4


def _source(path):
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


def _forget_source(path) -> None:
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
        src = _source(path)
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
    src = _source(path)
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
    return det_to_arrays(Detections(np.zeros((0, 2)), [], [], det.class_names, det.class_colors, None if det.probs is None else np.zeros((0, len(det.class_names)))))


# ----------------------------------------------------------------------------- results
@dataclass
class SlideResult:
    path: Path
    stem: str
    status: str = "pending"  # "done", "up-to-date", "failed"
    error: str | None = None
    outputs: dict = field(default_factory=dict)
    summary: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "up-to-date")


@dataclass
class BatchResult:
    slides: list[SlideResult]
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.slides)

    @property
    def failed(self) -> list[SlideResult]:
        return [s for s in self.slides if not s.ok]

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


# ----------------------------------------------------------------------------- the runner
@dataclass
class _Job:
    result: SlideResult
    mpp: float | None
    fallback_mpp: float | None
    run_config: dict
    key: str
    paths: dict
    summary_file: Path
    store: TileStore | None = None
    info: dict | None = None
    remaining: set = field(default_factory=set)
    reused: int = 0
    computed: int = 0
    t_start: float = 0.0
    t_tiles: float = 0.0
    bar: object = None


def _unique_stems(paths) -> list[str]:
    stems, seen = [], {}
    for p in paths:
        s = Path(p).stem
        n = seen.get(s, 0)
        seen[s] = n + 1
        stems.append(s if n == 0 else f"{s}-{n + 1}")
    return stems


def _slide_identity(path: Path) -> dict:
    try:
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(path)}


def _normalize_inputs(inputs, mpp):
    """Paths/folders/globs/CSV lists are expanded; ``(path, mpp or None)`` pairs are taken as they are.

    The mpp in each pair is the input's own (it overrides the file's metadata); ``mpp`` (``--mpp``)
    stays separate: it is used only for files that state no resolution.
    """
    items = list(inputs) if not isinstance(inputs, (str, os.PathLike)) else [inputs]
    out, seen = [], set()
    for i in items:
        pairs = [(Path(i[0]), i[1])] if isinstance(i, tuple) else expand_inputs([i])
        for p, m in pairs:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append((p, m))
    return out


def _bar(progress, **kw):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kw)


def predict_slides(
    inputs,
    out_dir,
    factory,
    *,
    mpp: float | None = None,
    target_mpp: float | None = None,
    tile_size: int = 1024,
    overlap: int = 64,
    formats=FORMATS,
    gzip: bool = False,
    tissue: bool = True,
    mask_params: MaskParams | None = None,
    resume: bool = True,
    overwrite: bool = False,
    keep_tiles: bool = False,
    dask: bool = False,
    scheduler: str | None = None,
    n_workers: int = 2,
    client=None,
    tiles_in_flight: int | None = None,
    progress: bool = True,
    on_tile=None,
    geojson_per_class: bool = False,
) -> BatchResult:
    """Predict nuclei on every input and write ``<stem>.{geojson[.gz],csv,parquet,summary.json}`` into ``out_dir``.

    inputs: paths/folders/globs/CSV lists (see ``expand_inputs``) or ``[(path, mpp or None), ...]``.
    factory: picklable; ``factory()`` -> ``process_tile(tile, mpp) -> Detections`` (e.g. ``PipelineFactory``).
    mpp: level-0 mpp for inputs whose files state none (``--mpp``); a per-input mpp (CSV column,
        or the second item of a pair) overrides the file's metadata.
    target_mpp: resolution to tile at (default ``factory.target_mpp`` or the detector's mpp).
    tile_size, overlap: core tile size and overlap on each side, in pixels of the level read.
    tissue: skip background tiles using the tissue mask.
    resume: reuse finished tiles of an interrupted run with the same config; ``overwrite``:
        recompute slides whose outputs are already complete (else they are skipped as up-to-date).
    dask / scheduler / n_workers / client: run plans and tiles as Dask tasks on a new
        ``LocalCluster(n_workers, threads_per_worker=1, processes=True)``, on the scheduler at
        ``scheduler`` ("tcp://host:8786"), or on the given ``distributed.Client``.
    tiles_in_flight: tiles submitted but not committed (bounds memory); default 2 per worker thread.
    on_tile: called as ``on_tile(stem, tile_index, n_committed_in_this_run)`` after each commit.
    geojson_per_class: also write ``<stem>.<class>.geojson[.gz]``, one file per class.

    Outputs are streamed from the per-tile store one tile at a time, so writing them needs
    memory for one tile, not for the slide's nuclei.

    A slide that can't be read, has no mpp, or whose tiles fail is reported in its
    ``SlideResult`` (status "failed", one-line ``error``) and the others go on.
    """
    t_all = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _normalize_inputs(inputs, mpp)
    if not items:
        raise DenucError("no inputs given")
    formats = tuple(formats)
    for f in formats:
        if f not in FORMATS:
            raise DenucError(f"unknown output format {f!r}; choose from {', '.join(FORMATS)}")
    mask_params = mask_params or MaskParams()
    if geojson_per_class and "geojson" not in formats:
        raise DenucError("--geojson-per-class needs the geojson format; add geojson to --format")

    own_client = own_cluster = None
    if client is None and (dask or scheduler):
        own_client, own_cluster = make_client(scheduler, n_workers)
        client = own_client
    if client is not None and dataclasses.is_dataclass(factory) and getattr(factory, "threads", 0) is None:
        factory = dataclasses.replace(factory, threads=1)  # one torch thread per single-threaded worker
    try:
        if target_mpp is None:
            target_mpp = client.submit(_resolve_target_mpp, factory, pure=False).result() if client else _resolve_target_mpp(factory)
        target_mpp = float(target_mpp)
        fconf = factory_config(factory)

        jobs: list[_Job] = []
        for (path, slide_mpp), stem in zip(items, _unique_stems([p for p, _ in items])):
            run_config = {
                "version": RUN_VERSION,
                "factory": fconf,
                "slide": _slide_identity(Path(path)),
                "mpp": slide_mpp,
                "fallback_mpp": mpp,
                "target_mpp": target_mpp,
                "tile_size": int(tile_size),
                "overlap": int(overlap),
                "tissue": bool(tissue),
                "mask": dataclasses.asdict(mask_params) if tissue else None,
            }
            if geojson_per_class:  # only when set, so earlier finished outputs stay up to date
                run_config["geojson_per_class"] = True
            jobs.append(
                _Job(
                    SlideResult(Path(path), stem),
                    slide_mpp,
                    mpp,
                    run_config,
                    config_hash(run_config),
                    output_paths(out_dir, stem, formats, gzip),
                    summary_path(out_dir, stem),
                )
            )

        todo = []
        for job in jobs:
            if not overwrite and _up_to_date(job):
                job.result.status = "up-to-date"
                job.result.summary = read_summary(job.summary_file)
                job.result.outputs = {k: str(out_dir / v) for k, v in job.result.summary["outputs"].items()}
            else:
                todo.append(job)

        overall = _bar(progress, total=0, desc="tiles (all slides)", unit="tile", position=0, dynamic_ncols=True)
        ctx = _Ctx(
            out_dir, factory, target_mpp, tile_size, overlap, tissue, mask_params, resume, keep_tiles, gzip, progress, on_tile, overall,
            geojson_per_class=geojson_per_class,
        )
        if client is None:
            _run_local(todo, ctx)
        else:
            window = tiles_in_flight or max(2, 2 * sum(client.nthreads().values()))
            _run_dask(todo, ctx, client, window)
        if overall is not None:
            overall.close()
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
    return BatchResult([j.result for j in jobs], time.perf_counter() - t_all)


def make_client(scheduler: str | None = None, n_workers: int = 2):
    """``(client, cluster)``: connect to ``scheduler`` or start a local cluster of worker processes."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DenucError("--dask needs dask.distributed: pip install 'napari-denuc[wsi]'") from None
    if scheduler:
        try:
            return Client(scheduler, timeout="30s"), None
        except OSError as exc:
            raise DenucError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); check the address and that it is running") from None
    cluster = LocalCluster(
        n_workers=int(n_workers),
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TIFFSLIDE_NUM_DECODE_THREADS": "1"},
    )
    return Client(cluster), cluster


def _up_to_date(job: _Job) -> bool:
    s = read_summary(job.summary_file)
    if not s or s.get("config_hash") != job.key or not all(p.is_file() for p in job.paths.values()):
        return False
    outputs = s.get("outputs")
    return isinstance(outputs, dict) and all((job.summary_file.parent / n).is_file() for n in outputs.values())


@dataclass
class _Ctx:
    out_dir: Path
    factory: object
    target_mpp: float
    tile_size: int
    overlap: int
    tissue: bool
    mask_params: MaskParams
    resume: bool
    keep_tiles: bool
    gzip: bool
    progress: bool
    on_tile: object
    overall: object
    geojson_per_class: bool = False
    committed: int = 0

    def plan_args(self, job: _Job):
        return (str(job.result.path), job.mpp, job.fallback_mpp, self.target_mpp, self.tile_size, self.overlap, self.tissue, self.mask_params)


def _fail(job: _Job, exc: BaseException) -> None:
    job.result.status = "failed"
    msg = str(exc) if isinstance(exc, DenucError) else f"{type(exc).__name__}: {exc}"
    job.result.error = msg.splitlines()[0] if msg else type(exc).__name__
    if str(job.result.path) not in job.result.error:
        job.result.error = f"{job.result.path}: {job.result.error}"
    log.info("failed: %s", job.result.error)
    if job.bar is not None:
        job.bar.close()
        job.bar = None


def _start(job: _Job, info: dict, ctx: _Ctx) -> list[Tile]:
    """Record the plan, open the store; return the tissue tiles still to compute."""
    job.info = info
    plan: TilePlan = info["plan"]
    job.store = TileStore(ctx.out_dir / f".{job.result.stem}.tiles", job.run_config, plan.to_dict(), resume=ctx.resume)
    tissue = [t for t in plan.tiles if t.tissue]
    done = job.store.done()
    pending = [t for t in tissue if t.index not in done]
    job.reused = len(tissue) - len(pending)
    job.remaining = {t.index for t in pending}
    if ctx.overall is not None:
        ctx.overall.total += len(tissue)
        ctx.overall.update(job.reused)
    job.bar = _bar(ctx.progress, total=len(tissue), initial=job.reused, desc=job.result.stem[:30], unit="tile", position=1, leave=False, dynamic_ncols=True)
    job.t_tiles = time.perf_counter()
    return pending


def _commit(job: _Job, tile_index: int, arrays: dict, ctx: _Ctx) -> None:
    job.store.commit(tile_index, arrays)
    job.remaining.discard(tile_index)
    job.computed += 1
    ctx.committed += 1
    if job.bar is not None:
        job.bar.update(1)
    if ctx.overall is not None:
        ctx.overall.update(1)
    if ctx.on_tile is not None:
        ctx.on_tile(job.result.stem, tile_index, ctx.committed)


def _tile_chunks(job: _Job, compute):
    """A callable returning a fresh iterator over the slide's tissue tiles as Detections."""
    plan: TilePlan = job.info["plan"]
    indices = [t.index for t in plan.tiles if t.tissue]
    by_index = {t.index: t for t in plan.tiles}
    return lambda: job.store.iter_detections(indices, lambda i: compute(by_index[i] if i is not None else None))


def _count(chunks) -> tuple[int, dict, tuple]:
    counts, names, n = None, (), 0
    for det in chunks():
        if counts is None:
            names, counts = det.class_names, np.zeros(len(det.class_names), np.int64)
        counts += np.bincount(det.class_ids, minlength=len(names))[: len(names)]
        n += len(det)
    return n, {name: int(c) for name, c in zip(names, counts if counts is not None else [])}, names


def _finish(job: _Job, ctx: _Ctx, compute) -> None:
    t0 = time.perf_counter()
    tiles_s = t0 - job.t_tiles
    if job.bar is not None:
        job.bar.close()
        job.bar = None
    chunks = _tile_chunks(job, compute)
    n_nuclei, counts, names = _count(chunks)  # also recomputes vanished tiles before any file is written
    written = write_outputs(job.paths, chunks, gzip=ctx.gzip, per_class=names if ctx.geojson_per_class else None)
    plan: TilePlan = job.info["plan"]
    info = job.info
    n_tissue = plan.n_tissue
    summary = {
        "input": str(job.result.path),
        "reader": info["reader"],
        "dimensions": info["dimensions"],
        "mpp": info["mpp"],
        "mpp_source": info["mpp_source"],
        "target_mpp": ctx.target_mpp,
        "level": plan.level,
        "level_mpp": plan.level_mpp,
        "level_downsample": plan.downsample,
        "tile_size": plan.tile_size,
        "overlap": plan.overlap,
        "n_tiles": len(plan.tiles),
        "n_tiles_tissue": n_tissue,
        "n_tiles_background": len(plan.tiles) - n_tissue,
        "n_tiles_reused": job.reused,
        "n_tiles_computed": job.computed,
        "tissue_fraction": info["tissue_fraction"],
        "n_nuclei": n_nuclei,
        "counts": counts,
        "classes": list(names),
        "coordinates": "level-0 pixels, pixel centres at integers (GeoJSON: QuPath convention, +0.5)",
        "timings_s": {
            "plan": round(info["plan_s"], 4),
            "tiles": round(tiles_s, 4),
            "write": round(time.perf_counter() - t0, 4),
            "total": round(time.perf_counter() - job.t_start, 4),
        },
        "outputs": {k: p.name for k, p in written.items()},
        "config_hash": job.key,
        "config": job.run_config,
    }
    write_summary(job.summary_file, summary)
    if not ctx.keep_tiles:
        job.store.clear()
    job.result.status = "done"
    job.result.outputs = {k: str(v) for k, v in written.items()}
    job.result.summary = summary


def _run_local(jobs: list[_Job], ctx: _Ctx) -> None:
    for job in jobs:
        job.t_start = time.perf_counter()
        try:
            info = compute_plan(*ctx.plan_args(job))
            if "error" in info:
                raise DenucError(info["error"])
            path = str(job.result.path)
            plan = info["plan"]
            geometry = dataclasses.replace(plan, tiles=[])

            def compute(t, _g=geometry, _p=path, _m=info["mpp"]):
                return compute_tile(_p, _g, t, ctx.factory) if t is not None else class_info(ctx.factory, _g.level_mpp)

            for t in _start(job, info, ctx):
                try:
                    arrays = compute(t)
                except DenucError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"tile {t.index} at level-{plan.level} ({t.x}, {t.y}): {type(exc).__name__}: {exc}") from exc
                _commit(job, t.index, arrays, ctx)
            _finish(job, ctx, compute)
        except Exception as exc:  # DenucError or anything a broken slide/tile raises; KeyboardInterrupt propagates
            log.debug("slide %s failed", job.result.path, exc_info=True)
            _fail(job, exc)
        finally:
            _forget_source(job.result.path)
            if job.bar is not None:
                job.bar.close()
                job.bar = None


def _run_dask(jobs: list[_Job], ctx: _Ctx, client, window: int) -> None:
    from distributed import as_completed

    meta = {}  # future key -> (kind, job, tile)
    futures = []
    for job in jobs:
        job.t_start = time.perf_counter()
        f = client.submit(compute_plan, *ctx.plan_args(job), pure=False)
        meta[f.key] = ("plan", job, None)
        futures.append(f)
    ac = as_completed(futures)
    queue: deque = deque()
    in_flight = 0
    geometries = {}

    def compute_here(job):
        g = geometries[id(job)]
        path = str(job.result.path)

        def compute(t):
            if t is None:
                return client.submit(class_info, ctx.factory, g.level_mpp, pure=False).result()
            return client.submit(compute_tile, path, g, t, ctx.factory, pure=False).result()

        return compute

    def top_up():
        nonlocal in_flight
        while queue and in_flight < window:
            job, t = queue.popleft()
            if job.result.status == "failed":
                continue
            f = client.submit(compute_tile, str(job.result.path), geometries[id(job)], t, ctx.factory, pure=False)
            meta[f.key] = ("tile", job, t)
            ac.add(f)
            in_flight += 1

    def finish(job):
        try:
            _finish(job, ctx, compute_here(job))
        except Exception as exc:
            _fail(job, exc)

    for fut in ac:
        kind, job, t = meta.pop(fut.key)
        if kind == "tile":
            in_flight -= 1
        try:
            if job.result.status == "failed":
                continue
            if kind == "plan":
                try:
                    info = fut.result()
                    if "error" in info:
                        raise DenucError(info["error"])
                except Exception as exc:
                    _fail(job, exc)
                    continue
                geometries[id(job)] = dataclasses.replace(info["plan"], tiles=[])
                pending = _start(job, info, ctx)
                if not pending:
                    finish(job)
                queue.extend((job, tt) for tt in pending)
            else:
                try:
                    arrays = fut.result()
                except Exception as exc:
                    plan = job.info["plan"]
                    _fail(job, RuntimeError(f"tile {t.index} at level-{plan.level} ({t.x}, {t.y}): {type(exc).__name__}: {exc}"))
                    continue
                _commit(job, t.index, arrays, ctx)
                if not job.remaining:
                    finish(job)
        finally:
            fut.release()
            top_up()
