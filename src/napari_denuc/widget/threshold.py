"""The threshold τ: re-thresholding the cached candidates, and fitting τ to a corrected view."""

from __future__ import annotations

import numpy as np

from . import edits as E
from . import layer as L
from .coords import rc_to_xy

MIN_FIT_NUCLEI = 30  # fewer corrected nuclei in view than this say little about the right threshold


class ThresholdMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _show_tau(self, tau: float):
        """Show ``tau`` on the control without re-thresholding (its valueChanged would)."""
        self.tau_spin.blockSignals(True)
        self.tau_spin.setValue(float(tau))
        self.tau_spin.blockSignals(False)

    def _update_tau_count(self, lyr=None):
        c = self._candidates.get(L.token_of(lyr)) if lyr is not None else None
        if c is None:
            self.tau_count.setText("")
            return
        self.tau_count.setText(f"{c.count(self.tau_spin.value())} kept (candidates cached down to τ {c.tau_floor:.2f})")

    def _on_tau_changed(self, value):
        if self._setting_params:
            return
        self._params_from_user = True
        self.set_tau(float(value))

    def set_tau(self, tau: float):
        """Re-threshold the cached candidates of the current layer (no network run); undoable as one step."""
        lyr = self.points_layer()
        c = self._candidates.get(L.token_of(lyr)) if lyr is not None else None
        if c is None:  # restored or imported nuclei: no detection cached in this session yet
            if lyr is not None:
                self._set_status(f"τ {tau:.2f} applies at the next Detect & classify (no detection cached for these nuclei yet).")
            return
        if tau < c.tau_floor - 1e-9:
            self._set_status(f"τ {tau:.2f} is below the cached {c.tau_floor:.2f}: press Detect & classify to search again.")
            return
        # a head kept or chosen since Detect & classify classifies what τ brings in
        c = self._candidates[L.token_of(lyr)] = c.with_head(getattr(self.pipeline, "head", None))
        h = self._begin_step(lyr)
        top = h.undo_stack[-1] if h.undo_stack and h.undo_stack[-1].label == "threshold" else None
        tau_before = top.extra["tau"][0] if top is not None else self._tau_shown.get(L.token_of(lyr), tau)
        h.pop_top_if("threshold", lyr, self._apply_state)  # consecutive threshold moves are one step
        det, _ = c.select(tau)
        det = self._classes_onto_layer(lyr, det)  # the head's classes the layer lacks (e.g. a class kept on another image)
        mpp = float(self.mpp_spin.value())
        d, f, nxt, _ = E.merge_detections(
            lyr.data, lyr.features, det, region=c.region, poly=c.poly, radius_px=float(self.nms_spin.value()) / mpp,
            tombstones=lyr.metadata["denuc"].get("tombstones") or (), next_nid=self._next_nid(lyr),
        )
        self._set_next_nid(lyr, nxt)
        self._write(lyr, data=d, features=f)
        self._record(lyr, "threshold", extra={"tau": (tau_before, tau)})
        self._tau_shown[L.token_of(lyr)] = tau
        self._show_tau(tau)  # coalescing undid the previous step, which put its own τ back on the control
        self._set_status(f"τ = {tau:.2f}: {len(d)} nuclei.")

    def fit_tau_to_view(self):
        """Set τ to the threshold whose detections best match the nuclei in view as the user corrected them.

        A detector's scores shift at a site it never saw; a τ fitted to a corrected field of view
        lifts detection on the rest of the slide (``detection.tau_fit``). The nuclei in view are taken as
        the truth, so the user must have corrected all of them; at least one edit there is required.
        """
        from ..detection import tau_fit

        lyr, image_layer = self.points_layer(), self.image_layer()
        c = self._candidates.get(L.token_of(lyr)) if lyr is not None else None
        if c is None or image_layer is None:
            self._set_status("Detect & classify first, correct every nucleus in view, then fit τ.")
            return
        self._flush_moves()
        box = self._visible_box(image_layer)
        xy = rc_to_xy(lyr.data)
        truth = E.in_region(xy, box) & E.in_region(xy, c.region, c.poly)
        cand = E.in_region(c.det.xy, box) & E.in_region(c.det.xy, c.region, c.poly)
        edited, _ = L.flags(lyr.features, len(xy))
        tombs = np.asarray(lyr.metadata["denuc"].get("tombstones") or np.zeros((0, 2)), dtype=float).reshape(-1, 2)
        if not edited[truth].any() and not E.in_region(tombs, box).any():
            self._set_status("No corrections in view: add the nuclei the model missed and delete its false ones here first.")
            return
        if truth.sum() < MIN_FIT_NUCLEI:
            self._set_status(f"Only {int(truth.sum())} nuclei in view: fit τ on a corrected area with at least {MIN_FIT_NUCLEI}.")
            return
        current = round(float(self.tau_spin.value()), 2)
        taus = tuple(sorted({t for t in tau_fit.TAUS if t >= c.tau_floor - 1e-9} | {current}))
        counts = tau_fit.threshold_counts(c.det.xy[cand], c.det.scores[cand], xy[truth], tau_fit.MATCH_UM / c.mpp, taus)
        tau = tau_fit.best_tau(counts, taus, current=current)
        f1 = tau_fit.f1(counts)
        fit = f"detection F1 against your {int(truth.sum())} nuclei in view"
        if tau == current:
            self._set_status(f"τ {current:.2f} already fits best ({fit} {f1[taus.index(current)]:.3f}).")
            return
        self.tau_spin.setValue(tau)  # re-thresholds the cached candidates: one undo step
        self._set_status(f"τ {current:.2f} -> {tau:.2f}: {fit} {f1[taus.index(current)]:.3f} -> {f1[taus.index(tau)]:.3f}. "
                         f"The same on the command line: denuc-predict --tau {tau:.2f}")
