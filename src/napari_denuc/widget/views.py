"""What the nuclei layer and the dock show: colours, the legend and class list, hidden classes,
confidence view, marker size.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QCheckBox

from . import layer as L


class ViewsMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _colours(self, lyr, rows=None):
        """(face, border) RGBA arrays: class colours (or confidence) and the reviewed border."""
        f = lyr.features
        idx = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        reviewed = np.asarray(f["reviewed"], dtype=bool)[idx]
        border = np.where(reviewed[:, None], np.array(L.REVIEWED_BORDER), np.array(L.UNREVIEWED_BORDER))
        if self.confidence_check.isChecked():
            from napari.utils.colormaps import ensure_colormap

            conf = np.asarray(f["confidence"], dtype=np.float32)[idx] if "confidence" in f else np.ones(len(border))
            face = np.asarray(ensure_colormap("plasma").map(np.clip((conf - 0.3) / 0.7, 0, 1)), dtype=np.float32)
            face[:, 3] = L.FACE_ALPHA + 0.25
        else:
            names = L.class_names(lyr)
            table = np.array([L.rgba(c, L.FACE_ALPHA) for c in L.display_colors(names, L.class_colors(lyr))], np.float32)
            codes = np.asarray(f["class"].cat.codes, dtype=np.int64)[idx]
            face = table[np.clip(codes, 0, len(table) - 1)]
        return face, border.astype(np.float32)

    def _sync_style(self, lyr, rows=None):
        """Colour the layer in napari's direct mode, computed here with numpy (napari's cycle
        mode maps every point in Python on each change)."""
        n = len(lyr.data)
        if n == 0:
            return
        if rows is not None and lyr.face_color_mode == "direct" and len(lyr.face_color) == n:
            face, border = self._colours(lyr, rows)
            lyr.face_color[rows] = face  # in place, then one redraw
            lyr.border_color[rows] = border
            lyr.refresh()
        else:
            face, border = self._colours(lyr)
            lyr.face_color = face
            lyr.border_color = border
        self._apply_hidden(lyr)

    def _refresh_views(self):
        if [self.class_combo.itemText(i) for i in range(self.class_combo.count())] != list(self.class_names()):
            self._fill_class_lists()  # another image's nuclei layer, with other classes, is worked on now
        lyr = self.points_layer()
        self._update_legend(lyr)
        self._update_review_label(lyr)
        self._update_tau_count(lyr)
        h = self._histories.get(L.token_of(lyr)) if lyr is not None else None
        self.undo_btn.setEnabled(bool(h and h.undo_stack))
        self.redo_btn.setEnabled(bool(h and h.redo_stack))
        if h and h.undo_stack:
            self.undo_btn.setToolTip(f"Undo {h.undo_stack[-1].label} (Ctrl+Z)")

    def class_names(self) -> tuple[str, ...]:
        lyr = self.points_layer()
        if lyr is not None:
            return L.class_names(lyr)
        if self.pipeline is not None:
            return tuple(self.pipeline.class_names) + tuple(c for c in self.extra_classes if c not in self.pipeline.class_names)
        return tuple(self.extra_classes) or ("nucleus",)

    def _sync_classes(self):
        self._fill_class_lists()
        self._refresh_views()

    def _fill_class_lists(self):
        """The class drop-down and the review filter list the classes of the layer worked on."""
        names = list(self.class_names())
        cur = self.class_combo.currentText()
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(names)
        if cur in names:
            self.class_combo.setCurrentText(cur)
        self.class_combo.blockSignals(False)
        fcur = self.review_filter.currentText()
        self.review_filter.blockSignals(True)
        self.review_filter.clear()
        self.review_filter.addItems(["all classes", *names])
        if fcur in names:
            self.review_filter.setCurrentText(fcur)
        self.review_filter.blockSignals(False)
        self._on_current_class_changed(self.class_combo.currentText())

    def _on_current_class_changed(self, name: str):
        lyr = self.points_layer()
        if lyr is not None and name in L.class_names(lyr):
            lyr.feature_defaults = L.feature_defaults(L.class_names(lyr), name)

    def _update_legend(self, lyr=None):
        names = L.class_names(lyr) if lyr is not None else ()
        colors = L.display_colors(names, L.class_colors(lyr)) if lyr is not None else ()
        if tuple(self.legend_checks) != tuple(names):
            for cb in self.legend_checks.values():
                self.legend_grid.removeWidget(cb)
                cb.deleteLater()
            self.legend_checks = {}
            for k, name in enumerate(names):
                cb = QCheckBox()
                cb.setChecked(name not in self._hidden)
                cb.toggled.connect(lambda on, n=name: self._toggle_class(n, on))
                r, g, b = colors[k]
                cb.setStyleSheet(f"QCheckBox {{ color: rgb({r},{g},{b}); font-weight: bold; }}")
                cb.setToolTip(f"Show or hide {name}; key {k + 1} sets it" if k < 9 else f"Show or hide {name}")
                self.legend_checks[name] = cb
                self.legend_grid.addWidget(cb, k, 0)
        if lyr is None:
            self.legend.setText("")
            return
        cnt = L.counts(lyr)
        for k, name in enumerate(names):
            self.legend_checks[name].setText(f"{k + 1}  {name}: {cnt[name]}" if k < 9 else f"{name}: {cnt[name]}")
        f = lyr.features
        edited, reviewed = L.flags(f, len(f))
        self.legend.setText(f"total {len(lyr.data)} · edited {int(edited.sum())} · reviewed {int(reviewed.sum())}")

    def _toggle_class(self, name, on):
        (self._hidden.discard if on else self._hidden.add)(name)
        lyr = self.points_layer()
        if lyr is not None:
            self._apply_hidden(lyr)

    def _apply_hidden(self, lyr):
        if not len(lyr.data):
            return
        if not self._hidden:
            if not np.all(lyr.shown):
                lyr.shown = np.ones(len(lyr.data), bool)
            return
        cls = np.asarray(lyr.features["class"].astype(str))
        lyr.shown = ~np.isin(cls, list(self._hidden))

    def _on_confidence_view(self, on):
        lyr = self.points_layer()
        if lyr is not None:
            with self._quiet():
                self._sync_style(lyr)

    def _apply_marker_size(self):
        lyr = self.points_layer()
        if lyr is not None and len(lyr.data):
            with self._quiet():
                lyr.size = L.point_size(float(self.mpp_spin.value()), float(self.size_spin.value()))
                lyr.current_size = L.point_size(float(self.mpp_spin.value()), float(self.size_spin.value()))
