"""The Macenko reference of napari_denuc.stain (MACENKO_TARGET): the median over the BRCA-M2C
train+val tiles of each tile's own stain vectors and 99th-percentile concentrations.

    python training/macenko_reference.py [--root ../shared/data/brca_m2c]
"""

from __future__ import annotations

import argparse

import numpy as np


def main():
    from napari_denuc.data import load_dataset
    from napari_denuc.stain import macenko_stains

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    root = ap.parse_args().root
    stains = [macenko_stains(s.image) for split in ("train", "val") for s in load_dataset("brca_m2c", root, split)]
    stains = [s for s in stains if s is not None]
    he = np.median([s[0] for s in stains], axis=0)
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.median([s[1] for s in stains], axis=0)
    print(f"{len(stains)} tiles")
    print("MACENKO_TARGET = (" + repr(tuple(tuple(round(float(v), 4) for v in row) for row in he)) + ", "
          + repr(tuple(round(float(v), 4) for v in conc)) + ")")


if __name__ == "__main__":
    main()
