"""Training-time augmentation for H&E crops: geometry, scale jitter and stain (HED) jitter."""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston stain vectors, as in skimage.color (rgb_from_hed / hed_from_rgb).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.02) -> np.ndarray:
    """Scale and shift each stain's optical density, like the HED-light augmentation of Tellez et al."""
    od = -np.log(np.maximum(image.astype(np.float32), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    od = hed @ _RGB_FROM_HED
    rgb = 255.0 * np.exp(-od)
    return np.clip(rgb, 0, 255).reshape(image.shape).astype(np.uint8)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Brightness, contrast and saturation jitter."""
    x = image.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)  # saturation
    x = (x - x.mean()) * rng.uniform(1 - strength, 1 + strength) + x.mean()  # contrast
    x = x * rng.uniform(1 - strength, 1 + strength)  # brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def random_crop(image, points, size: int, rng: np.random.Generator, scale_range=(0.8, 1.25)):
    """A ``size`` x ``size`` crop at a random scale, flip and 90-degree rotation.

    Returns the crop (uint8) and the points inside it, in crop pixels.
    """
    from PIL import Image

    s = rng.uniform(*scale_range)
    src = int(round(size / s))
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
    k = size / src
    pts = (points - (x0, y0) + 0.5) * k - 0.5
    keep = (pts[:, 0] >= -0.5) & (pts[:, 0] < size - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] < size - 0.5)
    pts = pts[keep]
    if rng.random() < 0.5:  # horizontal flip
        crop = crop[:, ::-1]
        pts = pts * (-1, 1) + (size - 1, 0)
    for _ in range(int(rng.integers(0, 4))):  # rotate 90 degrees counter-clockwise: (x, y) -> (y, size-1-x)
        crop = np.rot90(crop)
        pts = np.stack([pts[:, 1], size - 1 - pts[:, 0]], axis=1) if len(pts) else pts
    return np.ascontiguousarray(crop), pts.reshape(-1, 2)


def augment(image, points, size: int, rng: np.random.Generator, colour: bool = True):
    crop, pts = random_crop(image, points, size, rng)
    if colour:
        crop = colour_jitter(hed_jitter(crop, rng), rng)
    return crop, pts
