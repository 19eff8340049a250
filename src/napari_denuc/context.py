"""Neighbourhood context: what the nuclei around a nucleus look like.

A lymphocyte in an infiltrate and a tumour nucleus in a nest are told apart as much by their
neighbours as by themselves, and a small encoder's features see little beyond the nucleus.
So a head may read, besides each nucleus's own features, the mean features of the other
nuclei within ``radius_um`` and how many there are (``log1p`` of the count). Leave-one-site-out
over BRCA-M2C chose 40 um (docs/benchmarks.md). The neighbours are the other points being
classified: all detections of an image, or all nuclei of a corrected layer.
"""

from __future__ import annotations

import numpy as np


def context_dim(feature_dim: int) -> int:
    """Length of a nucleus's input with context: own features, neighbours' mean, count."""
    return 2 * int(feature_dim) + 1


def with_context(features, xy, mpp: float, radius_um: float) -> np.ndarray:
    """(N, 2D + 1): ``features`` (N, D), the mean features of the other points within
    ``radius_um`` of each point (its own features when it has none), and log1p(their count).

    ``xy`` are the points in pixels of an image at ``mpp`` micrometres per pixel.
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    f = np.asarray(features, dtype=np.float32)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(f) != len(xy):
        raise ValueError(f"{len(f)} feature vectors for {len(xy)} points")
    n = len(xy)
    if n == 0:
        return np.zeros((0, context_dim(f.shape[1] if f.ndim == 2 else 0)), np.float32)
    tree = cKDTree(xy)
    pairs = tree.query_pairs(float(radius_um) / float(mpp), output_type="ndarray")
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    adjacency = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
    count = np.asarray(adjacency.sum(axis=1), dtype=np.float32)
    mean = np.asarray(adjacency @ f, dtype=np.float32) / np.maximum(count, 1)
    alone = count[:, 0] == 0
    mean[alone] = f[alone]
    return np.concatenate([f, mean, np.log1p(count)], axis=1)
