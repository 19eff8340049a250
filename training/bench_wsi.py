"""Whole-slide benchmark: throughput, peak memory, 1 vs N Dask workers, resume overhead. Prints JSON.

    python training/bench_wsi.py                      # real default pipeline (encoder "lite"), 8192x8192 slide
    python training/bench_wsi.py --fake --size 2048   # cheap blob detector, to check the machinery

The slide is generated (synthetic H&E-like pyramidal TIFF) unless --slide names an existing one.
Measured:
- ``single``: one process, megapixels (level 0) per second end to end (mask, tiles, merge, writes);
- ``memory``: peak RSS of this process (ru_maxrss), of waited-for children (ru_maxrss), and the
  peak of this process plus all its live children sampled every 0.2 s (psutil, when installed);
- ``dask``: the same slide on a LocalCluster with 1 worker and with --workers workers
  (threads_per_worker=1), cluster start-up excluded; ``speedup`` = t(1 worker) / t(N workers);
- ``resume``: a run interrupted after half of the tissue tiles, then restarted;
  ``restart_over_full`` = t(restart) / t(full run) (ideal: about 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def _load_pipeline(factory):
    factory()  # builds and caches this worker's pipeline
    return True


class _Interrupt(KeyboardInterrupt):
    pass


class PeakSampler:
    """Peak RSS of this process plus its children, sampled in a thread (needs psutil)."""

    def __init__(self, interval=0.2):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil, self.interval, self.peak = psutil, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            total = 0
            try:
                for p in [me] + me.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except self.psutil.Error:
                        pass
            except self.psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.psutil is not None:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.psutil is not None:
            self._t.join()


def make_factory(a):
    if a.fake:
        from napari_denuc.wsi.synthetic import BlobFactory

        return BlobFactory(delay=a.fake_delay)
    from napari_denuc.wsi import PipelineFactory

    return PipelineFactory(detector=a.detector, encoder=a.encoder, head=a.head, device=a.device, batch_size=a.batch_size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, help="an existing slide (default: generate one)")
    ap.add_argument("--size", type=int, default=8192, help="side of the generated slide, pixels")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--fake", action="store_true", help="blob detector instead of the real pipeline")
    ap.add_argument("--fake-delay", type=float, default=0.0, help="seconds per tile for --fake")
    ap.add_argument("--detector"), ap.add_argument("--encoder", default="lite"), ap.add_argument("--head")
    ap.add_argument("--device", default="cpu"), ap.add_argument("--batch-size", type=int)
    ap.add_argument("--tile-size", type=int, default=1024), ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    a = ap.parse_args(argv)

    from napari_denuc.wsi import make_client, predict_slides
    from napari_denuc.wsi.synthetic import make_test_slide

    work = a.workdir or Path(tempfile.mkdtemp(prefix="denuc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"fake": a.fake, "tile_size": a.tile_size, "overlap": a.overlap}
    try:
        slide = a.slide
        if slide is None:
            slide = work / f"synthetic_{a.size}.tif"
            if not slide.is_file():
                t0 = time.perf_counter()
                make_test_slide(slide, a.size, mpp=a.mpp, seed=0)
                report["generate_s"] = round(time.perf_counter() - t0, 2)
        factory = make_factory(a)
        kw = dict(tile_size=a.tile_size, overlap=a.overlap, progress=False, overwrite=True, resume=False)
        if a.slide is not None:
            kw["mpp"] = a.mpp

        # warm up (imports, model load) on a tiny slide, so the timings are the steady state
        tiny = work / "warmup.tif"
        make_test_slide(tiny, 512, mpp=a.mpp, seed=1)
        predict_slides([tiny], work / "warmup", factory, **kw)

        with PeakSampler() as sampler:
            t0 = time.perf_counter()
            r = predict_slides([slide], work / "single", factory, **kw)
            t_full = time.perf_counter() - t0
        if not r.ok:
            print(json.dumps({"error": r.slides[0].error}))
            return 1
        s = r.slides[0].summary
        w, h = s["dimensions"]
        mpx = w * h / 1e6
        report["slide"] = {"path": str(slide), "dimensions": [w, h], "megapixels": round(mpx, 2), "mpp": s["mpp"]}
        report["single"] = {
            "seconds": round(t_full, 3),
            "megapixels_per_s": round(mpx / t_full, 3),
            "tissue_megapixels_per_s": round(mpx * s["n_tiles_tissue"] / max(1, s["n_tiles"]) / t_full, 3),
            "n_tiles": s["n_tiles"],
            "n_tiles_tissue": s["n_tiles_tissue"],
            "n_tiles_background": s["n_tiles_background"],
            "n_nuclei": s["n_nuclei"],
            "timings_s": s["timings_s"],
        }
        self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report["memory"] = {"self_peak_mb": round(self_mb, 1), "sampled_peak_self_plus_children_mb": round(sampler.peak / 2**20, 1) if sampler.psutil else None}

        if not a.no_dask:
            dask = {}
            for n in sorted({1, a.workers}):
                t0 = time.perf_counter()
                client, cluster = make_client(None, n)
                start = time.perf_counter() - t0
                try:
                    client.run(_load_pipeline, factory)  # every worker loads the model before the clock starts
                    with PeakSampler() as sp:
                        t0 = time.perf_counter()
                        rr = predict_slides([slide], work / f"dask{n}", factory, client=client, **kw)
                        t = time.perf_counter() - t0
                finally:
                    client.close()
                    cluster.close()
                same = rr.ok and rr.slides[0].summary["n_nuclei"] == s["n_nuclei"]
                dask[f"{n}_workers"] = {
                    "seconds": round(t, 3),
                    "megapixels_per_s": round(mpx / t, 3),
                    "cluster_start_s": round(start, 2),
                    "same_nuclei_as_single": same,
                    "sampled_peak_mb": round(sp.peak / 2**20, 1) if sp.psutil else None,
                }
            if a.workers != 1:
                dask["speedup"] = round(dask["1_workers"]["seconds"] / dask[f"{a.workers}_workers"]["seconds"], 3)
            report["dask"] = dask

        if not a.no_resume:
            half = max(1, s["n_tiles_tissue"] // 2)

            def stop(stem, index, count):
                if count >= half:
                    raise _Interrupt

            out = work / "resume"
            rkw = dict(kw, resume=True)
            t0 = time.perf_counter()
            try:
                predict_slides([slide], out, factory, on_tile=stop, **rkw)
            except _Interrupt:
                pass
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            rr = predict_slides([slide], out, factory, **rkw)
            t_restart = time.perf_counter() - t0
            report["resume"] = {
                "interrupted_after_tiles": half,
                "first_part_s": round(t_first, 3),
                "restart_s": round(t_restart, 3),
                "restart_over_full": round(t_restart / t_full, 3),
                "total_over_full": round((t_first + t_restart) / t_full, 3),
                "tiles_reused": rr.slides[0].summary["n_tiles_reused"],
                "same_nuclei_as_single": rr.ok and rr.slides[0].summary["n_nuclei"] == s["n_nuclei"],
            }
        report["memory"]["children_peak_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
