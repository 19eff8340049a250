"""The models: building the pipeline in the background as the widget opens, and the user's
choice of detector, encoder, head and parameters.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import QFileDialog

from ..errors import DenucError
from . import session
from .native import prepare_for_torch


def make_pipeline(detector=None, encoder=None, head=None):
    """Build the pipeline (a module-level function so tests can substitute a small one)."""
    from ..pipeline import Pipeline

    return Pipeline.from_defaults(detector=detector, encoder=encoder, head=head)


def bundled_head(name, encoder):
    """The head shipped for the encoder registered as ``name`` (None: the default encoder), loaded for
    ``encoder``: what ``Pipeline.from_defaults`` uses when no head is chosen. None when there is none.
    A module-level function so tests can substitute theirs."""
    from ..head import LinearHead
    from ..pipeline import resolve_models

    _, path = resolve_models(name)  # by registry name: encoder.id carries a version
    return LinearHead.load(path, encoder=encoder) if path is not None else None


def encoder_choices() -> list[str]:
    from ..encoders import list_encoders

    return ["default", *list_encoders()]


class ModelsMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _on_param_edited(self, _value):
        if not self._setting_params:
            self._params_from_user = True

    def _show_pipeline(self, pipe):
        """Show the loaded models and, unless the user set them, the detector's threshold and NMS radius."""
        if pipe is None:
            return
        if self._head_note:  # once: the chosen head did not fit and the default one is in use
            note, self._head_note = self._head_note, ""
            show_warning(note)
            self._set_status(note)
        if not self._params_from_user:
            self._setting_params = True
            try:
                if not self._tau_restored:
                    self._show_tau(pipe.tau)
                self.nms_spin.setValue(float(pipe.nms_um))
            finally:
                self._setting_params = False
        if self.encoder_combo.currentIndex() == 0:
            from ..pipeline import default_encoder_name

            try:
                name = default_encoder_name()
            except Exception:  # noqa: BLE001 (only a label)
                name = ""
            self.encoder_combo.blockSignals(True)
            self.encoder_combo.setItemText(0, f"default ({name})" if name else "default")
            self.encoder_combo.blockSignals(False)
        self._show_head()
        if self.points_layer() is None:
            self._sync_classes()

    def _start_preload(self):
        prepare_for_torch()
        self._loading = True
        self.progress_bar.setRange(0, 0)  # busy indicator while models load
        self.progress_bar.setFormat("loading models…")
        self._set_status("Loading models… (Detect & classify starts as soon as they are ready)")
        w = create_worker(self._preload)
        w.returned.connect(self._on_preloaded)
        w.errored.connect(self._on_preload_failed)
        w.start()
        self._preload_worker = w

    def _preload(self):
        """Build the pipeline and run it once on a small synthetic tile (pays one-off costs early)."""
        pipe = self._ensure_pipeline()
        try:
            rng = np.random.default_rng(0)
            tile = (rng.random((256, 256, 3)) * 80 + np.array([170, 110, 180])).clip(0, 255).astype(np.uint8)
            pipe.run(tile, float(getattr(pipe.detector, "mpp", 0.5) or 0.5))
        except Exception:  # noqa: BLE001, S110 (a warm-up failure shows up, with its message, on the real run)
            pass
        return pipe

    def _end_loading(self):
        self._loading = False
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setFormat("%p%")

    def _on_preloaded(self, pipe):
        self._end_loading()
        note = self._head_note
        self._show_pipeline(pipe)
        if not self.is_busy():
            ready = f"Models ready (loaded in {self.timings.get('pipeline_load_s', 0):.1f} s)."
            self._set_status(" ".join(t for t in (self._restored_note, ready, note) if t))

    def _on_preload_failed(self, exc):
        self._end_loading()
        self._pipeline_error = exc
        self._set_status(f"Could not load the models: {exc}")

    def _ensure_pipeline(self):
        """Build (once) the pipeline from the chosen detector/encoder/head; thread-safe."""
        with self._pipeline_lock:
            if self.pipeline is None:
                t0 = time.perf_counter()
                try:
                    self.pipeline = make_pipeline(detector=self.detector_path, encoder=self.encoder_name, head=self.head_path)
                except DenucError as exc:
                    if self.head_path is None:
                        raise
                    # e.g. a head restored with yesterday's corrections, made for an encoder an update replaced:
                    # the default head keeps the widget usable; the corrections stay to retrain from
                    self.pipeline = make_pipeline(detector=self.detector_path, encoder=self.encoder_name, head=None)
                    self.head_path = None
                    self._remember_head()
                    self._head_note = f"{exc}. Using the default head; your corrections are kept (Retrain head makes a new one)."
                self.timings["pipeline_load_s"] = time.perf_counter() - t0
            return self.pipeline

    def _invalidate_pipeline(self):
        with self._pipeline_lock:
            self.pipeline = None
        if self.pending_retrain is not None:  # trained on the models being replaced: Keep could not apply it
            self.answer_retrain(False)
            self._set_status("The new head waiting for Keep was discarded: it was trained with the models you changed. Retrain head again.")

    def _choose_detector(self):
        path, _ = QFileDialog.getOpenFileName(self, "Detector checkpoint", "", "Detector (*.safetensors)")
        if path:
            self.detector_path = path
            self.detector_label.setText(Path(path).name)
            self._invalidate_pipeline()

    def _on_encoder_changed(self, text: str):
        self.encoder_name = None if text.startswith("default") else text
        self._invalidate_pipeline()
        self.head_path = None
        self._remember_head()
        self.head_label.setText("default")
        self.bundled_btn.setVisible(False)

    def _choose_head(self):
        path, _ = QFileDialog.getOpenFileName(self, "Head", str(session.heads_dir(self.project_dir)), "Head (*.safetensors)")
        if path:
            self.set_head(path)

    def set_head(self, path, head=None):
        """Use the head at ``path`` (loaded with the current encoder unless ``head`` is given)."""
        with self._pipeline_lock:
            if self.pipeline is not None:
                if head is None and path is not None:
                    from ..head import LinearHead

                    try:
                        head = LinearHead.load(path, encoder=self.pipeline.encoder)
                    except DenucError as exc:  # the head in use stays, and so does its name
                        show_error(str(exc))
                        return
                self.pipeline.head = head
        self.head_path = None if path is None else str(path)
        self._remember_head()
        self._show_head()
        self._sync_classes()

    def _remember_head(self):
        """The head in use is the next session's too (a new image there gets it, as it would now)."""
        try:
            session.save_head(self.head_path)
        except OSError as exc:
            show_warning(f"could not remember the head for the next session: {exc}")

    def _show_head(self):
        """The head's name, and the way back to the bundled head whenever another one is in use."""
        if self.head_path is not None:
            self.head_label.setText(Path(self.head_path).name)
        else:
            head = getattr(self.pipeline, "head", None)
            self.head_label.setText("bundled" if head is not None else "none (add classes, retrain)")
        self.bundled_btn.setVisible(self.head_path is not None)
