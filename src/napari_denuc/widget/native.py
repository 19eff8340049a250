"""Preparing the napari process before torch loads: no triton, OpenMP threads that sleep.

No Qt here.
"""

from __future__ import annotations

import os


def prepare_for_torch():
    """Prepare this process before torch loads inside napari: no triton, OpenMP threads that sleep.

    torch imports triton lazily (torch._dynamo, reached from the first optimizer step).
    triton's native library bundles its own LLVM, which crashes the process when Mesa's LLVM
    (the OpenGL driver napari's canvas uses under Xvfb or without a GPU) is already loaded.
    triton only compiles GPU kernels, which the widget never uses, so it is marked missing
    for this process (unless something already imported it). See :func:`passive_openmp`.
    """
    import sys

    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # "import triton" now raises ImportError
    passive_openmp(os.environ, sys.modules)


def passive_openmp(environ, modules) -> bool:
    """Make torch's OpenMP threads sleep, not spin, while they wait: inside napari only.

    A desktop shares its cores (QuPath, a browser). Spinning threads then wait for a partner the
    other program has descheduled: beside two busy processes the bundled detector took 10.3 s
    instead of 0.8 s in some runs, while PASSIVE stayed at 1.4-2.6 s. On a quiet machine PASSIVE
    costs 15-23 % (docs/benchmarks.md), so the command-line tools keep OpenMP's default. OpenMP
    reads the variable once, when torch loads it, and the user's own setting wins. True if set.
    """
    if "torch" in modules or "OMP_WAIT_POLICY" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
