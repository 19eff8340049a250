"""``lite``: an encoder that needs no downloaded weights and is fast on CPU.

Per nucleus it concatenates

* a multi-scale filter bank on four stain/colour channels -- hematoxylin, eosin and the
  residual channel of ``skimage.color.rgb2hed`` plus the mean optical density -- at sigmas 1, 2, 4, 8, 16, 32 px
  (0.5 mpp; nuclei are ~6-16 px across): the Gaussian-smoothed value, the scale-normalised
  gradient magnitude and the two scale-normalised Hessian eigenvalues at the point (their sum
  is the Laplacian of Gaussian), and for sigma >= 2 the statistics (mean, std, min, max) of the
  smoothed channel on a ring of radius 2*sigma around the point (membrane, neighbours, stroma:
  the context that tells a lymphocyte in stroma from a tumour cell in a nest);
* a trained detector's stride-8 neck features, sampled bilinearly at the point
  (``PointDetector.neck_features``; cell (i, j) is centred at pixel (j*8+3.5, i*8+3.5)).
  The pipeline gives it :func:`bundled_neck`, a frozen detector of its own, not the detector
  that finds the nuclei: a better detector then needs no new heads (a detector trained longer
  found more nuclei on unseen sites, but its neck classified them worse; docs/models.md).

Derivatives and rings are evaluated only at the query points (finite differences on the
smoothed channel), so cost is a handful of Gaussian filters per window; sigmas >= 4 run on a
block-averaged copy. Standardisation is left to the head (``LinearHead`` stores mean/std).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..io.naming import content_hash
from .base import Encoder, pick_device
from .query import bilinear_sample, cell_coordinate

SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
CHANNELS = ("hematoxylin", "eosin", "dab_residual", "optical_density")
N_ANGLES = 8
VERSION = "lite-v1"

# rgb2hed's stain matrix inverse (Ruifrok & Johnston), applied to optical density.
_HED_FROM_RGB = None


def _hed_matrix():
    global _HED_FROM_RGB
    if _HED_FROM_RGB is None:
        from skimage.color.colorconv import hed_from_rgb

        _HED_FROM_RGB = np.asarray(hed_from_rgb, dtype=np.float32)
    return _HED_FROM_RGB


def iter_stain_channels(rgb_uint8: np.ndarray):
    """H, E, residual (as ``rgb2hed``) and brightness, float32 (H, W) each, one at a time.

    A generator so that a 2048 x 2048 window holds one channel (16 MB) besides the three
    optical densities, not all four: the filter bank is one of a slide window's two memory peaks.
    """
    m = _hed_matrix() * 10.0  # scale H/E/D to roughly unit range
    # optical density as rgb2hed computes it (log(rgb) / log(1e-6)), through a 256-entry table
    lut = (np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0) / np.log(1e-6)).astype(np.float32)
    od = [lut[rgb_uint8[..., i]] for i in range(3)]
    for j in range(3):
        ch = od[0] * m[0, j]
        tmp = np.multiply(od[1], m[1, j])
        ch += tmp
        np.multiply(od[2], m[2, j], out=tmp)
        ch += tmp
        del tmp
        np.maximum(ch, 0, out=ch)
        yield ch
        del ch
    # mean optical density (dark = high), summed into the first density's buffer: the same
    # float32 operations as (od0 + od1 + od2) * (1 / 3)
    bright, od1, od2 = od
    del od
    bright += od1
    del od1
    bright += od2
    del od2
    bright *= 1.0 / 3.0
    yield bright


def stain_channels(rgb_uint8: np.ndarray) -> list[np.ndarray]:
    """H, E, residual (as ``rgb2hed``) and brightness, float32 (H, W) each."""
    return list(iter_stain_channels(rgb_uint8))


def _smooth(ch: np.ndarray, sigma: float):
    """Gaussian smoothing at ``sigma`` px; large sigmas on a block-averaged copy. Returns (map, factor)."""
    d = 1 if sigma < 4 else int(sigma // 2)
    if d > 1:
        h, w = ch.shape
        hh, ww = -(-h // d) * d, -(-w // d) * d
        if (hh, ww) != (h, w):
            ch = np.pad(ch, ((0, hh - h), (0, ww - w)), mode="symmetric")
        ch = ch.reshape(hh // d, d, ww // d, d).mean(axis=(1, 3))
    s = np.sqrt(max(sigma**2 - (d**2 - 1) / 12.0, 0.25)) / d
    return ndi.gaussian_filter(ch, s, mode="reflect", truncate=3.0), d


def _sample(m: np.ndarray, d: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear sample of a 2-D map stored at 1/d resolution, at full-resolution (x, y)."""
    return bilinear_sample(m[None], cell_coordinate(x, d), cell_coordinate(y, d))[:, 0]


def filter_bank_dim() -> int:
    per_channel = sum(4 + (4 if s >= 2 else 0) for s in SIGMAS)
    return per_channel * len(CHANNELS)


