"""Small, fast stand-ins for the detector and encoder, composed by the real ``Pipeline``.

The widget tests build ``Pipeline(FakeDetector, FakeEncoder, head)``, so the widget runs the
library's own ``Pipeline.run`` (RGBA/16-bit conversion, ROI, background rejection,
``return_features``) and cannot drift from it.

- ``FakeDetector`` "detects" the sample tile's ground-truth nuclei plus a few decoys, each
  with a fixed score, then thresholds at ``tau`` and runs the library's greedy NMS, like
  the real detector.
- ``FakeEncoder`` gives colour statistics around each point (a real LinearHead learns from them).
"""

from __future__ import annotations

import time

import numpy as np

CLASSES = ("lymphocyte", "tumor", "stromal")


class FakeDetector:
    tau = 0.5
    nms_um = 4.0
    mpp = 0.5

    def __init__(self, xy, n_decoys: int = 40, seed: int = 0):
        rng = np.random.default_rng(seed)
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        # ground truth scores 0.45-1.0; decoys near real nuclei score 0.2-0.6
        decoys = xy[rng.integers(0, len(xy), n_decoys)] + rng.normal(0, 2.5, (n_decoys, 2))
        self.xy = np.concatenate([xy, decoys])
        self.scores = np.concatenate([rng.uniform(0.45, 1.0, len(xy)), rng.uniform(0.2, 0.6, n_decoys)]).astype(np.float32)
        self.slow_s = 0.0
        self.calls = 0

    def detect(self, image, mpp, tau=None, nms_um=None, progress=None, **_):
        from napari_denuc.detection.infer import point_nms

        self.calls += 1
        tau = self.tau if tau is None else tau
        nms_um = self.nms_um if nms_um is None else nms_um
        h, w = image.shape[:2]
        xy, sc = self.xy, self.scores
        keep = (xy[:, 0] >= -0.5) & (xy[:, 0] <= w - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= h - 0.5) & (sc > tau)
        xy, sc = xy[keep], sc[keep]
        steps = 10
        for i in range(steps):
            if self.slow_s:
                time.sleep(self.slow_s / steps)
            if progress:
                progress(i + 1, steps)
        k = point_nms(xy, sc, nms_um / mpp)
        return xy[k], sc[k]


class FakeEncoder:
    id = "fake"
    feature_dim = 8
    mpp = 0.5

    def __init__(self):
        self.calls = 0
        self.n_points = 0

    def features_at(self, image, xy, mpp, progress=None):
        self.calls += 1
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        self.n_points += len(xy)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, "encoders get RGB uint8"
        h, w = image.shape[:2]
        x = np.clip(np.round(xy[:, 0]).astype(int), 2, w - 3)
        y = np.clip(np.round(xy[:, 1]).astype(int), 2, h - 3)
        patch = np.stack([image[y + dy, x + dx].astype(np.float32) for dy in (-2, 0, 2) for dx in (-2, 0, 2)], 1)
        f = np.concatenate([patch.mean(1), patch.std(1), patch.min(1)[:, :2]], 1) / 255.0
        if progress:
            progress(1, 1)
        return f.astype(np.float32)


def fake_head(gt_xy=None, gt_labels=None, image=None):
    """A LinearHead for the fake encoder; fitted on the ground truth when given (a sensible start)."""
    from napari_denuc.head import LinearHead

    head = LinearHead(8, CLASSES, encoder_id="fake", mpp=0.5)
    if gt_xy is not None and image is not None:
        feats = FakeEncoder().features_at(image, gt_xy, 0.5)
        idx = np.arange(0, len(gt_xy), 2)  # half the nuclei: a decent but imperfect head
        head.fit(feats[idx], np.asarray(gt_labels)[idx], epochs=60)
    return head


def fake_pipeline(gt_xy, gt_labels, image=None, head=None):
    from napari_denuc.pipeline import Pipeline

    return Pipeline(FakeDetector(gt_xy), FakeEncoder(), head if head is not None else fake_head(gt_xy, gt_labels, image))


