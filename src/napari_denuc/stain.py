"""Inference-time stain normalisation (Reinhard et al. 2001) for H&E tiles.

Reinhard matches the mean and standard deviation of each CIELAB channel to a reference. The
reference below is the mean over the BRCA-M2C training tiles (what the bundled heads saw).
It is an option, not a default: on leave-one-site-out it did not help the shipped encoder
(docs/benchmarks.md), and ImageNet features are already fairly stain-tolerant.
"""

from __future__ import annotations

import numpy as np

# Mean and standard deviation of L*, a*, b* over BRCA-M2C train (80 tiles, per-tile statistics averaged).
REINHARD_TARGET = ((64.04, 23.16, -17.33), (14.72, 8.12, 9.33))


def reinhard_normalize(image: np.ndarray, target=REINHARD_TARGET, background_l: float = 90.0) -> np.ndarray:
    """``image`` (RGB uint8) with its L*a*b* statistics moved to ``target``.

    Statistics are taken over tissue pixels only (L* below ``background_l``), so a tile that is
    half glass is not darkened; every pixel is then transformed.
    """
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(np.asarray(image, dtype=np.uint8))
    tissue = lab[..., 0] < background_l
    ref = lab[tissue] if tissue.sum() > 100 else lab.reshape(-1, 3)
    mean, std = ref.mean(axis=0), np.maximum(ref.std(axis=0), 1e-3)
    out = (lab - mean) / std * np.asarray(target[1]) + np.asarray(target[0])
    out[..., 0] = np.clip(out[..., 0], 0, 100)
    return (np.clip(lab2rgb(out), 0, 1) * 255 + 0.5).astype(np.uint8)
