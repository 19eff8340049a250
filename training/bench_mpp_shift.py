"""Detection F1 when the user states a wrong resolution (issue 10: scale jitter for other scanners).

Every MoNuSeg-subset tile is detected as if its mpp were ``factor`` x the true one (the image is
then resampled by the wrong factor), and scored at 3 um of the *true* scale.

    python training/bench_mpp_shift.py DETECTOR [DETECTOR ...] [--root ../shared/data/monuseg_subset]
"""

from __future__ import annotations

import argparse

FACTORS = (0.8, 0.87, 1.0, 1.15, 1.25)


def main():
    from napari_denuc.data import load_dataset
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.metrics import PointScorer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("detectors", nargs="+")
    ap.add_argument("--root", default="../shared/data/monuseg_subset")
    a = ap.parse_args()
    samples = load_dataset("folder", a.root, "all")
    print("| detector | tau | " + " | ".join(f"mpp x {f}" for f in FACTORS) + " |")
    for path in a.detectors:
        det = load_detector(path)
        cells = []
        for f in FACTORS:
            scorer = PointScorer()
            for s in samples:
                xy, scores = det.detect(s.image, s.mpp * f)
                scorer.add(xy, s.points, 3.0 / s.mpp, scores)
            cells.append(f"{scorer.result()['detection']['f1']:.3f}")
        print(f"| {path} | {det.tau} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
