"""Speed and peak memory of the EfficientNet-Lite0 detector beside the bundled ShuffleNetV2 one.

2048 x 2048 RGB mosaic of real BRCA-M2C val tiles (``bench_detector.mosaic``) stated at 0.5 mpp,
through ``Detector.detect`` (the path the CLI and the widget take: windows, batch size from
``model.infer_batch``, NMS, threshold), 2 torch threads, one warm-up, then the median of
``--repeats`` timed calls. Each detector runs in its own fresh subprocess, so its peak RSS
(``ru_maxrss``, which includes loading the val tiles for the mosaic) is its own; the two run back
to back so they see the same machine load. Wall seconds depend on the neighbours on a shared
machine, so each record also carries the process CPU seconds per call and the load average.

Each pair is measured twice: with OpenMP's default wait policy (what a user's process gets) and
with ``OMP_WAIT_POLICY=PASSIVE``. On a machine whose cores are taken by other jobs, the default
(spinning) policy makes 2 torch threads wait for each other at every parallel region: the bundled
detector took 3.1 s instead of 0.08 s on one 512 x 512 window with two other training processes
running. Passive waiting is close to what the same detector does on a quiet machine.

    python training/bench_detector_speed.py --json docs/results/bench_detector_speed.json
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


def measure(spec: str, root: str, size: int, repeats: int, threads: int, candidates: int) -> dict:
    import numpy as np
    import torch

    from bench_detector import mosaic
    from napari_denuc.detection.checkpoint import Detector, bundled_detector_path, load_detector, sidecar_path
    from napari_denuc.detection.infer import detect_at_model_mpp
    from napari_denuc.detection.model import PointDetector

    torch.set_num_threads(threads)
    image = mosaic(root, size)
    if spec.startswith("untrained:"):
        bundled = json.loads(sidecar_path(bundled_detector_path()).read_text())
        det = Detector(PointDetector(spec.split(":", 1)[1]).eval(), nms_um=bundled["nms_um"], id=spec)  # the same NMS radius
    else:
        det = load_detector(None if spec == "bundled" else spec, device="cpu")
    # Warm-up on the full image (allocator and oneDNN caches at full size), before NMS.
    _, scores = detect_at_model_mpp(det.model, image, tau=0.0, batch_size=det.model.infer_batch)
    if spec.startswith("untrained:"):
        det.tau = float(np.sort(scores)[-min(candidates, len(scores))])
    n_candidates = int((scores > det.tau).sum())
    load_before = os.getloadavg()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        xy, _ = det.detect(image, 0.5)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {
        "detector": spec,
        "id": det.id,
        "backbone": det.model.backbone_name,
        "image": f"{size}x{size} RGB at 0.5 mpp",
        "torch_threads": torch.get_num_threads(),
        "infer_batch": getattr(det.model, "infer_batch", None),
        "repeats": repeats,
        "median_seconds": round(statistics.median(wall), 3),
        "min_seconds": round(min(wall), 3),
        "all_seconds": [round(t, 3) for t in wall],
        "median_cpu_seconds": round(statistics.median(cpu), 3),
        "tau": round(det.tau, 4),
        "nms_um": det.nms_um,
        "candidates_before_nms": n_candidates,
        "n_points": int(len(xy)),
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
    p.add_argument("--json", help="write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this one detector in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.data, a.size, a.repeats, a.threads, a.candidates)))
        return
    results = []
    for policy in a.wait_policy or ["default", "passive"]:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        for spec in a.detector or DEFAULT:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", spec, "--data", a.data, "--size", str(a.size),
                   "--repeats", str(a.repeats), "--threads", str(a.threads), "--candidates", str(a.candidates)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{spec}: failed\n{r.stderr[-2000:]}")
            results.append({"omp_wait_policy": policy, **json.loads(r.stdout.strip().splitlines()[-1])})
            print(json.dumps(results[-1]), flush=True)
    out = {"command": " ".join(["python", "training/bench_detector_speed.py", *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs (see loadavg)",
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "results": results}
    if a.json:
        from napari_denuc.io.atomic import atomic_write

        atomic_write(a.json, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
