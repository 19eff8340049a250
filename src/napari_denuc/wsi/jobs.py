"""Job bookkeeping for one slide: plan, tile commits, failure, and the final merge and writes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DenucError
from .outputs import read_summary, write_outputs, write_summary
from .store import TileStore
from .tiling import MaskParams, Tile, TilePlan

log = logging.getLogger("napari_denuc.wsi")


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
class Job:
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


def unique_stems(paths) -> list[str]:
    stems, seen = [], {}
    for p in paths:
        s = Path(p).stem
        n = seen.get(s, 0)
        seen[s] = n + 1
        stems.append(s if n == 0 else f"{s}-{n + 1}")
    return stems


def slide_identity(path: Path) -> dict:
    try:
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(path)}


def bar(progress, **kw):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kw)


def other_input(job: Job) -> str | None:
    """The input whose finished results ``job``'s outputs would replace, when that is another file.

    Outputs are named by the input's stem, so ``hospA/1.svs`` and, in a later run into the same
    folder, ``hospB/1.svs`` share ``1.geojson``: the second must not silently replace the first.
    """
    s = read_summary(job.summary_file) or {}
    held = ((s.get("config") or {}).get("slide") or {}).get("path")
    return held if held and held != job.run_config["slide"].get("path") else None


def up_to_date(job: Job) -> bool:
    s = read_summary(job.summary_file)
    if not s or s.get("config_hash") != job.key or not all(p.is_file() for p in job.paths.values()):
        return False
    outputs = s.get("outputs")
    return isinstance(outputs, dict) and all((job.summary_file.parent / n).is_file() for n in outputs.values())


@dataclass
class RunContext:
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

    def plan_args(self, job: Job):
        return (
            str(job.result.path),
            job.mpp,
            job.fallback_mpp,
            self.target_mpp,
            self.tile_size,
            self.overlap,
            self.tissue,
            self.mask_params,
        )


def fail(job: Job, exc: BaseException) -> None:
    job.result.status = "failed"
    msg = str(exc) if isinstance(exc, DenucError) else f"{type(exc).__name__}: {exc}"
    job.result.error = msg.splitlines()[0] if msg else type(exc).__name__
    if str(job.result.path) not in job.result.error:
        job.result.error = f"{job.result.path}: {job.result.error}"
    log.info("failed: %s", job.result.error)
    if job.bar is not None:
        job.bar.close()
        job.bar = None


def start(job: Job, info: dict, ctx: RunContext) -> list[Tile]:
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
    job.bar = bar(
        ctx.progress,
        total=len(tissue),
        initial=job.reused,
        desc=job.result.stem[:30],
        unit="tile",
        position=1,
        leave=False,
        dynamic_ncols=True,
    )
    job.t_tiles = time.perf_counter()
    return pending


def commit(job: Job, tile_index: int, arrays: dict, ctx: RunContext) -> None:
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


def tile_chunks(job: Job, compute):
    """A callable returning a fresh iterator over the slide's tissue tiles as Detections."""
    plan: TilePlan = job.info["plan"]
    indices = [t.index for t in plan.tiles if t.tissue]
    by_index = {t.index: t for t in plan.tiles}
    return lambda: job.store.iter_detections(indices, lambda i: compute(by_index[i] if i is not None else None))


def count(chunks) -> tuple[int, dict, tuple]:
    counts, names, n = None, (), 0
    for det in chunks():
        if counts is None:
            names, counts = det.class_names, np.zeros(len(det.class_names), np.int64)
        counts += np.bincount(det.class_ids, minlength=len(names))[: len(names)]
        n += len(det)
    return n, {name: int(c) for name, c in zip(names, counts if counts is not None else [])}, names


def finish(job: Job, ctx: RunContext, compute) -> None:
    t0 = time.perf_counter()
    tiles_s = t0 - job.t_tiles
    if job.bar is not None:
        job.bar.close()
        job.bar = None
    chunks = tile_chunks(job, compute)
    n_nuclei, counts, names = count(chunks)  # also recomputes vanished tiles before any file is written
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
