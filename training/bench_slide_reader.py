"""Benchmark: open a 67 MP pyramidal TIFF in napari through the DeNuC slide reader, as drag-and-drop does.

Measures the time from ``viewer.open(path)`` to the first rendered frame (a canvas screenshot)
and the RSS growth of the process over that span, plus the pixels read per pyramid level.
Run under a display (Xvfb):

    xvfb-run -a -s "-screen 0 1280x1024x24" python training/bench_slide_reader.py            # cold
    xvfb-run -a -s "-screen 0 1280x1024x24" python training/bench_slide_reader.py --warm-napari

Cold is the first layer of a fresh napari session: napari's own first-image costs (imports of
scipy.ndimage and pint for the thumbnail and transforms, about 1 s here) are included.
``--warm-napari`` first shows and removes a 64 x 64 numpy image, so those are paid before the
clock starts and the figure is the slide's own cost (reader imports included).
"""

import argparse
import json
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", default="/tmp/bench_slide_reader/67mp.tif")
    ap.add_argument("--size", type=int, default=8192, help="level-0 side when the slide is generated (8192^2 = 67 MP)")
    ap.add_argument("--warm-napari", action="store_true", help="pay napari's first-image costs before timing")
    args = ap.parse_args()
    path = Path(args.slide)
    if not path.is_file():
        from napari_denuc.wsi.synthetic import make_test_slide

        make_test_slide(path, args.size, mpp=0.25, seed=0)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_denuc import _slide_reader

    read = {}
    real = _slide_reader.LazyLevel.__getitem__

    def counting(self, key):
        out = real(self, key)
        read[self.level] = read.get(self.level, 0) + out.shape[0] * out.shape[1]
        return out

    _slide_reader.LazyLevel.__getitem__ = counting
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 900)  # a fixed window size for the benchmark only
    if args.warm_napari:
        import numpy as np

        viewer.add_image(np.zeros((64, 64, 3), np.uint8))
        viewer.screenshot(canvas_only=True)
        viewer.layers.clear()
    for _ in range(10):
        QApplication.processEvents()
    base = rss_mb()
    t0 = time.perf_counter()
    viewer.open(str(path), plugin="napari-denuc")
    viewer.screenshot(canvas_only=True)  # forces the first draw of the layer
    t_first = time.perf_counter() - t0
    growth = rss_mb() - base
    print(json.dumps({"slide": str(path), "warm_napari": args.warm_napari, "megapixels": round(viewer.layers[0].data[0].shape[0] * viewer.layers[0].data[0].shape[1] / 1e6, 1),
                      "seconds_to_first_display": round(t_first, 2), "rss_growth_mb": round(growth, 1),
                      "pixels_read_per_level": read}))
    viewer.close()


if __name__ == "__main__":
    main()
