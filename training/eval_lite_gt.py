"""Lite encoder + linear head on BRCA-M2C with ground-truth points (classification only).

    python training/eval_lite_gt.py --root /work/shared/data/brca_m2c [--detector CKPT] [--no-neck]

Trains the head on the train split, reports macro F1 (over the 3 classes) on the val split,
and the encode time per image. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def macro_f1(y, p, k):
    f1s = []
    for c in range(k):
        tp = np.sum((y == c) & (p == c))
        fp = np.sum((y != c) & (p == c))
        fn = np.sum((y == c) & (p != c))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s)), [float(f) for f in f1s]


def main(argv=None):
    import torch

    from napari_denuc.data import load_dataset
    from napari_denuc.encoders import get_encoder
    from napari_denuc.head import LinearHead

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/work/shared/data/brca_m2c")
    ap.add_argument("--detector", default=None, help="detector checkpoint or 'bundled' (default: random shufflenet_v2_x0_5)")
    ap.add_argument("--no-neck", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-decay", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--class-weight", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    det = None
    if not args.no_neck:
        if args.detector:
            from napari_denuc.detection.checkpoint import load_detector

            det = load_detector(None if args.detector == "bundled" else args.detector)
        else:
            from napari_denuc.detection.model import PointDetector

            torch.manual_seed(0)
            det = PointDetector("shufflenet_v2_x0_5")
    enc = get_encoder("lite", detector=det)
    feats, times = {}, []
    for split in ("train", "val"):
        fs, ys = [], []
        for s in load_dataset("brca_m2c", args.root, split):
            t = time.perf_counter()
            fs.append(enc.features_at(s.image, s.points, s.mpp))
            times.append(time.perf_counter() - t)
            ys.append(s.labels)
        feats[split] = (np.concatenate(fs), np.concatenate(ys))
    k = 3
    results = []
    for wd in args.weight_decay:
        head = LinearHead(enc.feature_dim, ("lymphocyte", "tumor", "stromal"), encoder_id=enc.id)
        t = time.perf_counter()
        head.fit(*feats["train"], weight_decay=wd, class_weight=args.class_weight)
        fit_s = time.perf_counter() - t
        xv, yv = feats["val"]
        mf1, per = macro_f1(yv, head.predict(xv), k)
        results.append({"weight_decay": wd, "macro_f1": round(mf1, 4), "per_class_f1": [round(f, 4) for f in per], "fit_s": round(fit_s, 2)})
    print(json.dumps({
        "encoder": enc.id, "feature_dim": enc.feature_dim, "n_train": len(feats["train"][1]), "n_val": len(feats["val"][1]),
        "encode_s_per_image_median": round(float(np.median(times)), 3), "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
