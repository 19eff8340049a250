"""The image layers: which one the widget works on, its resolution, its content key and file."""

from __future__ import annotations

from pathlib import Path

from ..geometry import inside_image
from ..io.images import DEFAULT_MPP
from . import layer as L
from . import session


class ImagesMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _image_layers(self):
        return [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Image"]

    def _refresh_image_choices(self):
        current = self.image_combo.currentText()
        names = [lyr.name for lyr in self._image_layers()]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        self._on_image_changed(self.image_combo.currentText())

    def _on_selection_changed(self, event=None):
        active = self.viewer.layers.selection.active
        if active is not None and active.__class__.__name__ == "Image":
            self.image_combo.setCurrentText(active.name)
        elif active is not None and L.token_of(active) in self._infos:
            img = self._infos[L.token_of(active)]["image"]
            if img in [lyr.name for lyr in self._image_layers()]:
                self.image_combo.setCurrentText(img)
        self._refresh_views()

    def image_layer(self):
        name = self.image_combo.currentText()
        for lyr in self._image_layers():
            if lyr.name == name:
                return lyr
        return None

    @staticmethod
    def image_path(layer) -> str | None:
        p = getattr(getattr(layer, "source", None), "path", None) or layer.metadata.get("path")
        return str(p) if p else None

    @staticmethod
    def on_image(layer, xy):
        """Which points ``xy`` (x, y) lie on the image's full-resolution pixels (``geometry.inside_image``)."""
        full = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        return inside_image(xy, full.shape)

    def image_mpp(self, layer) -> tuple[float, bool]:
        """(mpp, assumed): from the layer metadata, else the TIFF tags, else 0.5 (assumed)."""
        for key in ("mpp", "microns_per_pixel"):
            v = layer.metadata.get(key)
            if v:
                return float(v), False
        path = self.image_path(layer)
        if path and path.lower().endswith((".tif", ".tiff", ".svs")):
            try:
                from ..io.images import _tiff_mpp

                v = _tiff_mpp(Path(path))
                if v:
                    return float(v), False
            except Exception:  # noqa: BLE001, S110 (unreadable tags: fall through to the assumption)
                pass
        return DEFAULT_MPP, True

    def _on_image_changed(self, name: str):
        lyr = self.image_layer()
        if lyr is None:
            self.mpp_note.setText("open an H&E image (File > Open, or File > Open Sample > DeNuC)")
            return
        mpp, assumed = self.image_mpp(lyr)
        user = self._mpp_user.get(lyr.name)
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(mpp if user is None else user)
        self.mpp_spin.blockSignals(False)
        if user is not None:
            self.mpp_note.setText("set by you")
        else:
            self.mpp_note.setText(
                f"assumed ({DEFAULT_MPP} µm/px, 20x): the file states no resolution; correct it if needed"
                if assumed
                else "from the image"
            )
        if lyr.name != self._shown_image:  # another image: τ shows the threshold its nuclei are at
            self._shown_image = lyr.name
            pts = self.points_layer(lyr)
            tau = self._tau_shown.get(L.token_of(pts)) if pts is not None else None
            if tau is not None:
                self._show_tau(tau)
        self._refresh_views()

    def _on_mpp_edited(self, value):
        img = self.image_layer()
        if img is not None:  # kept for this image: new layers and restarts must not reset it
            self._mpp_user[img.name] = float(value)
        self.mpp_note.setText("set by you")
        self._apply_marker_size()

    def _store_image_path(self, image_layer):
        if image_layer.metadata.get("sample"):
            return None  # the bundled sample lives inside the package: keep user files out of it
        return self.image_path(image_layer)

    def _image_key(self, image_layer) -> str:
        cached = self._keys.get(image_layer.name)
        if cached is not None and cached[0] is image_layer.data:
            return cached[1]
        value = self._compute_image_key(image_layer)
        self._keys[image_layer.name] = (image_layer.data, value)
        return value

    def _compute_image_key(self, image_layer) -> str:
        if getattr(image_layer, "multiscale", False):
            import hashlib

            shape = tuple(image_layer.data[0].shape)
            return hashlib.sha1(f"{self.image_path(image_layer)}|{shape}".encode()).hexdigest()[:16]
        return session.image_key(image_layer.data)
