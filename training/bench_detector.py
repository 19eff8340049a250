"""Detector speed and memory on a 2048 x 2048 RGB image (2 CPU threads), beside a classical LoG detector.

The test image is a mosaic of real BRCA-M2C tiles (so the detector sees real nuclei
density). Each measurement runs in a fresh subprocess so peak RSS belongs to it alone.

    python training/bench_detector.py [--detector CKPT] [--data ../shared/data/brca_m2c] [--size 2048]
    python training/bench_detector.py --detector untrained:shufflenet_v2_x0_5 --only denuc   # speed of any width
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def mosaic(root: str, size: int) -> np.ndarray:
    from napari_denuc.data import load_dataset

    tiles = [s.image[:464, :464] for s in load_dataset("brca_m2c", root, "val")]  # the smallest val tile is 465 px
    n = -(-size // 464)
    rows = [np.concatenate([tiles[(r * n + c) % len(tiles)] for c in range(n)], axis=1) for r in range(n)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])


def run_one(kind: str, detector: str | None, root: str, size: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    image = mosaic(root, size)
    if kind == "denuc":
        from napari_denuc.detection.checkpoint import Detector, load_detector
        from napari_denuc.detection.model import PointDetector

        if detector and detector.startswith("untrained:"):  # speed of a width before training it
            det = Detector(PointDetector(detector.split(":", 1)[1]).eval(), id=detector)
        else:
            det = load_detector(detector, device="cpu")
        det.detect(image[:512, :512], 0.5)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            xy, _ = det.detect(image, 0.5)
            times.append(time.perf_counter() - t)
        name = det.id
    else:
        from skimage.color import rgb2hed
        from skimage.feature import blob_log

        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            h = rgb2hed(image)[..., 0]
            h = (h - h.min()) / (h.max() - h.min() + 1e-9)
            xy = blob_log(h, min_sigma=3, max_sigma=6, num_sigma=4, threshold=0.08)[:, [1, 0]]  # best on val (eval_log_baseline.py)
            times.append(time.perf_counter() - t)
        name = "skimage blob_log on hematoxylin"
    best = min(times)
    return {
        "method": name,
        "image": f"{size}x{size} RGB",
        "seconds": round(best, 3),
        "megapixels_per_second": round(size * size / 1e6 / best, 2),
        "n_points": int(len(xy)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--detector")
    p.add_argument("--data", default="../shared/data/brca_m2c")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["denuc", "log"])
    a = p.parse_args()
    if a.only:
        print(json.dumps(run_one(a.only, a.detector, a.data, a.size, a.repeats)))
        return
    results = []
    for kind in ("denuc", "log"):
        cmd = [sys.executable, __file__, "--only", kind, "--data", a.data, "--size", str(a.size), "--repeats", str(a.repeats)]
        if a.detector:
            cmd += ["--detector", a.detector]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
