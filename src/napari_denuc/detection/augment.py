"""Training-time augmentation for H&E crops: geometry, scale, stain, colour, blur and JPEG.

Every option is a field of :class:`Augment`; the defaults reproduce the recipe of the bundled
detector (flips, 90-degree rotations, scale 0.8-1.25, light HED and colour jitter, no blur, no
JPEG). ``Augment.preset("travel")`` is the stronger set meant for slides from other hospitals
(issue 10): stronger stain and colour jitter, blur, JPEG-like degradation and a scale jitter of
+-15 % around the training mpp.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np

from ..errors import DenucError
from ..geometry import rescale_points


@dataclass
class Augment:
    """What ``augment`` does to each training crop (probabilities and ranges)."""

    scale_min: float = 0.8  # image zoom factor range; 1 / zoom is the mpp change
    scale_max: float = 1.25
    hed_sigma: float = 0.05  # each stain's optical density x U(1 - sigma, 1 + sigma) ...
    hed_bias: float = 0.02  # ... + U(-bias, bias), in skimage's rgb2hed space
    colour: float = 0.1  # brightness, contrast, saturation each x U(1 - colour, 1 + colour)
    blur_p: float = 0.0  # probability of a Gaussian blur ...
    blur_sigma: float = 1.2  # ... with sigma U(0.3, blur_sigma) px (focus, scanner optics)
    jpeg_p: float = 0.0  # probability of a JPEG round trip ...
    jpeg_quality: int = 40  # ... at quality U(jpeg_quality, 95)

    PRESETS: ClassVar[dict] = {
        "shipped": {},
        "travel": {"scale_min": 0.85, "scale_max": 1.15, "hed_sigma": 0.15, "hed_bias": 0.05, "colour": 0.2,
                   "blur_p": 0.3, "jpeg_p": 0.3},
        "none": {"scale_min": 1.0, "scale_max": 1.0, "hed_sigma": 0.0, "hed_bias": 0.0, "colour": 0.0},
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> Augment:
        if name not in cls.PRESETS:
            raise DenucError(f"unknown augmentation preset {name!r}; use one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict | None) -> Augment:
        """From a config's ``augment`` dict: an optional ``"preset"`` name, then field overrides."""
        d = dict(d or {})
        preset = d.pop("preset", "shipped")
        names = {f.name for f in fields(cls)}
        return cls.preset(preset, **{k: v for k, v in d.items() if k in names})

    @classmethod
    def config(cls, preset: str) -> dict:
        """What a training config records for a preset: its name and every field it sets."""
        return {"preset": preset, **cls.preset(preset).to_dict()}

    def to_dict(self) -> dict:
        return asdict(self)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.02) -> np.ndarray:
    """Scale and shift each stain's optical density (HED-light/strong of Tellez et al.).

    Works in scikit-image's ``rgb2hed`` stain space (the same Ruifrok & Johnston matrices) on
    optical density, without rgb2hed's clipping, so zero jitter returns the image unchanged.
    """
    if sigma == 0 and bias == 0:
        return image
    from skimage.color import hed_from_rgb, rgb_from_hed  # here, not at import: denuc-train --help reads the presets

    od = -np.log(np.maximum(image.astype(np.float32), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ hed_from_rgb.astype(np.float32)
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3).astype(np.float32) + rng.uniform(-bias, bias, 3).astype(np.float32)
    od = hed @ rgb_from_hed.astype(np.float32)
    rgb = 255.0 * np.exp(-od)
    return np.clip(np.rint(rgb), 0, 255).reshape(image.shape).astype(np.uint8)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Brightness, contrast and saturation jitter."""
    if strength == 0:
        return image
    x = image.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)  # saturation
    x = (x - x.mean()) * rng.uniform(1 - strength, 1 + strength) + x.mean()  # contrast
    x = x * rng.uniform(1 - strength, 1 + strength)  # brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect")


def jpeg_degrade(image: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG encode/decode round trip: block artefacts and chroma subsampling of other scanners."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def random_crop(image, points, size: int, rng: np.random.Generator, scale_range=(0.8, 1.25)):
    """A ``size`` x ``size`` crop at a random scale, flip and 90-degree rotation.

    Returns the crop (uint8) and the points inside it, in crop pixels.
    """
    from PIL import Image

    s = rng.uniform(*scale_range)
    src = round(size / s)
    h, w = image.shape[:2]
    y0 = int(rng.integers(min(0, h - src), max(0, h - src) + 1))
    x0 = int(rng.integers(min(0, w - src), max(0, w - src) + 1))
    # Pad with white where the crop runs past the image (small images, or src > image size).
    crop = np.full((src, src, 3), 255, dtype=np.uint8)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + src), min(w, x0 + src)
    crop[ys - y0 : ye - y0, xs - x0 : xe - x0] = image[ys:ye, xs:xe]
    if src != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))
    pts = rescale_points(np.asarray(points, dtype=np.float64).reshape(-1, 2) - (x0, y0), size / src)
    keep = (pts[:, 0] >= -0.5) & (pts[:, 0] < size - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] < size - 0.5)
    pts = pts[keep]
    if rng.random() < 0.5:  # horizontal flip
        crop = crop[:, ::-1]
        pts = pts * (-1, 1) + (size - 1, 0)
    for _ in range(int(rng.integers(0, 4))):  # rotate 90 degrees counter-clockwise: (x, y) -> (y, size-1-x)
        crop = np.rot90(crop)
        pts = np.stack([pts[:, 1], size - 1 - pts[:, 0]], axis=1) if len(pts) else pts
    return np.ascontiguousarray(crop), pts.reshape(-1, 2)


def augment(image, points, size: int, rng: np.random.Generator, aug: Augment | None = None, colour: bool = True):
    """One augmented training crop and its points (crop pixels). ``colour=False``: geometry only."""
    aug = aug or Augment()
    crop, pts = random_crop(image, points, size, rng, (aug.scale_min, aug.scale_max))
    if colour:
        crop = colour_jitter(hed_jitter(crop, rng, aug.hed_sigma, aug.hed_bias), rng, aug.colour)
        # Degradations come last: a scanner blurs and compresses the stained tissue it sees.
        if aug.blur_p and rng.random() < aug.blur_p:
            crop = gaussian_blur(crop, rng.uniform(0.3, max(0.3, aug.blur_sigma)))
        if aug.jpeg_p and rng.random() < aug.jpeg_p:
            crop = jpeg_degrade(crop, rng.integers(min(aug.jpeg_quality, 95), 96))
    return crop, pts
