"""Atomic file writes: a reader sees either the old file or the complete new one, never a torn file."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    The data goes to a temporary file in the same folder (``os.replace`` is only atomic
    within one file system), is flushed and fsynced, then renamed over ``path``. Parent
    folders are created. If anything fails the temporary file is removed and any old
    ``path`` is left untouched. ``str`` data is encoded as UTF-8.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def _replace(tmp, path: Path) -> None:
    # mkstemp creates 0600 files: keep the old file's mode, else the usual 0644
    # (reading the umask would mean changing it, which races with other threads).
    mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o644
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _sync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        # Make the rename itself durable; not possible (nor needed) on every platform.
        try:
            dfd = os.open(folder, os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_writer(path):
    """``with atomic_writer(path) as f: f.write(...)``: stream bytes into ``path`` atomically.

    For outputs too large to hold in memory (a whole slide's nuclei): the data goes to a
    temporary file next to ``path`` and replaces it only when the block ends without an
    exception, with the same guarantees as :func:`atomic_write`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _sync_dir(path.parent)
