"""The DeNuC dock widget: detect, classify, correct, retrain, export.

Qt through qtpy only. torch/timm are imported by the pipeline, which is built in a worker
thread (first when the widget opens, so "Detect & classify" does not wait for it).
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import DenucError
from ..io.images import DEFAULT_MPP
from . import layer as L
from . import session
from .coords import box_rc_to_xy, rc_to_xy

SCOPES = ("Whole image", "Current field of view", "Inside Shapes ROI")
ENCODER_CHOICES = ("default", "lite", "uni2-h", "uni", "conch", "virchow2", "h-optimus-0", "gigapath")
AUTOSAVE_DELAY_MS = 1000
UNDO_DEPTH = 20


def _load_native_libs_on_main_thread():
    """Keep torch from loading triton inside napari.

    torch imports triton lazily (torch._dynamo, reached from the first optimizer step).
    triton's native library bundles its own LLVM, which crashes the process when Mesa's LLVM
    (the OpenGL driver napari's canvas uses under Xvfb or without a GPU) is already loaded.
    triton only compiles GPU kernels, which the widget never uses, so it is marked missing
    for this process (unless something already imported it).
    """
    import sys

    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # "import triton" now raises ImportError


class Cancelled(Exception):
    """Raised inside a worker when the user pressed Cancel."""


class _Relay(QObject):
    """Carries progress from worker threads to the GUI thread (queued signal)."""

    progress = Signal(int, int)


class DenucWidget(QWidget):
    """Plugins > DeNuC."""

    def __init__(self, napari_viewer, preload: bool = True):
        super().__init__()
        self.viewer = napari_viewer
        self.pipeline = None
        self._pipeline_lock = threading.Lock()
        self._pipeline_error = None
        self.detector_path = None  # None: bundled
        self.encoder_name = None  # None: default (uni2-h when its weights are cached, else lite)
        self.head_path = None  # None: the pipeline's default head
        self.project_dir = None  # None: next to the image, else ~/.napari-denuc
        self.extra_classes: list[str] = []
        self.timings: dict[str, float] = {}
        self.last_summary = ""
        self._worker = None
        self._cancel = threading.Event()
        self._undo: list[tuple[str, weakref.ref, object, object]] = []
        self._suppress_events = 0
        self._layer_info: dict[int, dict] = {}  # id(points layer) -> image layer name, key, paths
        self._napari_progress = None
        self._t_press = None
        self._params_from_user = False
        self.features_memo = session.FeatureMemo()
        self._keys: dict[int, str] = {}
        self._setting_params = False

        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self.save_now)
        self._dirty: set[int] = set()

        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.layers.selection.events.changed.connect(self._on_selection_changed)
        self._refresh_image_choices()
        for lyr in list(self.viewer.layers):
            self._maybe_restore(lyr)
        if preload:
            self._start_preload()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        root = QVBoxLayout(self)

        box = QGroupBox("Image and models")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        mpp_row = QHBoxLayout()
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.01, 50.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setValue(DEFAULT_MPP)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.valueChanged.connect(lambda _v: self.mpp_note.setText("set by you"))
        self.mpp_note = QLabel("")
        self.mpp_note.setWordWrap(True)
        mpp_row.addWidget(self.mpp_spin)
        mpp_row.addWidget(self.mpp_note, 1)
        form.addRow("Resolution", mpp_row)

        det_row = QHBoxLayout()
        self.detector_label = QLabel("bundled")
        b = QPushButton("…")
        b.setToolTip("Choose a detector checkpoint (.safetensors)")
        b.clicked.connect(self._choose_detector)
        det_row.addWidget(self.detector_label, 1)
        det_row.addWidget(b)
        form.addRow("Detector", det_row)

        self.encoder_combo = QComboBox()
        self.encoder_combo.addItems(ENCODER_CHOICES)
        self.encoder_combo.setToolTip("default: uni2-h when its weights are available, else the offline lite encoder")
        self.encoder_combo.currentTextChanged.connect(self._on_encoder_changed)
        form.addRow("Encoder", self.encoder_combo)

        head_row = QHBoxLayout()
        self.head_label = QLabel("default")
        self.head_label.setWordWrap(True)
        b = QPushButton("…")
        b.setToolTip("Load a head file (.safetensors with its .json sidecar)")
        b.clicked.connect(self._choose_head)
        head_row.addWidget(self.head_label, 1)
        head_row.addWidget(b)
        form.addRow("Head", head_row)

        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.0, 1.0)
        self.tau_spin.setSingleStep(0.05)
        self.tau_spin.setDecimals(2)
        self.tau_spin.setValue(0.5)
        self.tau_spin.setToolTip("Detection score threshold (the detector's own value until you change it)")
        self.tau_spin.valueChanged.connect(self._on_param_edited)
        form.addRow("Score threshold", self.tau_spin)
        self.nms_spin = QDoubleSpinBox()
        self.nms_spin.setRange(0.5, 50.0)
        self.nms_spin.setDecimals(1)
        self.nms_spin.setSuffix(" µm")
        self.nms_spin.setValue(2.0)
        self.nms_spin.setToolTip("Two detections closer than this are one nucleus (the detector's own value until you change it)")
        self.nms_spin.valueChanged.connect(self._on_param_edited)
        form.addRow("NMS radius", self.nms_spin)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        form.addRow("Run on", self.scope_combo)
        root.addWidget(box)

        run_row = QHBoxLayout()
        self.run_btn = QPushButton("Detect && classify")
        self.run_btn.clicked.connect(self.run_detection)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        run_row.addWidget(self.run_btn, 1)
        run_row.addWidget(self.cancel_btn)
        root.addLayout(run_row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        root.addWidget(self.progress_bar)

        box = QGroupBox("Correct")
        v = QVBoxLayout(box)
        cls_row = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("Class of new nuclei; keys 1-9 set the class of the selected nuclei")
        self.class_combo.currentTextChanged.connect(self._on_current_class_changed)
        self.set_class_btn = QPushButton("Set on selected")
        self.set_class_btn.clicked.connect(lambda: self.set_class_of_selected(self.class_combo.currentText()))
        add_cls = QPushButton("+")
        add_cls.setToolTip("Add a class")
        add_cls.clicked.connect(self._ask_new_class)
        cls_row.addWidget(QLabel("Class"))
        cls_row.addWidget(self.class_combo, 1)
        cls_row.addWidget(self.set_class_btn)
        cls_row.addWidget(add_cls)
        v.addLayout(cls_row)
        self.legend = QLabel("")
        self.legend.setTextFormat(Qt.RichText)
        self.legend.setWordWrap(True)
        v.addWidget(self.legend)
        row = QHBoxLayout()
        self.review_btn = QPushButton("Mark selected reviewed")
        self.review_btn.clicked.connect(self.mark_selected_reviewed)
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.setEnabled(False)
        self.undo_btn.clicked.connect(self.undo)
        row.addWidget(self.review_btn, 1)
        row.addWidget(self.undo_btn)
        v.addLayout(row)
        root.addWidget(box)

        self.retrain_btn = QPushButton("Retrain head")
        self.retrain_btn.setToolTip("Retrain the head on reviewed and edited nuclei; unedited nuclei are reclassified")
        self.retrain_btn.clicked.connect(self.retrain)
        root.addWidget(self.retrain_btn)

        row = QHBoxLayout()
        b = QPushButton("Export…")
        b.clicked.connect(self._export_dialog)
        row.addWidget(b)
        b = QPushButton("Import…")
        b.clicked.connect(self._import_dialog)
        row.addWidget(b)
        b = QPushButton("Project folder…")
        b.clicked.connect(self._choose_project)
        row.addWidget(b)
        root.addLayout(row)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        root.addWidget(self.status)
        root.addStretch(1)

    def _on_param_edited(self, _value):
        if not self._setting_params:
            self._params_from_user = True

    def _show_pipeline(self, pipe):
        """Show the loaded models and, unless the user set them, the detector's threshold and NMS radius."""
        if pipe is None:
            return
        if not self._params_from_user:
            self._setting_params = True
            try:
                self.tau_spin.setValue(float(pipe.tau))
                self.nms_spin.setValue(float(pipe.nms_um))
            finally:
                self._setting_params = False
        enc = getattr(pipe.encoder, "id", None)
        if enc and self.encoder_combo.currentIndex() == 0:
            self.encoder_combo.blockSignals(True)
            self.encoder_combo.setItemText(0, f"default ({enc})")
            self.encoder_combo.blockSignals(False)
        if self.head_path is not None:
            self.head_label.setText(Path(self.head_path).name)
        else:
            head = getattr(pipe, "head", None)
            self.head_label.setText("bundled lite head" if head is not None else "none (add classes and retrain)")
        if not self.points_layer():
            self._sync_classes()

    def _set_status(self, text: str):
        self.status.setText(text)

    # ------------------------------------------------------------ layers
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

    def _on_layers_changed(self, event=None):
        self._refresh_image_choices()
        if event is not None and getattr(event, "type", "") == "inserted":
            self._maybe_restore(event.value)
        self._update_legend()

    def _on_selection_changed(self, event=None):
        active = self.viewer.layers.selection.active
        if active is not None and active.__class__.__name__ == "Image":
            self.image_combo.setCurrentText(active.name)
        elif active is not None and self._is_ours(active):
            info = self._layer_info.get(id(active))
            if info and info["image"] in [lyr.name for lyr in self._image_layers()]:
                self.image_combo.setCurrentText(info["image"])
        self._update_legend()

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
            except Exception:  # unreadable tags: fall through to the assumption
                pass
        return DEFAULT_MPP, True

    def _on_image_changed(self, name: str):
        lyr = self.image_layer()
        if lyr is None:
            self.mpp_note.setText("open an H&E image (File > Open, or File > Open Sample > DeNuC)")
            return
        mpp, assumed = self.image_mpp(lyr)
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(mpp)
        self.mpp_spin.blockSignals(False)
        self.mpp_note.setText(
            f"assumed ({DEFAULT_MPP} µm/px, 20x): the file states no resolution; correct it if needed"
            if assumed
            else "from the image"
        )

    def _is_ours(self, lyr) -> bool:
        return id(lyr) in self._layer_info or (lyr.__class__.__name__ == "Points" and "denuc" in lyr.metadata and L.is_denuc_layer(lyr))

    def points_layer(self, image_layer=None):
        """The DeNuC points layer of ``image_layer`` (default: the chosen image), or the active DeNuC layer."""
        image_layer = image_layer or self.image_layer()
        active = self.viewer.layers.selection.active
        cands = [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Points" and self._is_ours(lyr)]
        if image_layer is not None:
            mine = [lyr for lyr in cands if self._layer_info.get(id(lyr), {}).get("image") == image_layer.name]
            if active in mine:
                return active
            if mine:
                return mine[-1]
        if active in cands:
            return active
        return cands[-1] if len(cands) == 1 else None

    def _points_name(self, image_layer) -> str:
        return f"{image_layer.name} nuclei"

    # ----------------------------------------------------------- pipeline
    def _start_preload(self):
        _load_native_libs_on_main_thread()
        w = create_worker(self._preload)
        w.errored.connect(lambda e: None)  # reported when the user runs
        w.returned.connect(self._show_pipeline)
        w.start()
        self._preload_worker = w

    def _preload(self):
        """Build the pipeline and run it once on a small synthetic tile.

        The first inference of a torch model pays one-off costs (kernel selection, memory
        pools): paying them here, while the user looks at the image, keeps the first
        "Detect & classify" fast.
        """
        pipe = self._ensure_pipeline()
        try:
            rng = np.random.default_rng(0)
            tile = (rng.random((256, 256, 3)) * 80 + np.array([170, 110, 180])).clip(0, 255).astype(np.uint8)
            pipe.run(tile, float(getattr(pipe.detector, "mpp", 0.5) or 0.5))
        except Exception:  # noqa: BLE001 (a warm-up failure shows up, with its message, on the real run)
            pass
        return pipe

    def _ensure_pipeline(self):
        """Build (once) the pipeline from the chosen detector/encoder/head; thread-safe."""
        with self._pipeline_lock:
            if self.pipeline is None:
                from ..pipeline import Pipeline

                t0 = time.perf_counter()
                self.pipeline = Pipeline.from_defaults(
                    detector=self.detector_path, encoder=self.encoder_name, head=self.head_path
                )
                self.timings["pipeline_load_s"] = time.perf_counter() - t0
            return self.pipeline

    def _invalidate_pipeline(self):
        with self._pipeline_lock:
            self.pipeline = None

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
        self.head_label.setText("default")

    def _choose_head(self):
        path, _ = QFileDialog.getOpenFileName(self, "Head", str(session.heads_dir(self.project_dir)), "Head (*.safetensors)")
        if path:
            self.set_head(path)

    def set_head(self, path):
        """Use the head at ``path`` (loaded with the current encoder)."""
        self.head_path = str(path)
        self.head_label.setText(Path(path).name)
        with self._pipeline_lock:
            if self.pipeline is not None:
                from ..head import LinearHead

                try:
                    self.pipeline.head = LinearHead.load(path, encoder=self.pipeline.encoder)
                except DenucError as exc:
                    show_error(str(exc))
                    return
        self._sync_classes()

    def _choose_project(self):
        d = QFileDialog.getExistingDirectory(self, "Project folder (corrections and heads)")
        if d:
            self.project_dir = Path(d)
            self._set_status(f"Corrections and heads go to {d}")

    # ------------------------------------------------------------ classes
    def class_names(self) -> tuple[str, ...]:
        lyr = self.points_layer()
        if lyr is not None:
            return L.class_names(lyr)
        if self.pipeline is not None:
            return tuple(self.pipeline.class_names) + tuple(c for c in self.extra_classes if c not in self.pipeline.class_names)
        return tuple(self.extra_classes) or ("nucleus",)

    def _sync_classes(self):
        names = list(self.class_names())
        cur = self.class_combo.currentText()
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(names)
        if cur in names:
            self.class_combo.setCurrentText(cur)
        self.class_combo.blockSignals(False)
        self._on_current_class_changed(self.class_combo.currentText())

    def _on_current_class_changed(self, name: str):
        lyr = self.points_layer()
        if lyr is not None and name in L.class_names(lyr):
            lyr.feature_defaults = L.feature_defaults(L.class_names(lyr), name)

    def _ask_new_class(self):
        name, ok = QInputDialog.getText(self, "Add a class", "Class name:")
        if ok and name.strip():
            self.add_class(name.strip())

    def add_class(self, name: str, color=None):
        """Add a class to the current points layer (and to the next head)."""
        lyr = self.points_layer()
        if lyr is None:
            if name not in self.extra_classes:
                self.extra_classes.append(name)
            self._sync_classes()
            return
        names = list(L.class_names(lyr))
        if name in names:
            return
        self._push_undo(f"add class {name}", lyr)
        colors = list(L.class_colors(lyr))
        from ..results import default_colors

        colors.append(tuple(color) if color else default_colors(len(names) + 1)[-1])
        names.append(name)
        f = lyr.features
        f["class"] = f["class"].cat.add_categories([name])
        f[L.prob_column(name)] = np.full(len(f), np.nan, np.float32)
        lyr.metadata["denuc"].update(class_names=names, class_colors=[list(c) for c in colors])
        lyr.face_color_cycle = L.color_map(names, colors)
        lyr.feature_defaults = L.feature_defaults(names, self.class_combo.currentText())
        lyr.refresh_colors(update_color_mapping=False)
        self._sync_classes()
        self._changed(lyr)

    # -------------------------------------------------------------- run
    def _region(self, image_layer):
        """(x0, y0, x1, y1) in full-resolution pixels, a polygon in (x, y) or None, per the scope choice."""
        scope = self.scope_combo.currentText()
        if scope == SCOPES[0]:
            return None, None
        scale = np.asarray(image_layer.scale)[-2:]
        translate = np.asarray(image_layer.translate)[-2:]
        if scope == SCOPES[1]:
            center = np.asarray(self.viewer.camera.center)[-2:]
            try:
                w, h = self.viewer.window._qt_viewer.canvas.size
            except Exception:
                w, h = 800, 600
            half = np.array([h, w], dtype=float) / float(self.viewer.camera.zoom) / 2
            r0, c0 = (center - half - translate) / scale
            r1, c1 = (center + half - translate) / scale
            return box_rc_to_xy(r0, c0, r1, c1), None
        shapes = [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Shapes" and len(lyr.data)]
        if not shapes:
            raise DenucError("no Shapes layer with a shape: draw a rectangle or polygon around the region, then run")
        active = self.viewer.layers.selection.active
        sl = active if active in shapes else shapes[-1]
        idx = sorted(sl.selected_data) or [0]
        verts = np.asarray(sl.data[idx[0]], dtype=float)[:, -2:]
        world = verts * np.asarray(sl.scale)[-2:] + np.asarray(sl.translate)[-2:]
        rc = (world - translate) / scale
        poly_xy = rc_to_xy(rc)
        return box_rc_to_xy(rc[:, 0].min(), rc[:, 1].min(), rc[:, 0].max(), rc[:, 1].max()), poly_xy

    def _level_for(self, image_layer, model_mpp: float, mpp: float):
        """(array, factor): the multiscale level nearest the model's mpp (factor = full-res px per level px)."""
        if not getattr(image_layer, "multiscale", False):
            return image_layer.data, 1.0
        levels = list(image_layer.data)
        h0 = levels[0].shape[-3] if levels[0].ndim >= 3 and levels[0].shape[-1] in (3, 4) else levels[0].shape[-2]
        best, best_f = levels[0], 1.0
        for lev in levels:
            h = lev.shape[-3] if lev.ndim >= 3 and lev.shape[-1] in (3, 4) else lev.shape[-2]
            f = h0 / h
            if abs(np.log(mpp * f / model_mpp)) < abs(np.log(mpp * best_f / model_mpp)):
                best, best_f = lev, f
        return best, best_f

    def run_detection(self):
        """Detect & classify in a worker thread; the result becomes (or merges into) the image's points layer."""
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
            show_error(str(exc))
            return
        mpp = float(self.mpp_spin.value())
        tau, nms = (float(self.tau_spin.value()), float(self.nms_spin.value())) if self._params_from_user else (None, None)
        data = image_layer.data
        image_key = self._image_key(image_layer)

        def memo_key(pipe, level_factor):
            return (image_key, getattr(pipe.encoder, "id", ""), round(mpp, 6), level_factor)

        def job():
            pipe = self._ensure_pipeline()
            model_mpp = float(getattr(pipe.detector, "mpp", 0.5) or 0.5)
            arr, f = self._level_for(image_layer, model_mpp, mpp) if getattr(image_layer, "multiscale", False) else (data, 1.0)
            full_h, full_w = (arr.shape[0] * f, arr.shape[1] * f)
            x0 = y0 = 0
            if box is not None:
                x0, y0 = max(0, int(np.floor(box[0] / f))), max(0, int(np.floor(box[1] / f)))
                x1, y1 = min(arr.shape[1], int(np.ceil(box[2] / f))), min(arr.shape[0], int(np.ceil(box[3] / f)))
                if x1 <= x0 or y1 <= y0:
                    raise DenucError("the region lies outside the image; move the view or the shape onto the image")
                arr = arr[y0:y1, x0:x1]
            image = np.asarray(arr)
            if pipe.head is not None and pipe.encoder is not None:
                # pipeline.run, step by step, keeping the features for "Retrain head"
                from ..results import Detections

                xy, scores = pipe.detect(image, mpp * f, tau=tau, nms_um=nms, progress=self._phase(0, 50))
                feats = pipe.features_at(image, xy, mpp * f, progress=self._phase(50, 50))
                probs = np.asarray(pipe.head.predict_proba(feats), dtype=np.float32).reshape(len(xy), -1)
                det = Detections(xy, scores, probs.argmax(1), pipe.class_names, pipe.class_colors, probs)
                det.xy = (det.xy + (x0, y0)) * f
                self.features_memo.put(memo_key(pipe, f), det.xy, feats)
            else:
                det = pipe.run(image, mpp * f, progress=self._progress_cb, tau=tau, nms_um=nms)
                det.xy = (det.xy + (x0, y0)) * f
            if poly is not None and len(det):
                from skimage.measure import points_in_poly

                keep = points_in_poly(det.xy, poly)
                det = _subset(det, keep)
            region = None if box is None else (x0 * f, y0 * f, min(full_w, (x1) * f), min(full_h, (y1) * f))
            return det, region, poly

        self._start_worker(job, self._on_detect_done, "Detecting and classifying nuclei")
        self._job_image = image_layer

    def _phase(self, start, span):
        return lambda done, total: self._progress_cb(int(start + span * done / max(total, 1)), 100)

    def _progress_cb(self, done, total):
        if self._cancel.is_set():
            raise Cancelled()
        self._relay.progress.emit(int(done), int(max(total, 1)))

    def _start_worker(self, fn, on_done, title):
        _load_native_libs_on_main_thread()
        self._cancel.clear()
        self.run_btn.setEnabled(False)
        self.retrain_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setValue(0)
        self._set_status(title + "…")
        self._napari_progress = napari_progress(total=100, desc=title)
        def guarded():  # errors come back as values: napari would re-raise errored workers
            try:
                return True, fn()
            except Exception as exc:  # noqa: BLE001 (reported to the user by _on_worker_error)
                return False, exc

        def returned(result):
            ok, value = result
            if not ok:
                self._on_worker_error(value)
                return
            try:
                on_done(value)
            except Exception as exc:  # noqa: BLE001
                self._on_worker_error(exc)

        w = create_worker(guarded)
        w.returned.connect(returned)
        w.finished.connect(self._on_worker_finished)
        self._worker = w
        w.start()

    def _on_progress(self, done, total):
        pct = int(100 * done / max(total, 1))
        self.progress_bar.setValue(pct)
        if self._napari_progress is not None:
            self._napari_progress.n = pct
            self._napari_progress.refresh()

    def cancel(self):
        """Stop the running job at its next progress step; nothing already saved is touched."""
        self._cancel.set()
        self._set_status("Cancelling…")

    def _on_worker_error(self, exc):
        if isinstance(exc, Cancelled):
            self._set_status("Cancelled. Your nuclei and head are unchanged.")
        elif isinstance(exc, DenucError):
            self._set_status(str(exc))
            show_error(str(exc))
        else:
            self._set_status(f"Failed: {type(exc).__name__}: {exc}. Your nuclei and head are unchanged.")
            show_error(f"DeNuC failed: {type(exc).__name__}: {exc}")
        self.last_error = exc

    def _on_worker_finished(self):
        self._worker = None
        self.run_btn.setEnabled(True)
        self.retrain_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        if self._napari_progress is not None:
            self._napari_progress.close()
            self._napari_progress = None

    def is_busy(self) -> bool:
        return self._worker is not None

    def _on_detect_done(self, result):
        det, region, poly = result
        image_layer = self._job_image
        pipe = self.pipeline
        self._show_pipeline(pipe)
        lyr = self.points_layer(image_layer)
        mpp = float(self.mpp_spin.value())
        if lyr is None:
            kwargs = L.layer_kwargs(det, self._points_name(image_layer), mpp=mpp)
            kwargs["scale"] = tuple(np.asarray(image_layer.scale)[-2:])
            kwargs["translate"] = tuple(np.asarray(image_layer.translate)[-2:])
            self._suppress_events += 1
            try:
                lyr = self.viewer.add_points(**kwargs)
            finally:
                self._suppress_events -= 1
            self._adopt(lyr, image_layer)
            self._push_undo("detect", lyr, removed_layer=True)
            kept_n = 0
        else:
            self._push_undo("detect", lyr)
            kept_n = self._merge(lyr, det, region, poly, mpp)
        self.progress_bar.setValue(100)
        self._sync_classes()
        self._update_legend()
        self.viewer.layers.selection.active = lyr
        self.timings["detect_to_layer_s"] = time.perf_counter() - self._t_press
        enc = getattr(getattr(pipe, "encoder", None), "id", "?")
        msg = f"{len(det)} nuclei detected ({enc} encoder) in {self.timings['detect_to_layer_s']:.1f} s."
        if kept_n:
            msg += f" Kept {kept_n} reviewed or edited nuclei."
        self._set_status(msg)
        self._changed(lyr)

    def _merge(self, lyr, det, region, poly, mpp) -> int:
        """Replace unreviewed model nuclei in the run's region with ``det``; keep the user's nuclei."""
        from scipy.spatial import cKDTree

        names_layer = L.class_names(lyr)
        det = _to_classes(det, names_layer, L.class_colors(lyr))
        xy_old = rc_to_xy(lyr.data) if len(lyr.data) else np.zeros((0, 2))
        f = lyr.features
        user = (np.asarray(f["source"].astype(str)) == "edited") | np.asarray(f["reviewed"], dtype=bool)
        inside = np.ones(len(xy_old), bool)
        if region is not None:
            x0, y0, x1, y1 = region
            inside = (xy_old[:, 0] >= x0) & (xy_old[:, 0] < x1) & (xy_old[:, 1] >= y0) & (xy_old[:, 1] < y1)
            if poly is not None:
                from skimage.measure import points_in_poly

                inside &= points_in_poly(xy_old, poly) if len(xy_old) else inside
        keep = ~inside | user
        if len(det) and user.any():
            radius_px = float(self.nms_spin.value()) / mpp
            d, _ = cKDTree(xy_old[user]).query(det.xy, k=1)
            det = _subset(det, d > radius_px)
        new_f = L.make_features(det, "model", False)
        old_f = f[keep].reset_index(drop=True)
        features = _concat_features(old_f, new_f, names_layer)
        data = np.concatenate([np.asarray(lyr.data)[keep].reshape(-1, 2), L.xy_to_rc(det.xy)], axis=0)
        self._suppress_events += 1
        try:
            lyr.selected_data = set()
            lyr.data = data
            lyr.features = features
            lyr.refresh_colors(update_color_mapping=False)
        finally:
            self._suppress_events -= 1
        return int(user.sum())

    def _adopt(self, lyr, image_layer, key=None):
        """Start tracking ``lyr`` as the points layer of ``image_layer``: edits, keys, autosave."""
        if key is None:
            key = self._image_key(image_layer)
        self._layer_info[id(lyr)] = {
            "image": image_layer.name,
            "key": key,
            "path": session.corrections_path(image_layer.name, key, self._store_image_path(image_layer), self.project_dir),
            "layer": weakref.ref(lyr),
        }
        lyr.events.data.connect(self._on_data_event)
        for k in range(1, 10):
            lyr.bind_key(str(k), self._key_handler(k - 1), overwrite=True)
        lyr.bind_key("r", lambda layer: self.mark_selected_reviewed(), overwrite=True)
        lyr.feature_defaults = L.feature_defaults(L.class_names(lyr), self.class_combo.currentText() or None)

    def _key_handler(self, k):
        def handler(layer):
            names = L.class_names(layer)
            if k < len(names):
                self.class_combo.setCurrentText(names[k])
                self.set_class_of_selected(names[k], layer)

        return handler

    def _store_image_path(self, image_layer):
        if image_layer.metadata.get("sample"):
            return None  # the bundled sample lives inside the package: keep user files out of it
        return self.image_path(image_layer)

    def _image_key(self, image_layer) -> str:
        key = self._keys.get(id(image_layer))
        if key is not None and key[0] is image_layer.data:
            return key[1]
        value = self._compute_image_key(image_layer)
        self._keys[id(image_layer)] = (image_layer.data, value)
        return value

    def _compute_image_key(self, image_layer) -> str:
        if getattr(image_layer, "multiscale", False):
            import hashlib

            shape = tuple(image_layer.data[0].shape)
            return hashlib.sha1(f"{self.image_path(image_layer)}|{shape}".encode()).hexdigest()[:16]
        return session.image_key(image_layer.data)

    # ---------------------------------------------------------- editing
    def _on_data_event(self, event):
        if self._suppress_events:
            return
        lyr = event.source
        action = str(getattr(event, "action", ""))
        n = len(lyr.data)
        if action.endswith("adding"):
            self._n_before_add = n
            return
        if action.endswith("added"):
            start = getattr(self, "_n_before_add", n - 1)
            idx = range(min(start, n), n)
            cls = self.class_combo.currentText()
            names = L.class_names(lyr)
            if len(idx):
                f = lyr.features
                ii = np.fromiter(idx, dtype=np.int64)
                if cls in names:
                    f.loc[ii, "class"] = cls
                f.loc[ii, "score"] = 1.0
                for nm in names:
                    f.loc[ii, L.prob_column(nm)] = np.nan
                L.mark(lyr, ii, edited=True)
                lyr.refresh_colors(update_color_mapping=False)
        elif action.endswith("changed"):
            idx = [i for i in (getattr(event, "data_indices", ()) or ()) if 0 <= i < n]
            if idx and len(idx) < n:
                L.mark(lyr, idx, edited=True)
        elif not action.endswith("removed"):
            return
        self._changed(lyr)

    def set_class_of_selected(self, name: str, lyr=None) -> int:
        """Set the class of the selected nuclei (undoable); they become edited."""
        lyr = lyr or self.points_layer()
        if lyr is None or not lyr.selected_data:
            self._set_status("Select nuclei first (select mode, click or drag), then choose their class.")
            return 0
        if name not in L.class_names(lyr):
            show_warning(f"unknown class {name!r}")
            return 0
        self._push_undo(f"class {name}", lyr)
        n = L.set_class(lyr, lyr.selected_data, name)
        self._set_status(f"{len(lyr.selected_data)} nuclei set to {name} ({n} changed).")
        self._changed(lyr)
        return n

    def mark_selected_reviewed(self):
        lyr = self.points_layer()
        if lyr is None or not lyr.selected_data:
            self._set_status("Select the nuclei you have checked, then mark them reviewed.")
            return
        self._push_undo("reviewed", lyr)
        L.mark(lyr, lyr.selected_data, reviewed=True)
        self._set_status(f"{len(lyr.selected_data)} nuclei marked reviewed.")
        self._changed(lyr)

    def _changed(self, lyr):
        self._update_legend()
        self._dirty.add(id(lyr))
        self._autosave_timer.start()

    def _update_legend(self):
        lyr = self.points_layer()
        if lyr is None:
            self.legend.setText("")
            return
        counts = L.counts(lyr)
        colors = L.class_colors(lyr)
        f = lyr.features
        edited = int((np.asarray(f["source"].astype(str)) == "edited").sum()) if "source" in f else 0
        reviewed = int(np.asarray(f["reviewed"], dtype=bool).sum()) if "reviewed" in f else 0
        rows = []
        for k, (name, c) in enumerate(counts.items()):
            r, g, b = colors[k]
            rows.append(
                f"<span style='color: rgb({r},{g},{b}); font-size: 14pt'>&#9679;</span> "
                f"<b>{k + 1}</b> {name}: {c}"
            )
        rows.append(f"total {len(lyr.data)} · edited {edited} · reviewed {reviewed}")
        self.legend.setText("<br>".join(rows))

    # -------------------------------------------------------------- undo
    def _push_undo(self, what, lyr, removed_layer=False):
        snap = None if removed_layer else L.snapshot(lyr)
        meta = None if removed_layer else {k: (list(v) if isinstance(v, list) else v) for k, v in lyr.metadata.get("denuc", {}).items()}
        extra = {"head_path": self.head_path, "head": getattr(self.pipeline, "head", None), "meta": meta}
        self._undo.append((what, weakref.ref(lyr), snap, extra))
        del self._undo[:-UNDO_DEPTH]
        self.undo_btn.setEnabled(True)
        self.undo_btn.setToolTip(f"Undo {what}")

    def undo(self):
        """Undo the widget's last action (detect, relabel, mark reviewed, retrain, import, add class)."""
        if not self._undo:
            return
        what, ref, snap, extra = self._undo.pop()
        lyr = ref()
        self.undo_btn.setEnabled(bool(self._undo))
        if lyr is None:
            return
        if snap is None:
            if lyr in self.viewer.layers:
                self.viewer.layers.remove(lyr)
            self._set_status(f"Undid {what}.")
            return
        self._suppress_events += 1
        try:
            lyr.selected_data = set()
            if extra.get("meta"):
                lyr.metadata["denuc"].update(extra["meta"])
                names = L.class_names(lyr)
                lyr.face_color_cycle = L.color_map(names, L.class_colors(lyr))
            L.restore(lyr, snap)
        finally:
            self._suppress_events -= 1
        if what == "retrain":
            self.head_path = extra["head_path"]
            self.head_label.setText(Path(self.head_path).name if self.head_path else "default")
            if self.pipeline is not None:
                self.pipeline.head = extra["head"]
        self._sync_classes()
        self._set_status(f"Undid {what}.")
        self._changed(lyr)

    # ----------------------------------------------------------- retrain
    def retrain(self):
        """Retrain the head on reviewed and edited nuclei (background); reclassify unedited nuclei."""
        if self._worker is not None:
            return
        lyr = self.points_layer()
        image_layer = self.image_layer()
        if lyr is None or image_layer is None:
            show_warning("Run Detect & classify (or import points) on an image first.")
            return
        self._t_press = time.perf_counter()
        f = lyr.features
        edited = np.asarray(f["source"].astype(str)) == "edited"
        train = edited | np.asarray(f["reviewed"], dtype=bool)
        xy_all = rc_to_xy(lyr.data)
        names = L.class_names(lyr)
        colors = L.class_colors(lyr)
        labels = L.class_ids(lyr)[train]
        model_idx = np.flatnonzero(~edited)
        mpp = float(self.mpp_spin.value())
        data = image_layer.data
        image_key = self._image_key(image_layer)
        project = self.project_dir
        try:
            from ..retrain import check_examples

            check_examples(labels, names)
        except DenucError as exc:
            self._set_status(str(exc))
            show_warning(str(exc))
            self.last_error = exc
            return
        n_layer = len(lyr.data)

        def job():
            from ..retrain import retrain_head

            pipe = self._ensure_pipeline()
            model_mpp = float(getattr(pipe.encoder, "mpp", 0.5) or 0.5)
            arr, fct = self._level_for(image_layer, model_mpp, mpp) if getattr(image_layer, "multiscale", False) else (data, 1.0)
            image = np.asarray(arr)
            t0 = time.perf_counter()
            need = train | ~edited  # one query for training and reclassification
            key = (image_key, getattr(pipe.encoder, "id", ""), round(mpp, 6), fct)
            feats_need, found = self.features_memo.get(key, xy_all[need])
            missing = np.flatnonzero(~found)  # only nuclei the encoder has not seen are sampled
            if len(missing):
                xy_missing = xy_all[need][missing]
                new = pipe.features_at(image, xy_missing / fct, mpp * fct, progress=self._progress_cb)
                self.features_memo.put(key, xy_missing, new)
                if feats_need is None:
                    feats_need = np.zeros((int(need.sum()), new.shape[1]), np.float32)
                feats_need[missing] = new
            feats = np.zeros((len(xy_all), feats_need.shape[1]), np.float32)
            feats[need] = feats_need
            n_sampled = len(missing)
            t_feat = time.perf_counter() - t0
            enc_id = getattr(pipe.encoder, "id", "") or "encoder"
            path = session.next_head_path(session.heads_dir(project), enc_id)
            old = pipe.head if pipe.head is not None and tuple(pipe.head.class_names) == tuple(names) else None
            res = retrain_head(old, feats[train], labels, names, colors, path, metadata={"image": image_layer.name})
            if len(model_idx):
                probs = np.asarray(res.head.predict_proba(feats[model_idx]), dtype=np.float32)
            else:
                probs = np.zeros((0, len(names)), np.float32)
            res.fit_info["features_s"] = t_feat
            res.fit_info["points_sampled"] = n_sampled
            return res, probs

        def done(result):
            res, probs = result
            if len(lyr.data) != n_layer:  # edited while training: apply nothing but the head
                show_warning("The points changed while retraining; the new head is active, press Retrain again to reclassify.")
                probs = None
            self._push_undo("retrain", lyr)
            self.pipeline.head = res.head
            self.head_path = str(res.path)
            self.head_label.setText(Path(res.path).name)
            changed = 0
            if probs is not None:
                changed = L.apply_predictions(lyr, model_idx, probs.argmax(1) if len(probs) else [], probs)
            self.timings["retrain_s"] = time.perf_counter() - self._t_press
            self.last_result = res
            self.last_summary = res.summary(reclassified=len(model_idx) if probs is not None else None, changed=changed)
            self.progress_bar.setValue(100)
            self._set_status(self.last_summary)
            self._changed(lyr)

        self._start_worker(job, done, "Retraining the head")

    # ------------------------------------------------------ import/export
    def export_points(self, path, lyr=None) -> Path:
        from ..io.points import write_points

        lyr = lyr or self.points_layer()
        if lyr is None:
            raise DenucError("nothing to export: run Detect & classify or import points first")
        return write_points(path, L.layer_to_detections(lyr))

    def import_points(self, path, image_layer=None):
        """Read a GeoJSON/CSV point file as the points layer of the current image."""
        from ..io.points import read_points

        image_layer = image_layer or self.image_layer()
        det = read_points(path)
        if image_layer is None:
            lyr = self.viewer.add_points(**L.layer_kwargs(det, Path(path).stem, mpp=float(self.mpp_spin.value())))
            return lyr
        old = self.points_layer(image_layer)
        kwargs = L.layer_kwargs(det, self._points_name(image_layer), mpp=float(self.mpp_spin.value()))
        kwargs["scale"] = tuple(np.asarray(image_layer.scale)[-2:])
        kwargs["translate"] = tuple(np.asarray(image_layer.translate)[-2:])
        if old is not None:
            self._forget(old)
            self.viewer.layers.remove(old)
        self._suppress_events += 1
        try:
            lyr = self.viewer.add_points(**kwargs)
        finally:
            self._suppress_events -= 1
        self._adopt(lyr, image_layer)
        self._push_undo("import", lyr, removed_layer=True)
        self._sync_classes()
        self._changed(lyr)
        self._set_status(f"Imported {len(det)} nuclei from {Path(path).name}.")
        return lyr

    def _forget(self, lyr):
        self.save_now()
        self._layer_info.pop(id(lyr), None)
        try:
            lyr.events.data.disconnect(self._on_data_event)
        except Exception:
            pass

    def _export_dialog(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export nuclei", "", "QuPath GeoJSON (*.geojson);;CSV (*.csv)")
        if path:
            try:
                p = self.export_points(path)
                self._set_status(f"Exported to {p}")
            except DenucError as exc:
                show_error(str(exc))

    def _import_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Import nuclei", "", "Points (*.geojson *.json *.geojson.gz *.csv)")
        if path:
            try:
                self.import_points(path)
            except DenucError as exc:
                show_error(str(exc))

    # ----------------------------------------------------------- autosave
    def save_now(self):
        """Write the corrections of every changed DeNuC layer (atomic); called debounced after edits."""
        for lid in list(self._dirty):
            info = self._layer_info.get(lid)
            self._dirty.discard(lid)
            lyr = info["layer"]() if info else None
            if lyr is None:
                continue
            state = session.corrections_state(
                rc_to_xy(lyr.data) if len(lyr.data) else np.zeros((0, 2)),
                lyr.features,
                L.class_names(lyr),
                L.class_colors(lyr),
                info["key"],
                extra={"image": info["image"], "head": self.head_path},
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
        except Exception:
            return None
        path = session.corrections_path(image_layer.name, key, self._store_image_path(image_layer), self.project_dir)
        state = session.load_corrections(path, key)
        if state is None or not state.get("xy"):
            return None
        det, source, reviewed = session.state_to_detections_and_flags(state)
        kwargs = L.layer_kwargs(det, self._points_name(image_layer), source=source, reviewed=reviewed, mpp=self.image_mpp(image_layer)[0])
        kwargs["scale"] = tuple(np.asarray(image_layer.scale)[-2:])
        kwargs["translate"] = tuple(np.asarray(image_layer.translate)[-2:])
        self._suppress_events += 1
        try:
            lyr = self.viewer.add_points(**kwargs)
        finally:
            self._suppress_events -= 1
        self._adopt(lyr, image_layer, key)
        head = state.get("head")
        if head and Path(head).is_file():
            self.set_head(head)
        self._sync_classes()
        self._update_legend()
        self._set_status(f"Restored {len(det)} nuclei ({int((source == 'edited').sum())} edited) from {path}.")
        return lyr

    def closeEvent(self, event):  # noqa: N802 (Qt)
        self.save_now()
        super().closeEvent(event)


def _subset(det, keep):
    from ..results import Detections

    keep = np.asarray(keep, dtype=bool)
    return Detections(
        det.xy[keep], det.scores[keep], det.class_ids[keep], det.class_names, det.class_colors,
        None if det.probs is None else det.probs[keep],
    )


def _to_classes(det, names, colors):
    """``det`` relabelled onto the class list ``names`` (a class the layer lacks maps to the first)."""
    from ..results import Detections

    if tuple(det.class_names) == tuple(names):
        return det
    lookup = {n: k for k, n in enumerate(names)}
    ids = np.array([lookup.get(det.class_names[c], 0) for c in det.class_ids], dtype=np.int64)
    probs = None
    if det.probs is not None and all(n in det.class_names for n in names):
        probs = det.probs[:, [det.class_names.index(n) for n in names]]
    return Detections(det.xy, det.scores, ids, names, colors, probs)


def _concat_features(old, new, names):
    import pandas as pd

    out = pd.concat([old, new], ignore_index=True)
    out["class"] = pd.Categorical(out["class"].astype(str), categories=list(names))
    out["source"] = pd.Categorical(out["source"].astype(str), categories=list(L.SOURCES))
    out["reviewed"] = out["reviewed"].astype(bool)
    return out
