"""Benchmark: peak memory and time of ``wsi.slide_features`` with the ``lite`` encoder on two slide windows.

The slide and the 2,000 points are those of ``bench_slide_training.py --spread local`` (run it
once first: it writes them to ``--dir``). The features are read three times in one process,
after a warm-up window; each call reports its wall, user and system seconds, minor page faults
and the process's peak RSS growth over the warm state. The switches take back one change each:

    python training/bench_slide_memory.py                      # as shipped
    python training/bench_slide_memory.py --map-mb 1024         # blocks from the heap (no mapping)
    python training/bench_slide_memory.py --no-strips           # the detector's whole-window pass
    THP_MEM_ALLOC_ENABLE=1 python training/bench_slide_memory.py  # torch on huge pages (as denuc-train sets)

``--check FILE`` saves the features (``.npy``) or, when FILE exists, asserts they are equal to it.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_slide_training import status_mb  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/bench_slide_training")
    ap.add_argument("--map-mb", type=float, help="blocks of this size and more are mapped while windows are encoded")
    ap.add_argument("--no-strips", action="store_true")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--check")
    args = ap.parse_args()
    d = Path(args.dir)
    feats = json.loads((d / "points.geojson").read_text())["features"]
    xy = np.array([f["geometry"]["coordinates"] for f in feats]) - 0.5  # QuPath's pixel centres

    from napari_denuc.encoders.lite import bundled_neck
    from napari_denuc.detection.model import PointDetector
    from napari_denuc.encoders.lite import LiteEncoder
    from napari_denuc.wsi import slide_features as sf

    if args.map_mb:
        sf.MAP_LARGE_BLOCKS = int(args.map_mb * (1 << 20))
    if args.no_strips:
        PointDetector.neck_features_rgb = lambda self, rgb, strip_pixels=0: self.neck_features(self.normalize(rgb))
    enc = LiteEncoder(bundled_neck())
    slide = d / "slide8k.tif"
    sf.slide_features(enc, slide, np.array([[100.0, 100.0], [140.0, 100.0]]))  # warm-up: the corner window
    base = status_mb()
    for i in range(args.calls):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        f = sf.slide_features(enc, slide, xy)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"call": i, "wall_s": round(time.perf_counter() - t0, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
                          "sys_s": round(r1.ru_stime - r0.ru_stime, 2), "minor_faults": r1.ru_minflt - r0.ru_minflt,
                          "peak_growth_mb": round(status_mb("VmHWM") - base)}), flush=True)
    if args.check:
        p = Path(args.check)
        if p.is_file():
            assert np.array_equal(np.load(p), f), "features differ"
            print("features equal to", p)
        else:
            np.save(p, f)


if __name__ == "__main__":
    main()
