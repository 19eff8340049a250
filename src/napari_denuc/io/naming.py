"""One home for naming things on disk: sidecar files, file-safe names and content hashes.

- :func:`sidecar_path`: the JSON sidecar of a model file is ``<file>.json`` (heads, detectors);
  :func:`prior_path`: a head's prior sample is ``<stem>.prior.safetensors``.
- :func:`safe_name`: one rule for turning free text (class names, encoder ids, image names)
  into a file-name component: letters, digits and ``- _ . +`` are kept, every other run of
  characters becomes ``_``, leading dots are dropped (no hidden files, no ``..``), and the
  result is at most ``max_len`` characters.
- :func:`content_hash` / :func:`file_fingerprint`: BLAKE2b over a sequence of parts. The
  digest size is the caller's: ids already stored in shipped sidecars (e.g. the ``lite``
  encoder id in the bundled head) keep their value because the bytes hashed did not change.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def sidecar_path(path) -> Path:
    """``<file>.json`` beside ``path`` (``head.safetensors`` -> ``head.safetensors.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def prior_path(path) -> Path:
    """The prior sample beside a head (``head.safetensors`` -> ``head.prior.safetensors``)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".prior.safetensors")


def safe_name(name: str, default: str = "unnamed", max_len: int = 80) -> str:
    """``name`` as one file-name component (see the module docstring for the rule)."""
    out = _UNSAFE.sub("_", str(name)).lstrip(".")[:max_len]
    return out or default


def _bytes(part) -> bytes | memoryview:
    if isinstance(part, str):
        return part.encode("utf-8")
    if isinstance(part, np.ndarray):
        return memoryview(np.ascontiguousarray(part)).cast("B")
    return part


def content_hash(parts: Iterable, digest_size: int = 8) -> str:
    """Hex BLAKE2b digest (``2 * digest_size`` characters) of ``parts`` fed in order.

    Each part is ``bytes``, ``str`` (UTF-8) or a numpy array (its raw C-order bytes; put the
    shape and dtype in a ``str`` part when they matter).
    """
    h = hashlib.blake2b(digest_size=digest_size)
    for part in parts:
        h.update(_bytes(part))
    return h.hexdigest()


def file_fingerprint(path, digest_size: int = 6, sample: int = 1 << 20) -> str:
    """Cheap content fingerprint of a (large) file: its size, first and last ``sample`` bytes."""
    path = Path(path)
    size = path.stat().st_size

    def parts():
        yield str(size)
        with open(path, "rb") as f:
            yield f.read(sample)
            if size > 2 * sample:
                f.seek(-sample, os.SEEK_END)
                yield f.read()

    return content_hash(parts(), digest_size)
