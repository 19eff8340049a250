"""Make docs/images/napari_widget*.png: the DeNuC widget, opened from Plugins > DeNuC, and a
classified layer on the sample tile, at 1280 x 720 and 1600 x 1000.

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_screenshot.py [--outdir docs/images]

Runs the real default pipeline (bundled detector, default encoder, bundled head) on the bundled
sample, reviews a few nuclei through the review queue (so reviewed borders and the review
counter show), then grabs the whole napari window (canvas + dock widget).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

SIZES = {(1280, 720): "napari_widget.png", (1600, 1000): "napari_widget_1600x1000.png"}


def _settle(app, seconds=0.5):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def shoot(size, out):
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(*size)  # a script may size the window; the widget itself uses public API only
    viewer.open_sample("napari-denuc", "brca_m2c_tile")
    _, w = viewer.window.add_plugin_dock_widget("napari-denuc", "DeNuC")
    w.run_detection()  # pressed while the models load: runs as soon as they are in
    t0 = time.perf_counter()
    while (w.is_busy() or w._loading or w.points_layer() is None) and time.perf_counter() - t0 < 600:
        app.processEvents()
        time.sleep(0.02)
    lyr = w.points_layer()
    if lyr is None:
        print(f"no points layer: {w.status.text()}", file=sys.stderr)
        return 1
    names = list(w.class_names())
    w.review_next()
    for k in range(6):  # six answers from the review queue (each answer moves on to the next)
        if k % 2:
            w.mark_selected_reviewed()
        else:
            w.set_class_of_selected(names[k % len(names)])
    viewer.reset_view()
    with contextlib.suppress(Exception):  # hide notification toasts (e.g. the PyQt5 notice) that would cover the canvas
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
    _settle(app)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out} ({len(lyr.data)} nuclei, classes {names}; {w.review_label.text()})")
    viewer.close()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outdir", default=str(Path(__file__).parent / "images"))
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="denuc-shot-")
    os.environ.setdefault("DENUC_HOME", os.path.join(tmp, "home"))
    rc = 0
    for size, name in SIZES.items():
        os.environ["DENUC_HOME"] = os.path.join(tmp, f"home-{size[0]}")  # a fresh session each time
        rc |= shoot(size, Path(args.outdir) / name)
    return rc


if __name__ == "__main__":
    sys.exit(main())
