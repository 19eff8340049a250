"""The offline classification path on 2 CPU threads.

    python training/bench_lite.py [--data ../shared/data/brca_m2c] [--points 20000]

1. Encode and classify one 1000 x 1000 image with ``lite`` + the bundled head at its detected
   nuclei (a mosaic of BRCA-M2C val tiles; detection is timed apart).
2. Retrain the head on ``--points`` cached feature vectors (real lite features from the train
   split, repeated when fewer).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/brca_m2c")
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    from napari_denuc.data import load_dataset
    from napari_denuc.head import LinearHead
    from napari_denuc.pipeline import Pipeline

    torch.set_num_threads(a.threads)
    pipe = Pipeline.from_defaults(encoder="lite")
    val = load_dataset("brca_m2c", a.data, "val")
    tiles = [s.image[:464, :464] for s in val[:9]]  # the smallest val tile is 465 px
    image = np.concatenate([np.concatenate(tiles[r * 3 : r * 3 + 3], 1) for r in range(3)], 0)[:1000, :1000]
    pipe.run(image[:300, :300], 0.5)  # warm-up
    t = time.perf_counter()
    xy, _ = pipe.detect(image, 0.5)
    t_detect = time.perf_counter() - t
    t = time.perf_counter()
    cls, probs, _ = pipe.classify(image, xy, 0.5)
    t_classify = time.perf_counter() - t

    train = load_dataset("brca_m2c", a.data, "train")[:12]
    feats = np.concatenate([pipe.features_at(s.image, s.points, s.mpp) for s in train])
    labels = np.concatenate([s.labels for s in train])
    reps = -(-a.points // len(feats))
    x, y = np.tile(feats, (reps, 1))[: a.points], np.tile(labels, reps)[: a.points]
    head = LinearHead(x.shape[1], pipe.class_names, encoder_id=pipe.encoder.id)
    t = time.perf_counter()
    head.fit(x, y, class_weight="balanced", weight_decay=0.03)
    t_fit = time.perf_counter() - t
    print(json.dumps({
        "image": "1000x1000 RGB, 0.5 mpp", "nuclei": int(len(xy)), "feature_dim": pipe.encoder.feature_dim,
        "detect_s": round(t_detect, 3), "encode_and_classify_s": round(t_classify, 3),
        "head_fit_points": int(len(y)), "head_fit_s": round(t_fit, 3), "torch_threads": a.threads,
    }, indent=2))


if __name__ == "__main__":
    main()
