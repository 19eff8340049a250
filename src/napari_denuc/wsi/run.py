"""Resumable whole-slide batch prediction, in one process or as Dask tasks.

``predict_slides(inputs, out_dir, factory, ...)`` is what ``denuc-predict`` calls. For every
input it opens the slide, computes a cheap tissue mask on a low-resolution level, plans tiles
at the level nearest the model's mpp, runs ``process_tile`` on every tissue tile (reading the
tile with its overlap through ``read_region``, never a whole level), keeps the detections each
tile owns, commits them to ``OUT/.<stem>.tiles/`` as each tile finishes, and at the end merges
them into ``<stem>.geojson[.gz]``, ``<stem>.csv``, ``<stem>.parquet`` and
``<stem>.summary.json`` (written last: its presence with the same config hash means "done").

The model is not passed as an object but as a picklable *factory* (``wsi/factory.py``).

The package is split by concern: ``factory.py`` (the pipeline factory), ``worker.py`` (per-worker
state: threads, malloc, open slides; and the tasks that run on workers), ``jobs.py`` (per-slide
bookkeeping: commit, failure, merge and writes), ``executors.py`` (local and Dask), and this
module, the entry point.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from ..errors import DenucError
from .executors import make_client, run_dask, run_local
from .factory import DEFAULT_TARGET_MPP, PipelineFactory, factory_config, resolve_target_mpp
from .jobs import BatchResult, Job, RunContext, SlideResult, bar, other_input, slide_identity, unique_stems, up_to_date
from .outputs import FORMATS, output_paths, read_summary, summary_path
from .slides import expand_inputs
from .store import config_hash
from .tiling import MaskParams, check_tiling
from .worker import class_info, compute_plan, compute_tile, relax_malloc_trim, set_threads

RUN_VERSION = 1

__all__ = [
    "DEFAULT_TARGET_MPP",
    "BatchResult",
    "PipelineFactory",
    "SlideResult",
    "class_info",
    "compute_plan",
    "compute_tile",
    "make_client",
    "predict_slides",
    "relax_malloc_trim",
    "set_threads",
]


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
    check_tiling(tile_size, overlap)  # before any model is loaded, not once per slide
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
            target_mpp = client.submit(resolve_target_mpp, factory, pure=False).result() if client else resolve_target_mpp(factory)
        target_mpp = float(target_mpp)
        fconf = factory_config(factory)

        jobs: list[Job] = []
        for (path, slide_mpp), stem in zip(items, unique_stems([p for p, _ in items])):
            run_config = {
                "version": RUN_VERSION,
                "factory": fconf,
                "slide": slide_identity(Path(path)),
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
                Job(
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
            held = None if overwrite else other_input(job)
            if held:
                job.result.status = "failed"
                job.result.error = (
                    f"{out_dir / job.result.stem}.* hold the results of {held}, another file of the same name; "
                    "write these to another --out folder, or pass --overwrite to replace them"
                )
            elif not overwrite and up_to_date(job):
                job.result.status = "up-to-date"
                job.result.summary = read_summary(job.summary_file)
                job.result.outputs = {k: str(out_dir / v) for k, v in job.result.summary["outputs"].items()}
            else:
                todo.append(job)

        overall = bar(progress, total=0, desc="tiles (all slides)", unit="tile", position=0, dynamic_ncols=True)
        ctx = RunContext(
            out_dir,
            factory,
            target_mpp,
            tile_size,
            overlap,
            tissue,
            mask_params,
            resume,
            keep_tiles,
            gzip,
            progress,
            on_tile,
            overall,
            geojson_per_class=geojson_per_class,
        )
        if client is None:
            run_local(todo, ctx)
        else:
            window = tiles_in_flight or max(2, 2 * sum(client.nthreads().values()))
            run_dask(todo, ctx, client, window)
        if overall is not None:
            overall.close()
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
    return BatchResult([j.result for j in jobs], time.perf_counter() - t_all)
