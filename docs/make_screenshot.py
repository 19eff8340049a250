"""Make docs/images/napari_widget.png: the DeNuC widget and a classified layer on the sample tile.

    xvfb-run -a -s "-screen 0 1280x1024x24" python docs/make_screenshot.py [--out docs/images/napari_widget.png]

Runs the real default pipeline (bundled detector, default encoder, bundled head) on the bundled
sample, then grabs the whole napari window (canvas + dock widget).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "images" / "napari_widget.png"))
    ap.add_argument("--detector", default=None)
    ap.add_argument("--head", default=None)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="denuc-shot-")
    os.environ.setdefault("DENUC_HOME", os.path.join(tmp, "home"))

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_denuc.widget._widget import DenucWidget

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 860)
    app = QApplication.instance()
    viewer.open_sample("napari-denuc", "brca_m2c_tile")
    w = DenucWidget(viewer, preload=False)
    w.detector_path, w.head_path = args.detector, args.head
    viewer.window.add_dock_widget(w, name="DeNuC", area="right")
    w.run_detection()
    t0 = time.perf_counter()
    while w.is_busy() and time.perf_counter() - t0 < 300:
        app.processEvents()
        time.sleep(0.01)
    lyr = w.points_layer()
    if lyr is None:
        print(f"no points layer: {w.status.text()}", file=sys.stderr)
        return 1
    viewer.reset_view()
    try:  # hide notification toasts (e.g. the PyQt5 deprecation notice) that would cover the canvas
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
    except Exception:  # noqa: BLE001 (cosmetic only)
        pass
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(args.out, canvas_only=False)
    print(f"wrote {args.out} ({len(lyr.data)} nuclei; {w.status.text()})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
