"""The nuclei (points) layers: finding them by token, adopting them (events, key bindings, their
corrections file), and following the viewer's layer list as layers come, go and are renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layer as L
from . import session
from .history import History
from .persistence import OWNERS

KEYS_HELP = (
    "DeNuC keys: 1-9 set class · r reviewed · n / Shift+N next / previous doubtful nucleus · "
    "Ctrl+Z / Ctrl+Shift+Z undo / redo · Delete removes selected"
)


class TrackingMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _layer_by_token(self, token):
        for lyr in self.viewer.layers:
            if L.token_of(lyr) == token and lyr.__class__.__name__ == "Points":
                return lyr
        return None

    def points_layer(self, image_layer=None):
        """The DeNuC points layer of ``image_layer`` (default: the chosen image), or the active DeNuC layer."""
        image_layer = image_layer or self.image_layer()
        active = self.viewer.layers.selection.active
        ours = [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Points" and L.token_of(lyr) in self._infos]
        active_token = L.token_of(active) if active is not None else None
        if image_layer is not None:
            mine = [lyr for lyr in ours if self._infos[L.token_of(lyr)]["image"] == image_layer.name]
            for lyr in mine:
                if L.token_of(lyr) == active_token:
                    return lyr
            return mine[-1] if mine else None  # never another image's nuclei
        for lyr in ours:
            if L.token_of(lyr) == active_token:
                return lyr
        return ours[-1] if len(ours) == 1 else None

    def _points_name(self, image_layer, state=None) -> str:
        """``<image> nuclei``, or the name the user gave the layer whose corrections ``state`` holds."""
        saved = (state or {}).get("layer_name")
        if isinstance(saved, str) and saved.strip() and saved != f"{state.get('image')} nuclei":
            return saved
        return f"{image_layer.name} nuclei"

    def _on_layer_inserted(self, event):
        self._refresh_image_choices()
        lyr = event.value
        lyr.events.name.connect(self._on_layer_renamed)
        token = L.token_of(lyr)
        if token in self._infos and sum(L.token_of(x) == token for x in self.viewer.layers) > 1:
            # napari's Duplicate Layer copies the metadata, token and file included: the copy is a layer of its own
            meta = {k: v for k, v in lyr.metadata["denuc"].items() if k != "corrections"}
            lyr.metadata = {**lyr.metadata, "denuc": {**meta, "token": L.new_token()}}
        if L.is_denuc_layer(lyr) and L.token_of(lyr) not in self._infos:
            self._adopt_existing(lyr)
        self._maybe_restore(lyr)
        self._refresh_views()

    def _on_layer_renamed(self, event=None):
        """An image layer renamed in the layer list: its nuclei, autosave and resolution follow it.

        The widget ties points layers to their image by name; the image is recognised under its
        new name by its pixel array (the object the key cache holds).
        """
        token = L.token_of(getattr(event, "source", None))
        lyr = self._layer_by_token(token) if token in self._infos else None
        if lyr is not None:  # a nuclei layer renamed ("case 12, reviewed"): its name is saved with its corrections
            self._mark_dirty(lyr)
            return
        images = self._image_layers()
        names = {i.name for i in images}
        renamed = {}
        for old, (data, key) in list(self._keys.items()):
            if old in names:
                continue
            new = next((i.name for i in images if i.data is data and i.name not in self._keys), None)
            if new is not None:
                renamed[old] = new
                self._keys[new] = self._keys.pop(old)
        if not renamed:
            self._refresh_image_choices()
            return
        for old, new in renamed.items():
            if old in self._mpp_user:
                self._mpp_user[new] = self._mpp_user.pop(old)
        for lyr in self.viewer.layers:
            info = self._infos.get(L.token_of(lyr))
            if info is not None and info["image"] in renamed:
                info["image"] = renamed[info["image"]]
                lyr.metadata["denuc"]["image"] = info["image"]
        current = self.image_combo.currentText()
        if current in renamed:
            self.image_combo.blockSignals(True)
            self.image_combo.addItem(renamed[current])
            self.image_combo.setCurrentText(renamed[current])
            self.image_combo.blockSignals(False)
        self._refresh_image_choices()

    def _on_layer_removing(self, event):
        """Write the layer's corrections before it goes (closing the viewer removes layers too)."""
        try:
            lyr = self.viewer.layers[event.index]
        except Exception:  # noqa: BLE001
            return
        token = L.token_of(lyr)
        if token in self._infos and OWNERS.get(token) is self:
            self._flush_moves()
            self._save_token(token, lyr)

    def _on_layers_changed(self, event=None):
        self._refresh_image_choices()
        live = {L.token_of(lyr) for lyr in self.viewer.layers}
        for token in [t for t in self._infos if t not in live]:
            self._infos.pop(token, None)
            self._histories.pop(token, None)
            self._candidates.pop(token, None)
            self._dirty.discard(token)
        self._refresh_views()

    def _new_layer(self, image_layer, det, *, source="model", reviewed=False, state=None):
        """Add an (empty or restored) DeNuC points layer for ``image_layer`` and start tracking it."""
        mpp = float(self.mpp_spin.value()) if image_layer is self.image_layer() else self._mpp_user.get(image_layer.name, self.image_mpp(image_layer)[0])
        kwargs = L.layer_kwargs(det, self._points_name(image_layer, state), source=source, reviewed=reviewed, mpp=mpp,
                                extra_metadata={"image": image_layer.name})
        kwargs["size"] = L.point_size(mpp, float(self.size_spin.value()))
        if state is not None:
            if state.get("nid") and len(state["nid"]) == len(det):
                kwargs["features"]["nid"] = np.asarray(state["nid"], dtype=np.int64)
            kwargs["metadata"]["denuc"]["tombstones"] = list(state.get("tombstones") or [])
        kwargs["scale"] = tuple(np.asarray(image_layer.scale)[-2:])
        kwargs["translate"] = tuple(np.asarray(image_layer.translate)[-2:])
        with self._quiet():
            lyr = self.viewer.add_points(**kwargs)
        self._adopt(lyr, image_layer)
        return lyr

    def _adopt(self, lyr, image_layer, key=None):
        """Track ``lyr`` as the points layer of ``image_layer``: events, keys, autosave, undo."""
        if key is None:
            key = self._image_key(image_layer)
        token = L.token_of(lyr)
        OWNERS[token] = self
        meta = lyr.metadata["denuc"]
        meta["image"] = image_layer.name
        base = session.corrections_path(image_layer.name, key, self._store_image_path(image_layer), self.project_dir)
        own = meta.get("corrections")  # adopted again (dock reopened): the file it has been writing to stays its own
        if own and Path(own) not in self._files_of_others(token):
            path = Path(own)
        else:
            path = session.numbered(base, self._copy_number(base, token))
        meta["corrections"] = str(path)
        if path != base and path != Path(own or ""):  # told once, when the layer gets a file of its own
            other = next((i["image"] for t, i in self._infos.items() if t != token and Path(i["path"]) == base), None)
            self._notes[token] = (
                f"'{image_layer.name}' is the same image as '{other}', whose nuclei are saved in {base.name}: "
                if other and other != image_layer.name else f"A second nuclei layer of '{image_layer.name}': "
            ) + f"these are saved separately, to {path.name}."
        self._infos[token] = {"image": image_layer.name, "key": key, "path": path, "next_nid": 0}
        self._next_nid(lyr)
        self._histories[token] = History(lyr)
        lyr.events.data.connect(self._on_data_event)
        lyr.events.mode.connect(self._on_mode_changed)
        lyr.events.current_properties.connect(self._on_defaults_changed)
        for key, handler in self._layer_keys().items():
            lyr.bind_key(key, handler, overwrite=True)
        lyr.feature_defaults = L.feature_defaults(L.class_names(lyr), self.class_combo.currentText() or None)
        lyr.help = KEYS_HELP

    def _files_of_others(self, token=None) -> set:
        """The corrections files the tracked nuclei layers other than ``token`` write to."""
        return {Path(i["path"]) for t, i in self._infos.items() if t != token}

    def _copy_number(self, base, token=None) -> int:
        """1 for the image's own corrections file ``base``; 2, 3, ... while other open nuclei layers
        write to those (the same image file open twice, or two nuclei layers of one image): one file
        each, or the last writer would win and the other's corrections be lost on reopening."""
        taken = self._files_of_others(token)
        k = 1
        while session.numbered(base, k) in taken:
            k += 1
        return k

    def _adopt_existing(self, lyr):
        """A DeNuC layer already in the viewer (widget re-opened): track it again."""
        name = lyr.metadata.get("denuc", {}).get("image")
        img = next((i for i in self._image_layers() if i.name == name), None)
        if img is None:
            return
        f, _, changed = L.recategorise(lyr.features, L.class_names(lyr), 0)
        if changed:
            with self._quiet():
                lyr.features = f
        self._adopt(lyr, img)
        self._restore_settings_of_adopted(lyr, img)

    def _layer_keys(self) -> dict:
        """The keys the widget binds on its points layers (unbound again when the dock closes)."""
        keys = {str(k): self._key_handler(k - 1) for k in range(1, 10)}
        keys.update({
            "r": lambda layer: self.mark_selected_reviewed(layer),
            "n": lambda layer: self.review_next(lyr=layer),
            "Shift-N": lambda layer: self.review_next(back=True, lyr=layer),
            "Control-Z": lambda layer: self.undo(layer),
            "Control-Shift-Z": lambda layer: self.redo(layer),
            # napari's own paste writes the points without a data event (no undo, no autosave, no flags)
            "Control-C": lambda layer: self.copy_selected(layer),
            "Control-V": lambda layer: self.paste(layer),
        })
        return keys

    def _key_handler(self, k):
        def handler(layer):
            names = L.class_names(layer)
            if k < len(names):
                self.class_combo.setCurrentText(names[k])
                self.set_class_of_selected(names[k], layer)

        return handler

    def _on_defaults_changed(self, event):
        """Selecting a point makes napari copy its features (id, score, source, class) into the
        defaults of the next added point: put the widget's back (a new nucleus is the user's)."""
        lyr = self._layer_by_token(L.token_of(event.source))
        if lyr is None or not len(lyr.feature_defaults):
            return
        d = lyr.feature_defaults.iloc[0]
        if d.get("nid", -1) == -1 and str(d.get("source", "")) == "edited" and str(d.get("class", "")) == self._new_class(lyr):
            return  # already ours (this handler's own write lands here too)
        lyr.feature_defaults = L.feature_defaults(L.class_names(lyr), self._new_class(lyr))

    def _new_class(self, lyr) -> str:
        names = L.class_names(lyr)
        cur = self.class_combo.currentText()
        return cur if cur in names else names[0]

    def _on_mode_changed(self, event):
        lyr = self._layer_by_token(L.token_of(event.source))
        if lyr is not None:
            lyr.help = KEYS_HELP  # napari rewrites the help line on every mode change