def filter_features(crop: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(n, filter_bank_dim()) filter-bank features at ``xy`` (crop pixels) of an RGB uint8 crop."""
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    n = len(x)
    ang = np.arange(N_ANGLES) * (2 * np.pi / N_ANGLES)
    ca, sa = np.cos(ang), np.sin(ang)
    cols = []
    for ch in iter_stain_channels(crop):  # one channel at a time: less memory
        for s in SIGMAS:
            g, d = _smooth(ch, s)
            h = s  # finite-difference step: derivatives at the filter's own scale
            # 3x3 stencil of offsets (dx, dy) in {-h, 0, h}^2
            ox = np.array([-h, 0, h, -h, 0, h, -h, 0, h])
            oy = np.array([-h, -h, -h, 0, 0, 0, h, h, h])
            vals = _sample(g, d, (x[:, None] + ox).ravel(), (y[:, None] + oy).ravel()).reshape(n, 9)
            c = vals[:, 4]
            gx = (vals[:, 5] - vals[:, 3]) / (2 * h)
            gy = (vals[:, 7] - vals[:, 1]) / (2 * h)
            gxx = (vals[:, 5] + vals[:, 3] - 2 * c) / h**2
            gyy = (vals[:, 7] + vals[:, 1] - 2 * c) / h**2
            gxy = (vals[:, 8] - vals[:, 6] - vals[:, 2] + vals[:, 0]) / (4 * h**2)
            tr = (gxx + gyy) * s**2
            disc = np.sqrt(((gxx - gyy) * s**2) ** 2 + 4 * (gxy * s**2) ** 2)
            cols += [c, np.hypot(gx, gy) * s, (tr + disc) / 2, (tr - disc) / 2]
            if s >= 2:
                r = 2 * s
                ring = _sample(g, d, (x[:, None] + r * ca).ravel(), (y[:, None] + r * sa).ravel()).reshape(n, N_ANGLES)
                cols += [ring.mean(1) - c, ring.std(1), ring.min(1), ring.max(1)]
    return np.stack(cols, axis=1).astype(np.float32)


NECK = "lite_neck.safetensors"  # in the package's weights/: a detector checkpoint, used for its neck only


def bundled_neck(device=None):
    """The frozen detector whose neck the ``lite`` features read (and with them ``effnet-lite0``'s)."""
    from importlib import resources

    from ..detection.checkpoint import load_detector

    return load_detector(resources.files("napari_denuc") / "weights" / NECK, device=device)


def detector_fingerprint(detector) -> str:
    def parts():
        yield str(getattr(detector, "backbone_name", type(detector).__name__))
        for k, v in sorted(detector.state_dict().items()):
            yield k
            yield v.detach().cpu().contiguous().numpy()

    return content_hash(parts(), digest_size=5)  # 5 bytes: the shipped head's encoder id has this length


class LiteEncoder(Encoder):
    """Filter bank (+ detector neck features when a detector is given); see the module docstring."""

    align = 32  # the detector needs window sides that are multiples of 32

    def __init__(self, detector=None, device=None, cache_dir=None, batch_size=1, cache=True, window=None, overlap=None):
        """``detector``: a ``PointDetector`` or the wrapper ``detection.checkpoint.load_detector()`` returns."""
        self.mpp = 0.5
        self.window = int(window or 2048)
        # overlap/2 = 192 px of real context around every point (ring radius 64 + 2 sigma at sigma 32)
        self.overlap = int(384 if overlap is None else overlap)
        self.batch_size = 1
        self.detector = detector
        self.neck_dim = 0
        self.id = VERSION
        if detector is not None and not hasattr(detector, "neck_features") and hasattr(detector, "model"):
            # a checkpoint wrapper (detection.checkpoint.load_detector): its mpp + its PointDetector
            self.mpp = float(getattr(detector, "mpp", None) or 0.5)
            detector = detector.model
        if detector is not None:
            import torch

            self.device = pick_device(device)
            self.detector = detector.eval().to(self.device)
            with torch.no_grad():
                probe = detector.neck_features(torch.zeros(1, 3, 32, 32, device=self.device))
            self.neck_dim = int(probe.shape[1])
            self.id = f"{VERSION}+{detector_fingerprint(detector)}"
            self.mpp = float(getattr(detector, "mpp", None) or self.mpp)
        self.filter_dim = filter_bank_dim()
        self.feature_dim = self.filter_dim + self.neck_dim
        # Point-wise (no dense map to store) and fast: nothing is cached on disk.
        self.cache_dir = None

    def window_features(self, crop: np.ndarray, local_xy: np.ndarray) -> np.ndarray:
        feats = filter_features(crop, local_xy)
        if self.detector is None:
            return feats
        import torch

        with torch.inference_mode():
            rgb = torch.from_numpy(crop)[None].to(self.device)
            if hasattr(self.detector, "neck_features_rgb"):  # the same values in strips, with less memory
                neck = self.detector.neck_features_rgb(rgb)
            else:
                neck = self.detector.neck_features(self.detector.normalize(rgb))
            neck = neck[0].float().cpu().numpy()
        stride = crop.shape[0] // neck.shape[1]  # 8
        nf = bilinear_sample(neck, cell_coordinate(local_xy[:, 0], stride), cell_coordinate(local_xy[:, 1], stride))
        return np.concatenate([feats, nf], axis=1)
