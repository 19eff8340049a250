"""Shared plumbing of all encoders: device choice, cache location, ``features_at``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .query import ProgressFn, default_cache_dir, query_features


def pick_device(device=None):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder:
    """Base class. Subclasses set ``id, feature_dim, mpp, window, overlap, align`` and implement
    either ``encode_windows`` + ``stride`` (dense maps, cached on disk) or ``window_features``.
    """

    id: str = ""  # versioned: a head checks it fits the features it reads
    name: str = ""  # the registry name it was built from (``get_encoder`` sets it): short, for people
    feature_dim: int = 0
    mpp: float = 0.5
    window: int = 224
    overlap: int = 56
    align: int = 16
    batch_size: int = 8
    cache_dtype = np.float16  # dense features are stored (and returned) rounded to this

    def _setup_cache(self, cache: bool, cache_dir) -> None:
        self.cache_dir: Path | None = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) if cache else None

    def features_at(self, image: np.ndarray, xy: np.ndarray, mpp: float, progress: ProgressFn | None = None) -> np.ndarray:
        """(N, feature_dim) float32 features at ``xy`` ((N, 2) x, y in the input image's pixels)."""
        return query_features(self, image, xy, mpp, progress=progress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, feature_dim={self.feature_dim}, mpp={self.mpp})"
