"""Image reading and the conversion of any array to the RGB uint8 the models take.

Conversions (documented in docs/usage.md):

- grayscale (H, W) or (H, W, 1): copied into three channels;
- RGBA: composited onto white (slide exports use transparency for background);
- channels-first (3, H, W) or (4, H, W): transposed;
- uint16: divided by 257 (0-65535 -> 0-255); other integer types must fit 0-255;
- float: values in [0, 1] are scaled by 255, values in [0, 255] are rounded;
  NaN, infinity or values outside those ranges are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DenucError

DEFAULT_MPP = 0.5  # 20x, assumed when an image file states no resolution


def as_rgb_uint8(image, source: str = "image") -> np.ndarray:
    """Return ``image`` as a contiguous (H, W, 3) uint8 RGB array, or raise DenucError."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise DenucError(f"{source}: expected an RGB image (H, W, 3), got an array of shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DenucError(f"{source}: the image is empty ({a.shape[1]}x{a.shape[0]} pixels)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DenucError(f"{source}: the float image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise DenucError(f"{source}: float pixel values must lie in [0, 1] or [0, 255], found [{lo:g}, {hi:g}]")
        scale = 255.0 if hi <= 1.0 else 1.0
        a = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 255:
            raise DenucError(f"{source}: unsupported pixel type {a.dtype} (values {a.min()}..{a.max()}); save as 8-bit RGB")
        a = a.astype(np.uint8)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


# OME's length units, in micrometres (PhysicalSizeX defaults to µm; micro sign or Greek mu)
_OME_UNITS = {"\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(xml: str | None) -> float | None:
    """PhysicalSizeX of the first image in OME-XML (QuPath's and bfconvert's OME-TIFF), in µm."""
    if not xml:
        return None
    m = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    size = m and re.search(r'\sPhysicalSizeX="([^"]+)"', m.group(0))
    if not size:
        return None
    unit = re.search(r'\sPhysicalSizeXUnit="([^"]+)"', m.group(0))
    try:
        mpp = float(size.group(1)) * _OME_UNITS[unit.group(1) if unit else "\u00b5m"]
    except (KeyError, ValueError):
        return None
    return mpp if 0.05 <= mpp <= 20 else None


def _tiff_mpp(path: Path) -> float | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)  # Aperio SVS / pyramidal TIFF descriptions
        if m and float(m.group(1)) > 0:
            return float(m.group(1))
        if tif.is_ome:
            ome = _ome_mpp(tif.ome_metadata)
            if ome is not None:
                return ome
        tags = page.tags
        if "XResolution" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # the TIFF default is inch
            # ImageJ writes no unit tag value but "unit=micron" and pixels per micrometre.
            ij_unit = re.search(r"^unit=(\S+)", desc, re.MULTILINE)
            if unit == 1 and ij_unit and ij_unit.group(1).lower() in ("micron", "um", "\\u00b5m", "µm", "microns"):
                return den / num if num and den and 0.05 <= den / num <= 20 else None
            if num and den and unit in (2, 3):
                per_unit = num / den  # pixels per inch (2) or per centimetre (3)
                mpp = (25400.0 if unit == 2 else 10000.0) / per_unit
                # 72/96 dpi are screen defaults written by many tools, not a scan resolution.
                if unit == 2 and per_unit in (72, 96, 300):
                    return None
                return mpp if 0.05 <= mpp <= 20 else None
    return None


def read_image(path) -> tuple[np.ndarray, float | None]:
    """Read PNG, JPEG or TIFF as RGB uint8. Returns ``(image, mpp)``; mpp is None when the file states none."""
    path = Path(path)
    if not path.is_file():
        raise DenucError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff", ".svs"):
            import tifffile

            data = tifffile.imread(path, level=0) if suffix == ".svs" else tifffile.imread(path)
            mpp = _tiff_mpp(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("P", "PA", "LA"):
                    im = im.convert("RGBA")  # palette/grey + alpha: keep the alpha to composite on white
                elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGB")  # 4-channel CMYK would otherwise pass for RGBA
                data = np.asarray(im)
            mpp = None
    except DenucError:
        raise
    except Exception as exc:
        raise DenucError(f"cannot read {path} as an image ({type(exc).__name__}: {exc})") from None
    return as_rgb_uint8(data, str(path)), mpp
