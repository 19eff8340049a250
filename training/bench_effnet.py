"""Speed of the default encoder + head on a 1000 x 1000 tile at 0.5 mpp (issue 9 target: < 2 s warm, 2 cores).

    python training/bench_effnet.py [--encoder effnet-lite0] [--repeats 3]

The tile is a mosaic of real BRCA-M2C val tiles; points are the bundled detector's. Reports wall
time and process CPU time (user + system over all threads): on a shared machine the CPU time is
the steadier figure, and wall time on an idle 2-core machine is about CPU time / 2.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--encoder", default="effnet-lite0-nuclei")
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()

    from napari_denuc.data import load_dataset
    from napari_denuc.pipeline import Pipeline

    val = load_dataset("brca_m2c", a.root, "val")
    tile = np.zeros((1000, 1000, 3), np.uint8)
    for i in range(4):  # 2 x 2 real tiles of ~500 px
        im = val[i].image[:500, :500]
        tile[(i // 2) * 500:(i // 2) * 500 + im.shape[0], (i % 2) * 500:(i % 2) * 500 + im.shape[1]] = im
    pipe = Pipeline.from_defaults(encoder=a.encoder)
    xy, _ = pipe.detect(tile, 0.5)
    pipe.classify(tile, xy, 0.5)  # warm-up: the model loads once per process
    rows = []
    for _ in range(a.repeats):
        c, t = time.process_time(), time.perf_counter()
        pipe.classify(tile, xy, 0.5)
        rows.append({"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c})
    out = {"encoder": pipe.encoder.id, "nuclei": int(len(xy)), "best_wall_s": min(r["wall_s"] for r in rows),
           "best_cpu_s": min(r["cpu_s"] for r in rows), "runs": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
