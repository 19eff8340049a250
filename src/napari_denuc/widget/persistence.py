"""Nothing is lost: autosave, restore on opening, the project folder, and saving when the dock
closes (napari only unparents a closed dock's widget).
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QFileDialog

from . import layer as L
from . import session
from .coords import rc_to_xy

# token -> the widget that answers for that points layer: the newest one that adopted it. A widget
# whose dock was closed keeps saving its layers until another widget adopts them.
OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class PersistenceMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _choose_project(self):
        d = QFileDialog.getExistingDirectory(self, "Project folder (corrections and heads)")
        if d:
            self.set_project_dir(d)

    def set_project_dir(self, folder):
        """Keep corrections and heads in ``folder`` from now on, in later sessions too.

        Open layers move their corrections there at once (a later session looks there first);
        an open image without nuclei gets the corrections the folder holds for it.
        """
        self.project_dir = Path(folder)
        try:
            session.save_project_dir(self.project_dir)
        except OSError as exc:
            show_warning(f"could not remember the project folder for the next session: {exc}")
        for lyr in self.viewer.layers:
            token = L.token_of(lyr)
            info = self._infos.get(token)
            if info is not None:
                img = next((i for i in self._image_layers() if i.name == info["image"]), None)
                store = self._store_image_path(img) if img is not None else None
                base = session.corrections_path(info["image"], info["key"], store, self.project_dir)
                info["path"] = session.numbered(base, self._copy_number(base, token))
                lyr.metadata["denuc"]["corrections"] = str(info["path"])
                self._save_token(token, lyr)
        for img in self._image_layers():
            self._maybe_restore(img)
        self._set_status(f"Corrections and heads go to {folder}")

    def save_now(self):
        """Write the corrections of every changed DeNuC layer (atomic); called debounced after edits."""
        self._flush_moves()
        for token in list(self._dirty):
            lyr = self._layer_by_token(token)
            if lyr is not None:
                self._save_token(token, lyr)

    def _save_token(self, token, lyr):
        info = self._infos.get(token)
        self._dirty.discard(token)
        if info is None or OWNERS.get(token) is not self:  # another widget answers for it now
            return
        state = session.corrections_state(
            rc_to_xy(lyr.data) if len(lyr.data) else np.zeros((0, 2)),
            lyr.features,
            L.class_names(lyr),
            L.class_colors(lyr),
            info["key"],
            extra={"image": info["image"], "layer_name": lyr.name, "head": self.head_path, "tau": self._tau_shown.get(token),
                   "tombstones": list(lyr.metadata["denuc"].get("tombstones") or []),
                   "mpp_user": self._mpp_user.get(info["image"])},
        )
        try:
            session.save_corrections(info["path"], state)
        except OSError as exc:
            show_error(f"could not autosave corrections to {info['path']}: {exc}; choose a project folder")

    def _maybe_restore(self, image_layer):
        if image_layer.__class__.__name__ != "Image" or self.points_layer(image_layer) is not None:
            return None
        try:
            key = self._image_key(image_layer)
        except Exception:  # noqa: BLE001 (an unreadable image simply has nothing to restore)
            return None
        store = self._store_image_path(image_layer)
        base = session.corrections_path(image_layer.name, key, store, self.project_dir)
        k = self._copy_number(base)  # the same image already open with its nuclei: its next set of corrections
        root = base  # the folder the restored set is in
        path = session.numbered(root, k)
        state = session.load_corrections(path, key)
        if state is None and self.project_dir is not None:  # saved before a project folder was chosen
            root = session.corrections_path(image_layer.name, key, store, None)
            path = session.numbered(root, k)
            state = session.load_corrections(path, key)
        if state is None or (not state.get("xy") and not state.get("tombstones")):
            if k > 1:
                self._set_status(f"'{image_layer.name}' is an image already open with its nuclei: nuclei detected "
                                 f"here are saved separately, to {session.numbered(base, k).name}.")
            return None
        det, source, reviewed = session.state_to_detections_and_flags(state)
        self._restore_mpp(image_layer, state)
        lyr = self._new_layer(image_layer, det, source=source, reviewed=reviewed, state=state)
        self._restore_head_and_tau(lyr, state)
        self._sync_classes()
        n_edit = int((np.asarray(source) == "edited").sum())
        self._restored_note = f"Restored {len(det)} nuclei ({n_edit} edited) from {path}."
        self._notes.pop(L.token_of(lyr), None)  # the note names the file already
        more = session.numbered(root, k + 1)
        if more.is_file():  # saved while the image was open twice: it comes back with the next copy opened
            self._restored_note += f" Another set of corrections for this image is in {more.name}: open the image once more to see it."
        self._set_status(self._restored_note)
        return lyr

    def _restore_mpp(self, image_layer, state):
        """The resolution the user typed for this image, saved with its corrections."""
        mpp_user = state.get("mpp_user")
        if isinstance(mpp_user, (int, float)) and mpp_user > 0:
            self._mpp_user[image_layer.name] = float(mpp_user)
            if self.image_layer() is not None and self.image_layer().name == image_layer.name:
                self._on_image_changed(image_layer.name)

    def _restore_head_and_tau(self, lyr, state):
        """The head in use and the layer's τ, saved with its corrections."""
        head = state.get("head")
        if head and Path(head).is_file():
            self.set_head(head)
        tau = state.get("tau")
        if isinstance(tau, (int, float)) and 0 < tau < 1:  # e.g. fitted to a corrected view: the next detection uses it too
            self._tau_shown[L.token_of(lyr)] = float(tau)
            self._tau_restored = True
            if self._infos[L.token_of(lyr)]["image"] == self.image_combo.currentText():  # each image shows its own τ
                self._show_tau(tau)

    def _restore_settings_of_adopted(self, lyr, image_layer):
        """A layer adopted again (dock closed and reopened): the closed widget saved its head, τ and the
        typed resolution with the corrections; without them this widget would show (and autosave) the
        bundled head and an assumed resolution."""
        info = self._infos[L.token_of(lyr)]
        state = session.load_corrections(info["path"], info["key"])
        if state is not None:
            self._restore_mpp(image_layer, state)
            self._restore_head_and_tau(lyr, state)

    def closeEvent(self, event):  # Qt's name
        self.save_now()
        super().closeEvent(event)

    def event(self, ev):  # Qt's name
        # The dock's close button (napari's remove_dock_widget) only unparents this widget, which
        # stays alive and connected; opened again from the menu, a second widget would answer the
        # same layers (each resetting the other's defaults, both restoring the same corrections).
        if ev.type() == QEvent.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self._retire()
        return super().event(ev)

    def _retire(self):
        """Save every layer's corrections, then stop answering the viewer and its layers, except
        to keep saving napari's own edits to them until another widget adopts them."""
        if self._retired:
            return
        self._flush_moves()
        self._autosave_timer.stop()
        for token in list(self._infos):
            lyr = self._layer_by_token(token)
            if lyr is not None:
                self._save_token(token, lyr)
        self._retired = True
        self._cancel.set()
        self._drop_pending_head()  # its Keep and Discard go with the dock: the head was never kept
        pairs = [
            (self.viewer.layers.events.inserted, self._on_layer_inserted),
            (self.viewer.layers.events.removed, self._on_layers_changed),
            (self.viewer.layers.selection.events.changed, self._on_selection_changed),
        ]
        for lyr in self.viewer.layers:
            pairs.append((lyr.events.name, self._on_layer_renamed))
            if L.token_of(lyr) in self._infos:
                pairs += [(lyr.events.mode, self._on_mode_changed), (lyr.events.current_properties, self._on_defaults_changed)]
                for key in self._layer_keys():
                    with contextlib.suppress(Exception):  # napari's own bindings for these keys come back
                        lyr.bind_key(key, None, overwrite=True)
        for emitter, callback in pairs:
            with contextlib.suppress(Exception):  # not connected: nothing to undo
                emitter.disconnect(callback)
