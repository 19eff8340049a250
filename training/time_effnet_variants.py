"""CPU time of the EfficientNet-Lite variants' point features alone (no filter bank, no head).

    python training/time_effnet_variants.py [--variant lite0 --variant lite2] [--root ../shared/data/brca_m2c]

One torch thread, first val tile at its ground-truth points, warm, mean of 3 runs. Process CPU
time, the figure that holds on a busy machine.
"""

from __future__ import annotations

import argparse
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append")
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    a = ap.parse_args()

    import torch

    from napari_denuc.data import load_dataset
    from napari_denuc.encoders.effnet import EffNetEncoder

    torch.set_num_threads(1)
    s = load_dataset("brca_m2c", a.root, "val")[0]
    for variant in a.variant or ["lite0", "lite1", "lite2"]:
        enc = EffNetEncoder(variant, mpp=0.5)
        enc.features_at(s.image, s.points, s.mpp)
        t = time.process_time()
        for _ in range(3):
            enc.features_at(s.image, s.points, s.mpp)
        print(f"{variant}: {(time.process_time() - t) / 3:.3f} CPU-s per {s.image.shape[1]} x {s.image.shape[0]} tile, {len(s.points)} points")


if __name__ == "__main__":
    main()
