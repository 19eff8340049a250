"""Speed and peak memory of the EfficientNet-Lite0 detector beside the bundled ShuffleNetV2 one.

2048 x 2048 RGB mosaic of real BRCA-M2C val tiles (``bench_detector.mosaic``) stated at 0.5 mpp,
through ``Detector.detect`` (the path the CLI and the widget take: windows, batch size from
``model.infer_batch``, NMS, threshold), 2 torch threads, one warm-up, then the median of
``--repeats`` timed calls. Each detector runs in its own fresh subprocess, so its peak RSS
(``ru_maxrss``, which includes loading the val tiles for the mosaic) is its own; the two run back
to back so they see the same machine load. Wall seconds depend on the neighbours on a shared
machine, so each record also carries the process CPU seconds per call and the load average.

By default the pair is measured twice: with OpenMP's default wait policy (what a user's process
gets) and with ``OMP_WAIT_POLICY=PASSIVE``. On a machine whose cores are taken by other jobs, the
default (spinning) policy makes 2 torch threads wait for each other at every parallel region: the
bundled detector took 3.1 s instead of 0.1 s on one 512 x 512 window under load 5.
``--malloc heap`` / ``mallopt`` keep large blocks on glibc's heap (see MALLOC_HEAP); ``--paired``
adds a run timing the detectors in turn in one process. Results: docs/benchmarks.md.

    python training/bench_detector_speed.py --json docs/results/bench_detector_speed.json
    python training/bench_detector_speed.py --paired --wait-policy passive --malloc default --malloc heap \
        --json docs/results/bench_detector_speed_malloc.json   # + both in turn in one process; malloc on the heap
    python training/bench_detector_speed.py --detector untrained:timm:efficientnet_lite0 --detector bundled

``untrained:NAME`` is a randomly initialised ``PointDetector(NAME)`` (the network's speed does not
depend on the weights); ``bundled`` the packaged detector; anything else a checkpoint path. A
random model scores almost nothing above a trained detector's threshold, which would leave out the
NMS that follows, so an untrained model's threshold is set to pass ``--candidates`` points before
NMS (default 7,000: about the bundled detector's 6,885 on this image, recorded as
``candidates_before_nms``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT = ["untrained:timm:efficientnet_lite0", "bundled"]
# glibc gives every allocation above its mmap threshold fresh pages and returns them on free: a
# network whose activations are tens of MB then pays page faults (the kernel zeroing pages) on
# every call. These keep such blocks on the heap for reuse.
MALLOC_HEAP = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "2000000000"}


def load(spec: str, image, candidates: int):
    """The detector named by ``spec``, warmed up on ``image``; and its number of points before NMS."""
    import numpy as np

    from napari_denuc.detection.checkpoint import Detector, bundled_detector_path, load_detector, sidecar_path
    from napari_denuc.detection.infer import detect_at_model_mpp
    from napari_denuc.detection.model import PointDetector

    if spec.startswith("untrained:"):
        bundled = json.loads(sidecar_path(bundled_detector_path()).read_text())
        det = Detector(PointDetector(spec.split(":", 1)[1]).eval(), nms_um=bundled["nms_um"], id=spec)  # the same NMS radius
    else:
        det = load_detector(None if spec == "bundled" else spec, device="cpu")
    # Warm-up on the full image (allocator and oneDNN caches at full size), before NMS.
    _, scores = detect_at_model_mpp(det.model, image, tau=0.0, window=WINDOW, batch_size=det.model.infer_batch)
    if spec.startswith("untrained:"):
        det.tau = float(np.sort(scores)[-min(candidates, len(scores))])
    return det, int((scores > det.tau).sum())


def heap_malloc():
    """MALLOC_HEAP from inside a running process, as a package could do it at import (glibc only)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    assert libc.mallopt(m_mmap_threshold, int(MALLOC_HEAP["MALLOC_MMAP_THRESHOLD_"])) == 1
    assert libc.mallopt(m_trim_threshold, int(MALLOC_HEAP["MALLOC_TRIM_THRESHOLD_"])) == 1


WINDOW = 1024  # infer.detect's default; --window changes it


def timed(det, image):
    w, c = time.perf_counter(), time.process_time()
    xy, _ = det.detect(image, 0.5, window=WINDOW)
    return time.perf_counter() - w, time.process_time() - c, len(xy)


