"""Import and export of nuclei (QuPath GeoJSON, CSV), with their dialogs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QFileDialog, QMessageBox

from ..errors import DenucError
from . import edits as E
from . import layer as L


class TransferMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def export_points(self, path, lyr=None) -> Path:
        from ..io.points import write_points

        lyr = self._resolve(lyr)
        if lyr is None:
            raise DenucError("nothing to export: run Detect & classify or import points first")
        self._flush_moves()
        return write_points(path, L.layer_to_detections(lyr))

    def import_points(self, path, mode: str | None = None, image_layer=None):
        """Read a GeoJSON/CSV point file into the current image's points layer.

        ``mode`` "replace" or "merge"; None asks when the layer already holds nuclei.
        One undoable action either way.
        """
        from ..io.points import read_points

        image_layer = image_layer or self.image_layer()
        if image_layer is None:
            raise DenucError("open the image these nuclei belong to first, then import")
        det = read_points(path)
        # A file made for a larger image (a whole slide, a bigger tile): only the nuclei on this one.
        on = self.on_image(image_layer, det.xy)
        n_off = int((~on).sum())
        if n_off == len(det) and n_off:
            raise DenucError(f"none of its {n_off} nuclei lie on {image_layer.name}: is {Path(path).name} the file for another image?")
        det = det.take(on)
        src = getattr(det, "source", None)
        rev = getattr(det, "reviewed", None)
        lyr = self.points_layer(image_layer) or self._maybe_restore(image_layer)  # a deleted layer's saved work
        if lyr is not None and len(lyr.data) and mode is None:
            mode = self._ask_import_mode(Path(path).name, len(lyr.data))
            if mode is None:
                return None
        mode = mode or "replace"
        if mode not in ("replace", "merge"):
            raise DenucError(f"import mode must be 'replace' or 'merge', not {mode!r}")
        if lyr is None:
            from ..results import Detections

            # the head's class order first (keys 1-9 and retraining follow it), then the file's others
            pipe = self.pipeline
            base = tuple(pipe.class_names) if pipe is not None and pipe.head is not None else ()
            base_colors = tuple(pipe.class_colors) if base else ()
            if not base or not set(det.class_names) & set(base):
                base, base_colors = det.class_names, det.class_colors
            lyr = self._new_layer(image_layer, Detections(np.zeros((0, 2)), [], [], base, base_colors))
        self._begin_step(lyr)
        det = self._classes_onto_layer(lyr, det)
        mpp = float(self.mpp_spin.value())
        d, f, nxt, n_added, n_skipped = E.import_table(
            lyr.data, lyr.features, det, mode, radius_px=float(self.nms_spin.value()) / mpp,
            next_nid=self._next_nid(lyr), source=src, reviewed=rev,
        )
        self._set_next_nid(lyr, nxt)
        self._write(lyr, data=d, features=f)
        self._record(lyr, f"import ({mode})")
        self._sync_classes()
        msg = f"Imported {n_added} nuclei from {Path(path).name} ({mode})."
        if n_off:
            msg = f"{msg[:-1]}; skipped {n_off} outside the image."
        if n_skipped:
            msg += f" {n_skipped} fell on your edited or reviewed nuclei and were skipped."
        self._set_status(msg, L.token_of(lyr))
        return lyr

    def _ask_import_mode(self, name, n):
        box = QMessageBox(self)
        box.setWindowTitle("Import nuclei")
        box.setText(f"The layer already holds {n} nuclei. Replace them with {name}, or merge {name} into them?")
        rep = box.addButton("Replace", QMessageBox.DestructiveRole)
        mer = box.addButton("Merge", QMessageBox.AcceptRole)
        box.addButton(QMessageBox.Cancel)
        box.exec_()
        return {rep: "replace", mer: "merge"}.get(box.clickedButton())

    def _export_dialog(self):
        path, chosen = QFileDialog.getSaveFileName(self, "Export nuclei", "", "QuPath GeoJSON (*.geojson);;CSV (*.csv)")
        if path and not Path(path).suffix:  # a name typed without one: QuPath recognises files by their suffix
            path += ".csv" if chosen.startswith("CSV") else ".geojson"
        if path:
            try:
                p = self.export_points(path)
                self._set_status(f"Exported to {p}")
            except DenucError as exc:
                show_error(str(exc))
            except OSError as exc:  # a read-only share, a full disk: the user's to fix, in one line
                msg = f"Could not export to {path}: {exc.strerror or exc}. Choose another folder."
                self._set_status(msg)
                show_error(msg)

    def _import_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Import nuclei", "", "Points (*.geojson *.json *.geojson.gz *.csv)")
        if path:
            try:
                self.import_points(path)
            except DenucError as exc:
                self._set_status(str(exc))
                show_error(str(exc))
            except OSError as exc:  # unreadable (permissions, a share gone): one line, nothing changed
                msg = f"Could not read {path}: {exc.strerror or exc}."
                self._set_status(msg)
                show_error(msg)
