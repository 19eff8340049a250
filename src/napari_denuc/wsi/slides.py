"""Reading inputs for batch prediction: whole-slide images and plain images, with their mpp.

- WSIs (SVS, generic pyramidal TIFF, ...) are read through tiffslide, region by region;
- formats only OpenSlide reads (NDPI, MRXS, VMS, ...) go through openslide when it is importable;
- PNG/JPEG (and TIFFs tiffslide can't open) are read whole through ``napari_denuc.io.images``.

Every source answers ``read_region((x0, y0) in level-0 pixels, level, (w, h) at that level)``
with an RGB uint8 array; parts outside the slide are filled with white (background), never
black, so that the tile border does not look like a dark nucleus.
"""

from __future__ import annotations

import csv
import glob
import math
import os
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.images import as_rgb_uint8, read_image
from ..io.overlay import SUFFIX as OVERLAY_SUFFIX

WSI_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".qptiff", ".svslide"}
OPENSLIDE_ONLY = {".ndpi", ".mrxs", ".vms", ".vmu", ".svslide"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_SUFFIXES = WSI_SUFFIXES | PLAIN_SUFFIXES
FILL = 255


def _valid_mpp(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0.01 <= v <= 100 else None


# ----------------------------------------------------------------------------- inputs
def _read_csv_list(path: Path) -> list[tuple[Path, float | None]]:
    """Rows ``path[,mpp]``; an optional header naming the columns ``path`` and ``mpp``."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise DenucError(f"the input list {path} is empty")
    head = [c.strip().lower() for c in rows[0]]
    if "path" in head:
        ip, im = head.index("path"), (head.index("mpp") if "mpp" in head else None)
        rows = rows[1:]
    else:
        ip, im = 0, (1 if max(len(r) for r in rows) > 1 else None)
    out = []
    for k, r in enumerate(rows, start=2 if "path" in head else 1):
        p = Path(os.path.expanduser(r[ip].strip()))
        if not p.is_absolute():
            p = path.parent / p
        mpp = None
        if im is not None and im < len(r) and r[im].strip():
            mpp = _valid_mpp(r[im].strip())
            if mpp is None:
                raise DenucError(f"{path}, row {k}: the mpp {r[im].strip()!r} is not a number between 0.01 and 100")
        out.append((p, mpp))
    return out


def _is_input_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.lower().endswith(OVERLAY_SUFFIX)


def expand_inputs(args, mpp: float | None = None) -> list[tuple[Path, float | None]]:
    """Expand image files, folders, glob patterns and CSV lists into ``[(path, mpp or None), ...]``.

    - a folder contributes its image files (not recursive), sorted by name;
    - a pattern with ``*``, ``?`` or ``[`` is globbed (``**`` recurses), sorted;
    - folders and patterns leave out ``denuc-predict --overlay`` pictures (``*.overlay.png``): with
      ``--out`` the input folder, a second run would otherwise detect nuclei in its own overlays;
    - a ``.csv`` file is a list of ``path[,mpp]`` rows (header ``path,mpp`` optional; relative
      paths are relative to the CSV's folder);
    - ``mpp`` fills the inputs that have none from a CSV (it then counts as the input's own mpp,
      overriding the file's metadata; to use a value only for files that state none, pass it
      as ``predict_slides(..., mpp=...)`` instead).
    Duplicates are dropped (first one wins). Raises DenucError for a path that doesn't exist or a
    pattern/folder that matches nothing.
    """
    if isinstance(args, (str, os.PathLike)):
        args = [args]
    out: list[tuple[Path, float | None]] = []
    for a in args:
        s = os.path.expanduser(str(a))
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_input_image(q))
            if not found:
                raise DenucError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder {p}")
            out += [(q, None) for q in found]
        elif p.is_file() and p.suffix.lower() == ".csv":
            out += _read_csv_list(p)
        elif p.is_file():
            out.append((p, None))
        elif any(c in s for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).is_file())
            found = [q for q in found if _is_input_image(q)]
            if not found:
                raise DenucError(f"the pattern {s!r} matches no image files")
            out += [(q, None) for q in found]
        else:
            raise DenucError(f"input not found: {s} (give image files, folders, glob patterns or a .csv list)")
    seen, result = set(), []
    for p, m in out:
        key = os.path.abspath(p)
        if key in seen:
            continue
        seen.add(key)
        result.append((p, m if m is not None else mpp))
    return result


# ----------------------------------------------------------------------------- sources
class SlideSource:
    """A slide or image readable region by region at several levels."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # level 0, from metadata
    reader: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """In-bounds read at level coordinates."""
        raise NotImplementedError

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) RGB uint8 at ``level``, ``(x, y)`` in that level's pixels; white outside the slide."""
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), FILL, np.uint8)
        xa, ya, xb, yb = max(0, x), max(0, y), min(lw, x + w), min(lh, y + h)
        if xb > xa and yb > ya:
            out[ya - y : yb - y, xa - x : xb - x] = self._read(xa, ya, level, xb - xa, yb - ya)
        return out

    def read_region(self, location, level: int, size) -> np.ndarray:
        """OpenSlide convention: ``location`` in level-0 pixels, ``size`` (w, h) at ``level``."""
        ds = self.level_downsamples[level]
        return self.read_level(level, int(location[0] / ds), int(location[1] / ds), int(size[0]), int(size[1]))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TiffSlideSource(SlideSource):
    reader = "tiffslide"

    def __init__(self, path: Path):
        import tiffslide

        self.path = Path(path)
        self._slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        self.mpp = _valid_mpp(props.get("tiffslide.mpp-x"))
        if self.mpp is None:  # the Aperio description or the resolution tags, as napari_denuc.io.images reads them
            try:
                from ..io.images import _tiff_mpp

                self.mpp = _valid_mpp(_tiff_mpp(self.path))
            except Exception:
                self.mpp = None

    def _read(self, x, y, level, w, h):
        ds = self.level_downsamples[level]
        # tiffslide maps the level-0 location with int(loc / ds); aim for the centre of the level pixel
        loc = (int(math.ceil(x * ds)), int(math.ceil(y * ds))) if level else (x, y)
        a = self._slide.read_region(loc, level, (w, h), as_array=True)
        return as_rgb_uint8(a, str(self.path))

    def close(self):
        self._slide.close()


class OpenSlideSource(SlideSource):
    reader = "openslide"

    def __init__(self, path: Path):
        import openslide

        self.path = Path(path)
        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.mpp = _valid_mpp(self._slide.properties.get("openslide.mpp-x"))

    def _read(self, x, y, level, w, h):
        ds = self.level_downsamples[level]
        im = self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return as_rgb_uint8(np.asarray(im), str(self.path))  # RGBA: transparent -> white

    def close(self):
        self._slide.close()


class ArraySource(SlideSource):
    """A plain image held in memory (PNG/JPEG, or a TIFF only tifffile reads)."""

    reader = "image"

    def __init__(self, path: Path, image: np.ndarray, mpp: float | None):
        self.path = Path(path)
        self._image = image
        h, w = image.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.mpp = _valid_mpp(mpp)

    def _read(self, x, y, level, w, h):
        return self._image[y : y + h, x : x + w]


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except Exception:  # ImportError, or OSError when the C library is missing
        return False
    return True


def open_slide(path) -> SlideSource:
    """Open ``path`` with the best reader; raises DenucError if it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise DenucError(f"file not found: {path}")
    suffix = path.suffix.lower()
    errors = []  # (reader, error), in the order tried: the message names each reader
    if suffix in OPENSLIDE_ONLY:
        if not _openslide_available():
            raise DenucError(
                f"{path}: {suffix} slides need OpenSlide; install it (pip install openslide-python openslide-bin) "
                "or convert the slide to a pyramidal TIFF"
            )
        try:
            return OpenSlideSource(path)
        except Exception as exc:
            raise DenucError(f"cannot read the slide {path} with openslide ({type(exc).__name__}: {exc})") from None
    if suffix in WSI_SUFFIXES:
        try:
            src = TiffSlideSource(path)
            src.read_level(src.level_count - 1, 0, 0, 1, 1)  # fail now, not in a tile, for a broken file
            return src
        except Exception as exc:
            errors.append(("tiffslide", f"{type(exc).__name__}: {exc}"))
        if _openslide_available():
            try:
                return OpenSlideSource(path)
            except Exception as exc:
                errors.append(("openslide", f"{type(exc).__name__}: {exc}"))
    if suffix in PLAIN_SUFFIXES or suffix in (".tif", ".tiff"):
        try:
            image, mpp = read_image(path)
            return ArraySource(path, image, mpp)
        except DenucError as exc:
            errors.append(("image reader", str(exc)))
    if not errors:
        raise DenucError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    first = " ".join(errors[0][1].split())  # one line, whatever the reader's message holds
    if len(errors) == 1 and errors[0][0] == "image reader":  # a PNG/JPEG: its reader's message says it all
        raise DenucError(first)
    tried = ", ".join(r for r, _ in errors)
    raise DenucError(f"cannot read the slide {path} with {tried} ({errors[0][0]}: {first})")


def resolve_mpp(source: SlideSource, given: float | None = None, fallback: float | None = None) -> tuple[float, str]:
    """The level-0 mpp to use and where it came from: ``"input"``, ``"metadata"`` or ``"--mpp"``.

    ``given`` (a per-input mpp, e.g. from a CSV list) overrides the file's metadata;
    ``fallback`` (``--mpp``) is used only when the file states none. DenucError asking for
    ``--mpp`` when neither is known.
    """
    for value, origin in ((given, "input"), (None, "metadata"), (fallback, "--mpp")):
        if origin == "metadata":
            if source.mpp is not None:
                return source.mpp, origin
            continue
        if value is not None:
            mpp = _valid_mpp(value)
            if mpp is None:
                raise DenucError(f"{source.path}: the mpp {value!r} is not a number between 0.01 and 100")
            return mpp, origin
    raise DenucError(
        f"{source.path}: the file states no resolution; give it with --mpp (e.g. --mpp 0.25 for 40x, 0.5 for 20x) "
        "or in an mpp column of the CSV list"
    )