def paired(specs: list, root: str, size: int, repeats: int, threads: int, candidates: int) -> dict:
    """All detectors in one process, timed in turn (A, B, A, B, ...): load changes hit both alike,
    so the per-round ratio of their times is steadier than two separate runs. RSS is not separate."""
    import torch

    from bench_detector import mosaic

    torch.set_num_threads(threads)
    image = mosaic(root, size)
    dets = [load(spec, image, candidates)[0] for spec in specs]
    load_before = os.getloadavg()
    rounds = [[timed(d, image)[:2] for d in dets] for _ in range(repeats)]
    wall = {spec: [r[i][0] for r in rounds] for i, spec in enumerate(specs)}
    cpu = {spec: [r[i][1] for r in rounds] for i, spec in enumerate(specs)}
    return {
        "paired": specs,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in wall.items()},
        "median_cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "median_ratio_first_to_last": round(statistics.median(r[0][0] / r[-1][0] for r in rounds), 3),
        "median_cpu_ratio_first_to_last": round(statistics.median(r[0][1] / r[-1][1] for r in rounds), 3),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def measure(spec: str, root: str, size: int, repeats: int, threads: int, candidates: int) -> dict:
    import torch

    from bench_detector import mosaic

    torch.set_num_threads(threads)
    image = mosaic(root, size)
    det, n_candidates = load(spec, image, candidates)
    load_before = os.getloadavg()
    wall, cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        w, c, n_points = timed(det, image)
        wall.append(w)
        cpu.append(c)
    return {
        "detector": spec,
        "id": det.id,
        "backbone": det.model.backbone_name,
        "image": f"{size}x{size} RGB at 0.5 mpp",
        "window": WINDOW,
        "torch_threads": torch.get_num_threads(),
        "infer_batch": getattr(det.model, "infer_batch", None),
        "repeats": repeats,
        "median_seconds": round(statistics.median(wall), 3),
        "min_seconds": round(min(wall), 3),
        "all_seconds": [round(t, 3) for t in wall],
        "median_cpu_seconds": round(statistics.median(cpu), 3),
        "minor_page_faults_per_call": round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats),
        "tau": round(det.tau, 4),
        "nms_um": det.nms_um,
        "candidates_before_nms": n_candidates,
        "n_points": int(n_points),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", action="append", help="untrained:NAME, bundled or a checkpoint (repeatable; default: Lite0 then bundled)")
    p.add_argument("--data", default="../shared/data/brca_m2c")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--candidates", type=int, default=7000, help="points before NMS for untrained models")
    p.add_argument("--wait-policy", action="append", choices=["default", "passive"],
                   help="OpenMP wait policy of the measuring process (repeatable; default: both)")
    p.add_argument("--malloc", action="append", choices=["default", "heap", "mallopt"],
                   help="glibc malloc of the measuring process (repeatable; default: default); heap = "
                        + " ".join(f"{k}={v}" for k, v in MALLOC_HEAP.items()) + "; mallopt = the same set by the process itself")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--paired", action="store_true", help="also time the detectors in turn in one process (steadier ratio)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this one detector in this process
    p.add_argument("--all", action="store_true", help=argparse.SUPPRESS)  # internal: the paired measurement in this process
    p.add_argument("--window", type=int, default=1024, help="detection window (px at the model's mpp)")
    a = p.parse_args()
    global WINDOW
    WINDOW = a.window
    specs = a.detector or DEFAULT
    if os.environ.get("BENCH_MALLOPT"):
        heap_malloc()
    if a.one:
        print(json.dumps(measure(a.one, a.data, a.size, a.repeats, a.threads, a.candidates)))
        return
    if a.all:
        print(json.dumps(paired(specs, a.data, a.size, a.repeats, a.threads, a.candidates)))
        return
    results = []
    for policy, malloc in [(p, m) for p in a.wait_policy or ["default", "passive"] for m in a.malloc or ["default"]]:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "BENCH_MALLOPT", *MALLOC_HEAP)}
        if policy == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        if malloc == "heap":
            env.update(MALLOC_HEAP)
        if malloc == "mallopt":
            env["BENCH_MALLOPT"] = "1"
        common = ["--data", a.data, "--size", str(a.size), "--repeats", str(a.repeats), "--threads", str(a.threads),
                  "--candidates", str(a.candidates), "--window", str(a.window)]
        jobs = [["--one", spec] for spec in specs]
        if a.paired:
            jobs.append(["--all", *(x for spec in specs for x in ("--detector", spec))])
        for job in jobs:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *job, *common], capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{' '.join(job)}: failed\n{r.stderr[-2000:]}")
            results.append({"omp_wait_policy": policy, "malloc": malloc, **json.loads(r.stdout.strip().splitlines()[-1])})
            print(json.dumps(results[-1]), flush=True)
    out = {"command": " ".join(["python", "training/bench_detector_speed.py", *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs (see loadavg)",
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "results": results}
    if a.json:
        from napari_denuc.io.atomic import atomic_write

        atomic_write(a.json, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
