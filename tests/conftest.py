"""Shared test setup: napari tests (marker ``napari``) need a display.

Without one they are skipped with a reason, unless NAPARI_DENUC_REQUIRE_DISPLAY is set
(scripts/test.sh sets it and runs pytest under Xvfb, so there they must run).
"""

import os
import sys

import pytest


def _has_display() -> bool:
    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.environ.get("QT_QPA_PLATFORM") == "offscreen"


def pytest_collection_modifyitems(config, items):
    if _has_display() or os.environ.get("NAPARI_DENUC_REQUIRE_DISPLAY"):
        return
    skip = pytest.mark.skip(reason="napari tests need a display: run 'bash scripts/test.sh' (starts Xvfb) or set DISPLAY")
    for item in items:
        if "napari" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_denuc_home(tmp_path_factory, monkeypatch):
    """Every test gets its own $DENUC_HOME, unless it sets one: the widget remembers the project
    folder there, and a test must neither read nor write the user's ~/.napari-denuc."""
    if "DENUC_HOME" not in os.environ:
        monkeypatch.setenv("DENUC_HOME", str(tmp_path_factory.mktemp("denuc_home")))