# ---------------------------------------------------------------- a user at the canvas
def camera(viewer):
    """napari 0.9 moved the camera to ``viewer.scene.camera``; older versions have ``viewer.camera``."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class User:
    """Real Qt mouse and key events on the napari canvas (what a pathologist's hand does)."""

    def __init__(self, viewer, qtbot):
        self.viewer = viewer
        self.qtbot = qtbot
        self.canvas = viewer.window._qt_viewer.canvas  # tests may look inside napari; the widget may not

    @property
    def native(self):
        return self.canvas.native

    def screen(self, rc):
        from qtpy.QtCore import QPoint

        h, w = self.native.height(), self.native.width()
        cam = camera(self.viewer)
        s = (np.asarray(rc, float) - np.asarray(cam.center[-2:])) * cam.zoom + np.array([h, w]) / 2
        return QPoint(round(float(s[1])), round(float(s[0])))

    def look_at(self, rc, zoom=4.0):
        camera(self.viewer).center = tuple(float(v) for v in rc)
        camera(self.viewer).zoom = zoom
        self.qtbot.wait(30)

    def click(self, rc, modifier=None):
        from qtpy.QtCore import Qt

        self.look_at(rc)
        self.native.setFocus()
        self.qtbot.mouseClick(self.native, Qt.LeftButton, modifier or Qt.NoModifier, self.screen(rc))
        self.qtbot.wait(20)

    def drag(self, rc0, rc1):
        from qtpy.QtCore import QEvent, QPointF, Qt
        from qtpy.QtGui import QMouseEvent
        from qtpy.QtWidgets import QApplication

        self.look_at(rc0)
        p0, p1 = self.screen(rc0), self.screen(rc1)

        def send(kind, p, buttons):
            ev = QMouseEvent(kind, QPointF(p), Qt.LeftButton, buttons, Qt.NoModifier)
            QApplication.sendEvent(self.native, ev)

        send(QEvent.MouseButtonPress, p0, Qt.LeftButton)
        for t in np.linspace(0, 1, 6)[1:]:
            p = p0 + (p1 - p0) * float(t)
            send(QEvent.MouseMove, p, Qt.LeftButton)
            self.qtbot.wait(30)  # napari handles drag moves from the event loop
        send(QEvent.MouseButtonRelease, p1, Qt.NoButton)
        self.qtbot.wait(20)

    def key(self, key, modifier=None):
        from qtpy.QtCore import Qt

        self.native.setFocus()
        self.qtbot.keyClick(self.native, key, modifier or Qt.NoModifier)
        self.qtbot.wait(10)

    def add_at(self, layer, rc):
        layer.mode = "add"
        self.click(rc)
        layer.mode = "select"

    def rename(self, layer, name):
        """Double-click the layer's name in the layer list, type ``name``, press Enter."""
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QLineEdit

        view = self.viewer.window._qt_viewer.layers
        model = view.model()
        row = next(r for r in range(model.rowCount()) if model.index(r, 0).data() == layer.name)
        rect = view.visualRect(model.index(row, 0))

        def editor():
            return next((e for e in view.findChildren(QLineEdit) if e.isVisible()), None)

        for _ in range(3):  # the first double-click may only select the row
            self.qtbot.mouseDClick(view.viewport(), Qt.LeftButton, Qt.NoModifier, rect.center())
            self.qtbot.wait(50)
            if editor() is not None:
                break
        ed = editor()
        assert ed is not None, "the layer list did not open its name editor"
        ed.selectAll()
        self.qtbot.keyClicks(ed, name)
        self.qtbot.keyClick(ed, Qt.Key_Return)
        self.qtbot.wait(20)

    def select(self, layer, rc, extend=False):
        from qtpy.QtCore import Qt

        layer.mode = "select"
        self.click(rc, Qt.ShiftModifier if extend else None)


def empty_spots(xy, k, shape=(1000, 1000), min_dist=25.0, seed=1):
    """``k`` (row, col) positions at least ``min_dist`` px from every point of ``xy`` (x, y)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    tree = cKDTree(np.asarray(xy)[:, ::-1])
    out = []
    while len(out) < k:
        rc = rng.uniform(40, np.array(shape) - 40)
        if tree.query(rc)[0] > min_dist and all(np.hypot(*(rc - o)) > min_dist for o in out):
            out.append(rc)
    return np.array(out)
