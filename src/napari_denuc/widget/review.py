"""The review queue: least-confident unreviewed nucleus first, centred and selected."""

from __future__ import annotations

import numpy as np

from . import edits as E
from . import layer as L

REVIEW_SCREEN_PX_PER_UM = 6.0  # zoom of "Review next": a 7 µm nucleus is about 40 screen pixels


def _camera(viewer):
    """napari 0.9 moved the camera to ``viewer.scene.camera`` (``viewer.camera`` is deprecated)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class ReviewMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _review_filter(self):
        t = self.review_filter.currentText()
        return None if t == "all classes" else t

    def _update_review_label(self, lyr=None):
        if lyr is None or not len(lyr.data):
            self.review_label.setText("")
            return
        f = lyr.features
        _, reviewed = L.flags(f, len(f))
        _, margin = E.next_to_review(f, L.class_names(lyr), self._review_filter())
        nxt = "nothing left to review" if margin is None and not (~reviewed).any() else (
            f"next confidence {margin:.2f}" if margin is not None else "next: no probabilities")
        self.review_label.setText(f"reviewed {int(reviewed.sum())} / {len(f)}, {nxt}")

    def review_next(self, back: bool = False, lyr=None):
        """Centre on the least-confident unreviewed nucleus and select it (``back``: the previous one)."""
        lyr = self._resolve(lyr)
        if lyr is None or not len(lyr.data):
            self._set_status("Run Detect & classify first.")
            return None
        f = lyr.features
        nids = np.asarray(f["nid"])
        if back:
            trail = self._review["trail"]
            while trail:
                nid = trail.pop()
                if nid != self._review["nid"] and nid in nids:
                    i = int(np.flatnonzero(nids == nid)[0])
                    break
            else:
                self._set_status("No earlier nucleus in this review.")
                return None
        else:
            i, _ = E.next_to_review(f, L.class_names(lyr), self._review_filter())
            if i is None:
                self._set_status("Every nucleus" + (f" of {self._review_filter()}" if self._review_filter() else "") + " is reviewed.")
                self._review["nid"] = None
                return None
            if self._review["nid"] is not None:
                self._review["trail"].append(self._review["nid"])
        self._review["nid"] = int(nids[i])
        self._focus(lyr, i)
        self._update_review_label(lyr)
        return i

    def _focus(self, lyr, i: int):
        rc = np.asarray(lyr.data[i], dtype=float)[-2:]
        world = rc * np.asarray(lyr.scale)[-2:] + np.asarray(lyr.translate)[-2:]
        cam = _camera(self.viewer)
        cam.center = tuple(world)
        mpp = float(self.mpp_spin.value())
        zoom = REVIEW_SCREEN_PX_PER_UM * mpp / float(np.asarray(lyr.scale)[-1])
        cam.zoom = max(cam.zoom, zoom)
        with self._quiet():
            lyr.selected_data = {i}
        if self.viewer.layers.selection.active is None or L.token_of(self.viewer.layers.selection.active) != L.token_of(lyr):
            self.viewer.layers.selection.active = lyr
        if lyr.mode != "select":
            lyr.mode = "select"

    def _advance_review(self, lyr, sel):
        """1-9 or r on the nucleus under review answers it: go to the next one."""
        nid = self._review["nid"]
        if nid is None or len(sel) != 1:
            return
        if int(np.asarray(lyr.features["nid"])[sel[0]]) == nid:
            self.review_next(lyr=lyr)
