"""A small, fast stand-in for the DeNuC pipeline, for widget tests that do not test the models.

Detections are the sample tile's ground-truth nuclei; features are colour statistics around
each point (so a real LinearHead can learn from them); the head is a real LinearHead.
"""

from __future__ import annotations

import numpy as np

from napari_denuc.results import Detections

CLASSES = ("lymphocyte", "tumor", "stromal")


class FakeDetector:
    tau = 0.5
    nms_um = 4.0
    mpp = 0.5

    def __init__(self, xy):
        self.xy = np.asarray(xy, dtype=np.float64)


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
        h, w = image.shape[:2]
        x = np.clip(np.round(xy[:, 0]).astype(int), 2, w - 3)
        y = np.clip(np.round(xy[:, 1]).astype(int), 2, h - 3)
        patch = np.stack([image[y + dy, x + dx].astype(np.float32) for dy in (-2, 0, 2) for dx in (-2, 0, 2)], 1)
        f = np.concatenate([patch.mean(1), patch.std(1), patch.min(1)[:, :2]], 1) / 255.0
        return f.astype(np.float32)


class FakePipeline:
    def __init__(self, gt_xy, gt_labels, head=None, slow_s=0.0):
        from napari_denuc.head import LinearHead

        self.detector = FakeDetector(gt_xy)
        self.encoder = FakeEncoder()
        self.gt_labels = np.asarray(gt_labels)
        self.slow_s = slow_s
        if head is None:
            head = LinearHead(8, CLASSES, encoder_id="fake", mpp=0.5)
        self.head = head

    tau = 0.5
    nms_um = 4.0

    @property
    def class_names(self):
        return tuple(self.head.class_names)

    def detect(self, image, mpp, tau=None, nms_um=None, progress=None):
        import time

        h, w = image.shape[:2]
        xy = self.detector.xy
        keep = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        steps = 10
        for i in range(steps):
            if self.slow_s:
                time.sleep(self.slow_s / steps)
            if progress:
                progress(i + 1, steps)
        return xy[keep], np.full(int(keep.sum()), 0.9, np.float32)

    @property
    def class_colors(self):
        return tuple(self.head.class_colors)

    def run(self, image, mpp, progress=None, roi=None, tau=None, nms_um=None):
        xy, scores = self.detect(image, mpp, progress=progress)
        probs = self.head.predict_proba(self.encoder.features_at(image, xy, mpp))
        return Detections(xy, scores, probs.argmax(1), self.head.class_names, self.head.class_colors, probs)

    def features_at(self, image, xy, mpp, progress=None):
        return self.encoder.features_at(image, xy, mpp)
