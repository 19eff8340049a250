"""How long the napari window freezes during each step of the correction loop (Plugins > DeNuC).

    xvfb-run -a -s "-screen 0 1280x1024x24" python training/bench_widget_freeze.py [--tiles 3] [--json out.json]

A 10 ms QTimer runs on napari's event loop; the longest gap between two of its ticks during a
step is how long the window could not repaint or take a click. The image is a ``--tiles`` x
``--tiles`` mosaic of the bundled sample tile (1000 x 1000 px each, 0.5 µm/px), the models are
the bundled ones. Steps: widget opens and loads the models (background), Detect & classify,
τ moved one step, 20 nuclei relabelled, Retrain head (with 3 added nuclei to sample), Keep,
export to GeoJSON, Cancel of a second detection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_widget import _wait  # noqa: E402


class Stalls:
    """The longest gap between ticks of a 10 ms timer on the GUI thread, per step."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.t = time.perf_counter()
        self.worst = 0.0
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self):
        now = time.perf_counter()
        self.worst = max(self.worst, now - self.t)
        self.t = now

    def take(self) -> float:
        w, self.worst = self.worst, 0.0
        return w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="denuc-freeze-")
    os.environ.setdefault("DENUC_HOME", os.path.join(tmp, "home"))
    os.environ.setdefault("DENUC_CACHE", os.path.join(tmp, "cache"))

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_denuc._sample_data import make_sample_data

    app = QApplication.instance() or QApplication(sys.argv)

    def settle(s=0.3):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < s:
            app.processEvents()
            time.sleep(0.002)

    tile = make_sample_data()[0][0]
    image = np.tile(tile, (args.tiles, args.tiles, 1))
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, rgb=True, name="mosaic", metadata={"mpp": 0.5})
    settle()
    stalls = Stalls()
    rows = []

    def step(name, t0):
        settle()
        rows.append({"step": name, "wall_s": round(time.perf_counter() - t0, 2), "longest_stall_s": round(stalls.take(), 3)})
        print(f"{name:42s} {rows[-1]['wall_s']:7.2f} s   longest stall {rows[-1]['longest_stall_s']:.3f} s", flush=True)

    stalls.take()
    t0 = time.perf_counter()
    _, w = viewer.window.add_plugin_dock_widget("napari-denuc", "DeNuC")
    _wait(app, lambda: w.pipeline is not None and not w._loading)
    step("open widget + load models (background)", t0)

    t0 = time.perf_counter()
    w.run_detection()
    _wait(app, lambda: not w.is_busy())
    lyr = w.points_layer()
    step(f"Detect & classify ({len(lyr.data)} nuclei)", t0)

    t0 = time.perf_counter()
    w.tau_spin.setValue(round(w.tau_spin.value() - 0.05, 2))
    step("τ one step down (re-threshold)", t0)

    t0 = time.perf_counter()
    lyr.selected_data = set(range(20))
    w.set_class_of_selected(w.class_names()[-1])
    step("relabel 20 nuclei", t0)

    lyr.add(np.array([[40.0, 40.0], [140.0, 90.0], [260.0, 300.0]]))
    settle()
    stalls.take()
    t0 = time.perf_counter()
    w.retrain()
    _wait(app, lambda: not w.is_busy())
    step("Retrain head (3 new nuclei sampled)", t0)

    t0 = time.perf_counter()
    w.answer_retrain(True)
    step("Keep new head (reclassify)", t0)

    t0 = time.perf_counter()
    w.export_points(os.path.join(tmp, "nuclei.geojson"))
    step("export QuPath GeoJSON", t0)

    t0 = time.perf_counter()
    w.run_detection()
    settle(0.5)
    w.cancel()
    _wait(app, lambda: not w.is_busy())
    step("second detection, Cancel after 0.5 s", t0)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tiles": args.tiles, "rows": rows}, fh, indent=1)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
