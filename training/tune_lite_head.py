"""Choose the lite head's training options on BRCA-M2C val (end-to-end f_avg), features computed once.

    python training/tune_lite_head.py --root ../shared/data/brca_m2c [--detector CKPT] [--json OUT]

Grid: class weighting x background class x weight decay x detector threshold. Prints one JSON
row per setting and the best. Superseded: the shipped heads are now chosen by leave-one-site-out (training/loso_heads.py).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--detector")
    ap.add_argument("--json")
    a = ap.parse_args()

    from napari_denuc.data import load_dataset
    from napari_denuc.head import LinearHead
    from napari_denuc.head_training import collect_features
    from napari_denuc.metrics import PointScorer
    from napari_denuc.pipeline import Pipeline

    pipe = Pipeline.from_defaults(a.detector, "lite", None)
    pipe.head = None
    train = load_dataset("brca_m2c", a.root, "train")
    val = load_dataset("brca_m2c", a.root, "val")
    names = train[0].class_names
    x, y = collect_features(pipe, train, background=True)
    # Val: raw detections at a low threshold, so each tau can be applied afterwards.
    val_det = []
    for s in val:
        xy, sc = pipe.detect(s.image, s.mpp, tau=0.2)
        val_det.append((xy, sc, pipe.features_at(s.image, xy, s.mpp), pipe.features_at(s.image, s.points, s.mpp)))
    k = len(names)
    rows = []
    for weighting, background, wd in itertools.product([None, "balanced"], [False, True], [1e-3, 1e-2, 3e-2]):
        keep = np.ones(len(y), bool) if background else y < k
        head = LinearHead(x.shape[1], names, background=background)
        head.fit(x[keep], y[keep], class_weight=weighting, weight_decay=wd)
        gt_scorer = PointScorer(names)
        for s, (_, _, _, fgt) in zip(val, val_det):
            p = head.predict_proba(fgt)
            gt_scorer.add(s.points, s.points, 6.0, p.max(1), p.argmax(1), s.labels)
        for tau in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55):
            scorer = PointScorer(names)
            for s, (xy, sc, f, _) in zip(val, val_det):
                m = sc > tau
                p = head.predict_proba(f[m])
                real = head.background_proba(f[m]) < 0.5
                scorer.add(xy[m][real], s.points, 6.0, sc[m][real], p.argmax(1)[real], s.labels)
            r = scorer.result()
            rows.append({"class_weight": weighting, "background": background, "weight_decay": wd, "tau": tau,
                         "f_avg": round(r["f_avg"], 4), "det_f1": round(r["detection"]["f1"], 4),
                         "gt_points_f_avg": round(gt_scorer.result()["f_avg"], 4),
                         "per_class": {n: round(c["f1"], 4) for n, c in r["classes"].items()}})
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["f_avg"])
    print("BEST", json.dumps(best))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
