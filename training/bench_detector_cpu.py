"""CPU seconds (not wall) of one detection on a 2048 x 2048 mosaic, one torch thread, per detector.

On a machine shared with other jobs, wall time says more about the neighbours than about the
model; process CPU time on one thread (no OpenMP spinning) is a fair relative measure. Ratios
against the shipped detector, times its quiet-machine wall time (docs/benchmarks.md), estimate
the quiet wall time of a new backbone.

    python training/bench_detector_cpu.py src/napari_denuc/weights/detector.safetensors untrained:timm:efficientnet_lite0
"""

import json
import resource
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_detector import mosaic


def main():
    from napari_denuc.detection.checkpoint import Detector, load_detector
    from napari_denuc.detection.model import PointDetector

    torch.set_num_threads(1)
    image = mosaic("../shared/data/brca_m2c" if len(sys.argv) < 2 or "--data" not in sys.argv else sys.argv[sys.argv.index("--data") + 1], 2048)
    for spec in [a for a in sys.argv[1:] if not a.startswith("--") and "brca_m2c" not in a]:
        det = Detector(PointDetector(spec.split(":", 1)[1]).eval(), id=spec) if spec.startswith("untrained:") else load_detector(spec, device="cpu")
        det.detect(image[:512, :512], 0.5)
        best = min(_cpu(det, image) for _ in range(2))
        print(json.dumps({"detector": spec, "cpu_seconds_1_thread": round(best, 2),
                          "peak_rss_mb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)


def _cpu(det, image):
    t = time.process_time()
    det.detect(image, 0.5)
    return time.process_time() - t


if __name__ == "__main__":
    main()
