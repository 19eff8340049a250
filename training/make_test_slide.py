"""Write a synthetic H&E-like pyramidal TIFF (tiled, SubIFD pyramid, mpp in the resolution tags).

    python training/make_test_slide.py slide.tif --size 8192 --mpp 0.5 --seed 0

Also writes ``<slide>.nuclei.csv`` with the true nucleus centres (x, y in level-0 pixels)
unless ``--no-truth``. Readable by tiffslide (``tiffslide.mpp-x``), OpenSlide and QuPath.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from napari_denuc.wsi.synthetic import make_test_slide


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--size", type=int, nargs="+", default=[1024], help="width [height] of level 0 in pixels")
    ap.add_argument("--mpp", type=float, default=0.5, help="micrometres per pixel; 0 writes no resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--no-truth", action="store_true")
    a = ap.parse_args(argv)
    size = a.size[0] if len(a.size) == 1 else (a.size[0], a.size[1])
    nuclei = make_test_slide(a.path, size, mpp=a.mpp or None, seed=a.seed, tile=a.tile)
    if not a.no_truth:
        np.savetxt(a.path.with_name(a.path.name + ".nuclei.csv"), nuclei, fmt="%.1f", delimiter=",", header="x,y", comments="")
    print(f"{a.path}: {size} px, mpp {a.mpp or 'none'}, {len(nuclei)} nuclei")
    return 0


if __name__ == "__main__":
    sys.exit(main())
