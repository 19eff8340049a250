"""Executors: run the jobs' tasks in this process or on a Dask cluster."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

from ..errors import DenucError
from .jobs import Job, RunContext, commit, fail, finish, start
from .worker import class_info, compute_plan, compute_tile, forget_source

log = logging.getLogger("napari_denuc.wsi")


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


def run_local(jobs: list[Job], ctx: RunContext) -> None:
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

            for t in start(job, info, ctx):
                try:
                    arrays = compute(t)
                except DenucError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"tile {t.index} at level-{plan.level} ({t.x}, {t.y}): {type(exc).__name__}: {exc}") from exc
                commit(job, t.index, arrays, ctx)
            finish(job, ctx, compute)
        except Exception as exc:  # DenucError or anything a broken slide/tile raises; KeyboardInterrupt propagates
            log.debug("slide %s failed", job.result.path, exc_info=True)
            fail(job, exc)
        finally:
            forget_source(job.result.path)
            if job.bar is not None:
                job.bar.close()
                job.bar = None


def run_dask(jobs: list[Job], ctx: RunContext, client, window: int) -> None:
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

    def finish_job(job):
        try:
            finish(job, ctx, compute_here(job))
        except Exception as exc:
            fail(job, exc)

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
                    fail(job, exc)
                    continue
                geometries[id(job)] = dataclasses.replace(info["plan"], tiles=[])
                pending = start(job, info, ctx)
                if not pending:
                    finish_job(job)
                queue.extend((job, tt) for tt in pending)
            else:
                try:
                    arrays = fut.result()
                except Exception as exc:
                    plan = job.info["plan"]
                    fail(job, RuntimeError(f"tile {t.index} at level-{plan.level} ({t.x}, {t.y}): {type(exc).__name__}: {exc}"))
                    continue
                commit(job, t.index, arrays, ctx)
                if not job.remaining:
                    finish_job(job)
        finally:
            fut.release()
            top_up()
