"""Inference-time stain normalisation for H&E tiles: Reinhard et al. 2001 and Macenko et al. 2009.

Reinhard matches the mean and standard deviation of each CIELAB channel to a reference. Macenko
estimates the tile's haematoxylin and eosin optical-density vectors, unmixes every pixel into
the two stain concentrations and re-renders them with a reference's vectors and concentration
range. Both references come from the BRCA-M2C training tiles (what the bundled heads saw).
Both are options, not defaults: on leave-one-site-out neither helped the shipped encoder
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


# Median over the 90 BRCA-M2C train+val tiles of each tile's own Macenko stain vectors (columns:
# haematoxylin, eosin; unit optical-density vectors in R, G, B) and 99th-percentile concentrations.
MACENKO_TARGET = (((0.597, 0.2676), (0.7251, 0.8035), (0.3432, 0.5318)), (1.8892, 1.0682))  # training/macenko_reference.py


def _optical_density(image: np.ndarray) -> np.ndarray:
    return -np.log((np.asarray(image, dtype=np.float64).reshape(-1, 3) + 1.0) / 256.0)


def macenko_stains(image: np.ndarray, beta: float = 0.15, alpha: float = 1.0):
    """The stains of an RGB uint8 tile: (stain matrix (3, 2), haematoxylin then eosin column, unit
    optical-density vectors; 99th-percentile concentration of each (2,)), or None when the tile
    holds fewer than 500 stained pixels (optical density above ``beta`` in every channel)."""
    return _stains(_optical_density(image), beta, alpha)


def _stains(od: np.ndarray, beta: float = 0.15, alpha: float = 1.0):
    """:func:`macenko_stains` of a tile's (N, 3) optical densities."""
    tissue = od[(od > beta).all(axis=1)]
    if len(tissue) < 500:
        return None
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]  # the plane of the two largest eigenvectors
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvectors' signs are arbitrary
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])  # robust extremes of the stain angles
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin (blue-purple) absorbs more red light than eosin (pink): the larger R is H.
    he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    conc = np.linalg.lstsq(he, tissue.T, rcond=None)[0]
    return he, np.percentile(conc, 99, axis=1)


def macenko_normalize(image: np.ndarray, target=MACENKO_TARGET) -> np.ndarray:
    """``image`` (RGB uint8) re-rendered with the ``target`` stain vectors and concentration range.

    A tile with too little stained tissue (mostly glass or fat) is returned unchanged.
    """
    image = np.asarray(image, dtype=np.uint8)
    od = _optical_density(image)
    stains = _stains(od)
    if stains is None:
        return image.copy()
    he, max_conc = stains
    ref_he, ref_max = np.asarray(target[0], dtype=np.float64), np.asarray(target[1], dtype=np.float64)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    conc *= (ref_max / np.maximum(max_conc, 1e-6))[:, None]
    rgb = 256.0 * np.exp(-(ref_he @ conc)) - 1.0
    return np.clip(rgb.T.reshape(image.shape) + 0.5, 0, 255).astype(np.uint8)
