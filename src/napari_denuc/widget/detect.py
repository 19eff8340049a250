"""Detect & classify: the region to run on, the image level, the run in a worker, and merging
its result into the nuclei layer.
"""

from __future__ import annotations

import time

import numpy as np
from napari.utils.notifications import show_error, show_warning

from ..errors import DenucError
from ..geometry import rescale_points
from . import edits as E
from . import layer as L
from .coords import box_rc_to_xy, rc_to_xy
from .panel import SCOPES

TAU_FLOOR_BELOW = 0.25  # detect down to tau - 0.25 so the threshold can move without re-running


MAX_REGION_PIXELS = 8192 * 8192  # beyond this (a whole slide), the widget asks for a region; the CLI tiles slides


class DetectMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _region(self, image_layer):
        """(x0, y0, x1, y1) in full-resolution pixels, a polygon in (x, y) or None, per the scope choice."""
        scope = self.scope_combo.currentText()
        if scope == SCOPES[0]:
            return None, None
        if scope == SCOPES[1]:
            return self._visible_box(image_layer), None
        shapes = [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Shapes" and len(lyr.data)]
        if not shapes:
            raise DenucError("no Shapes layer with a shape: draw a rectangle or polygon around the region, then run")
        active = self.viewer.layers.selection.active
        sl = next((s for s in shapes if active is not None and s.name == active.name), shapes[-1])
        idx = sorted(sl.selected_data) or [0]
        verts = np.asarray(sl.data[idx[0]], dtype=float)[:, -2:]
        world = verts * np.asarray(sl.scale)[-2:] + np.asarray(sl.translate)[-2:]
        rc = (world - np.asarray(image_layer.translate)[-2:]) / np.asarray(image_layer.scale)[-2:]
        poly_xy = rc_to_xy(rc)
        return box_rc_to_xy(rc[:, 0].min(), rc[:, 1].min(), rc[:, 0].max(), rc[:, 1].max()), poly_xy

    @staticmethod
    def _visible_box(image_layer):
        """(x0, y0, x1, y1) in full-resolution pixels: the image layer's visible corners (public API)."""
        corners = np.asarray(image_layer.corner_pixels, dtype=float)[:, -2:]  # in its current data level
        if getattr(image_layer, "multiscale", False):
            factor = np.asarray(image_layer.downsample_factors[image_layer.data_level], dtype=float)[-2:]
            corners = corners * factor
        (r0, c0), (r1, c1) = corners
        return box_rc_to_xy(r0 - 0.5, c0 - 0.5, r1 + 0.5, c1 + 0.5)

    @staticmethod
    def _level_for(image_layer, model_mpp: float, mpp: float):
        """(array, factor): the multiscale level nearest the model's mpp (factor = full-res px per level px)."""
        if not getattr(image_layer, "multiscale", False):
            return image_layer.data, 1.0
        levels = list(image_layer.data)

        def height(a):
            return a.shape[-3] if a.ndim >= 3 and a.shape[-1] in (3, 4) else a.shape[-2]

        h0 = height(levels[0])
        best, best_f = levels[0], 1.0
        for lev in levels:
            f = h0 / height(lev)
            if abs(np.log(mpp * f / model_mpp)) < abs(np.log(mpp * best_f / model_mpp)):
                best, best_f = lev, f
        return best, best_f

    def run_detection(self):
        """Detect & classify (``Pipeline.run``) in a worker; the result becomes or merges into the points layer."""
        if self._worker is not None:
            return
        image_layer = self.image_layer()
        if image_layer is None:
            show_warning("Open an H&E image first (File > Open Sample > DeNuC for the sample tile).")
            return
        self._t_press = time.perf_counter()
        try:
            box, poly = self._region(image_layer)
        except DenucError as exc:
            self._set_status(str(exc))
            show_error(str(exc))
            return
        mpp = float(self.mpp_spin.value())
        tau_user = float(self.tau_spin.value()) if self._params_from_user or self._tau_restored else None
        nms = float(self.nms_spin.value()) if self._params_from_user else None
        data = image_layer.data
        multiscale = bool(getattr(image_layer, "multiscale", False))
        image_key = self._image_key(image_layer)

        def job():
            pipe = self._ensure_pipeline()
            model_mpp = float(getattr(pipe.detector, "mpp", 0.5) or 0.5)
            arr, f = self._level_for(image_layer, model_mpp, mpp) if multiscale else (data, 1.0)
            tau = float(pipe.tau) if tau_user is None else tau_user
            floor = max(0.05, min(tau, tau - TAU_FLOOR_BELOW))
            h, w = arr.shape[0], arr.shape[1]
            x0 = y0 = 0
            x1, y1 = w, h
            if box is not None:
                # the full-resolution box in level pixels (pixel-centre rule), widened to whole pixels
                lo = rescale_points(np.array(box[:2]) + 0.5, 1.0 / f) - 0.5 if f != 1 else np.array(box[:2])
                hi = rescale_points(np.array(box[2:]) - 0.5, 1.0 / f) + 0.5 if f != 1 else np.array(box[2:])
                x0, y0 = max(0, int(np.floor(lo[0]))), max(0, int(np.floor(lo[1])))
                x1, y1 = min(w, int(np.ceil(hi[0]))), min(h, int(np.ceil(hi[1])))
                if x1 <= x0 or y1 <= y0:
                    raise DenucError("the region lies outside the image; move the view or the shape onto the image")
            if (y1 - y0) * (x1 - x0) > MAX_REGION_PIXELS:
                raise DenucError(
                    f"the region is {x1 - x0} x {y1 - y0} px at the model's resolution, too large to hold in memory here; "
                    "choose 'Current field of view' or 'Inside Shapes ROI', or run denuc-predict on the whole slide"
                )
            crop = np.asarray(arr[y0:y1, x0:x1])
            det, feats = pipe.run(crop, mpp * f, progress=self._progress_cb, tau=floor, nms_um=nms, return_features=True)
            det.xy = rescale_points(det.xy + (x0, y0), f)
            region = None
            if box is not None:
                c0 = rescale_points(np.array([x0, y0], float) - 0.5, f) + 0.5
                c1 = rescale_points(np.array([x1, y1], float) - 0.5, f) + 0.5
                region = (c0[0] - 0.5, c0[1] - 0.5, c1[0] - 0.5, c1[1] - 0.5)
            if poly is not None and len(det):
                keep = E.in_region(det.xy, None, poly)
                det, feats = E.subset(det, keep), (None if feats is None else feats[keep])
            key = (image_key, getattr(pipe.encoder, "id", ""), round(mpp, 6), f)
            return E.Candidates(det, feats, floor, region, poly, head=pipe.head, mpp=mpp), tau, key

        self._job_image = image_layer
        title = "Loading models, then detecting" if self.pipeline is None else "Detecting and classifying nuclei"
        self._start_worker(job, self._on_detect_done, title)

    def _on_detect_done(self, result):
        cands, tau, key = result
        image_layer = self._job_image
        pipe = self.pipeline
        self._show_pipeline(pipe)
        if cands.features is not None:
            self.features_memo.put(key, cands.det.xy, cands.features)
        lyr = self.points_layer(image_layer)
        if lyr is None:  # a deleted nuclei layer left its corrections on disk: merge into them, never over them
            lyr = self._maybe_restore(image_layer)
        if lyr is None:
            empty = E.subset(cands.det, np.zeros(len(cands.det), bool))
            lyr = self._new_layer(image_layer, empty)
        token = L.token_of(lyr)
        self._candidates[token] = cands
        self._tau_shown[token] = tau
        det, _ = cands.select(tau)
        self._begin_step(lyr)
        names_layer = L.class_names(lyr)
        det = self._classes_onto_layer(lyr, det)
        mpp = float(self.mpp_spin.value())
        d, f, nxt, kept = E.merge_detections(
            lyr.data, lyr.features, det, region=cands.region, poly=cands.poly,
            radius_px=float(self.nms_spin.value()) / mpp,
            tombstones=lyr.metadata["denuc"].get("tombstones") or (), next_nid=self._next_nid(lyr), reclassify=True,
        )
        self._set_next_nid(lyr, nxt)
        self._write(lyr, data=d, features=f)
        self._record(lyr, "detect")
        if tuple(names_layer) != tuple(L.class_names(lyr)):
            self._sync_classes()
        self.progress_bar.setValue(100)
        self._sync_classes()
        self.viewer.layers.selection.active = lyr
        self.timings["detect_to_layer_s"] = time.perf_counter() - self._t_press
        msg = f"{len(det)} nuclei detected at τ {tau:.2f} in {self.timings['detect_to_layer_s']:.1f} s."
        if kept:
            msg += f" Kept your {kept} reviewed or edited nuclei."
        n_tomb = len(lyr.metadata["denuc"].get("tombstones") or [])
        if n_tomb:
            msg += f" {n_tomb} deleted nuclei stay deleted."
        self._set_status(msg, token)
