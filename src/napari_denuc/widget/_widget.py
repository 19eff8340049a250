"""The DeNuC dock widget: detect, classify, correct, review, retrain, export.

Qt through qtpy only; public napari API only (a menu-opened widget gets a ``PublicOnlyProxy``
viewer, and every layer it hands out is a new proxy object). Layers are therefore known by
the token in ``layer.metadata["denuc"]``, never by ``id()``. torch/timm are imported by the
pipeline, which is built in a worker thread as soon as the widget opens.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import DenucError
from ..geometry import rescale_points
from ..io.images import DEFAULT_MPP
from . import edits as E
from . import layer as L
from . import session
from .coords import box_rc_to_xy, rc_to_xy
from .history import History

SCOPES = ("Whole image", "Current field of view", "Inside Shapes ROI")
AUTOSAVE_DELAY_MS = 500
MOVE_SETTLE_MS = 250  # a drag emits one data event per mouse move: record the move once it settles
TAU_FLOOR_BELOW = 0.25  # detect down to tau - 0.25 so the threshold can move without re-running
MIN_FIT_NUCLEI = 30  # fewer corrected nuclei in view than this say little about the right threshold
REVIEW_SCREEN_PX_PER_UM = 6.0  # zoom of "Review next": a 7 µm nucleus is about 40 screen pixels
MAX_DOCK_WIDTH = 340
MAX_REGION_PIXELS = 8192 * 8192  # beyond this (a whole slide), the widget asks for a region; the CLI tiles slides  # < 27% of a 1280 px screen
KEYS_HELP = (
    "DeNuC keys: 1-9 set class · r reviewed · n / Shift+N next / previous doubtful nucleus · "
    "Ctrl+Z / Ctrl+Shift+Z undo / redo · Delete removes selected"
)


# token -> the widget that answers for that points layer: the newest one that adopted it. A widget
# whose dock was closed keeps saving its layers until another widget adopts them.
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def make_pipeline(detector=None, encoder=None, head=None):
    """Build the pipeline (a module-level function so tests can substitute a small one)."""
    from ..pipeline import Pipeline

    return Pipeline.from_defaults(detector=detector, encoder=encoder, head=head)


def encoder_choices() -> list[str]:
    from ..encoders import list_encoders

    return ["default", *list_encoders()]


def _load_native_libs_on_main_thread():
    """Prepare this process before torch loads inside napari: no triton, OpenMP threads that sleep.

    torch imports triton lazily (torch._dynamo, reached from the first optimizer step).
    triton's native library bundles its own LLVM, which crashes the process when Mesa's LLVM
    (the OpenGL driver napari's canvas uses under Xvfb or without a GPU) is already loaded.
    triton only compiles GPU kernels, which the widget never uses, so it is marked missing
    for this process (unless something already imported it). See :func:`passive_openmp`.
    """
    import sys

    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # "import triton" now raises ImportError
    passive_openmp(os.environ, sys.modules)


def passive_openmp(environ, modules) -> bool:
    """Make torch's OpenMP threads sleep, not spin, while they wait: inside napari only.

    A desktop shares its cores (QuPath, a browser). Spinning threads then wait for a partner the
    other program has descheduled: beside two busy processes the bundled detector took 10.3 s
    instead of 0.8 s in some runs, while PASSIVE stayed at 1.4-2.6 s. On a quiet machine PASSIVE
    costs 15-23 % (docs/benchmarks.md), so the command-line tools keep OpenMP's default. OpenMP
    reads the variable once, when torch loads it, and the user's own setting wins. True if set.
    """
    if "torch" in modules or "OMP_WAIT_POLICY" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def _camera(viewer):
    """napari 0.9 moved the camera to ``viewer.scene.camera`` (``viewer.camera`` is deprecated)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class Cancelled(Exception):
    """Raised inside a worker when the user pressed Cancel."""


class _Relay(QObject):
    """Carries progress from worker threads to the GUI thread (queued signal)."""

    progress = Signal(int, int)


class _Collapsible(QWidget):
    """A titled section that folds away (for settings a user rarely changes)."""

    def __init__(self, title: str, parent=None):
        super().__init__(parent)
        self.toggle = QToolButton(text=title, checkable=True, checked=False)
        self.toggle.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.toggle.setArrowType(Qt.RightArrow)
        self.toggle.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.body = QWidget()
        self.body.setVisible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.toggle)
        lay.addWidget(self.body)
        self.toggle.toggled.connect(self._on_toggled)

    def _on_toggled(self, on: bool):
        self.toggle.setArrowType(Qt.DownArrow if on else Qt.RightArrow)
        self.body.setVisible(on)


class DenucWidget(QWidget):
    """Plugins > DeNuC."""

    def __init__(self, napari_viewer, preload: bool = True):
        super().__init__()
        self.viewer = napari_viewer
        self.pipeline = None
        self._pipeline_lock = threading.Lock()
        self._pipeline_error = None
        self._loading = False
        self.detector_path = None  # None: bundled
        self.encoder_name = None  # None: the library's default
        self.head_path = None  # None: the pipeline's default head
        self.project_dir = session.load_project_dir()  # None: next to the image, else $DENUC_HOME
        self.extra_classes: list[str] = []
        self.timings: dict[str, float] = {}
        self.last_summary = ""
        self.last_error = None
        self.pending_retrain = None
        self._worker = None
        self._cancel = threading.Event()
        self._suppress = 0
        self._infos: dict[str, dict] = {}  # token -> image name, image key, autosave path, next nid
        self._notes: dict[str, str] = {}  # token -> why its corrections go to a file of their own (told once)
        self._histories: dict[str, History] = {}
        self._candidates: dict[str, E.Candidates] = {}
        self._tau_shown: dict[str, float] = {}  # token -> the threshold the layer's model nuclei are at
        self._dirty: set[str] = set()
        self._pending_move: set[str] = set()
        self._keys: dict[str, tuple] = {}  # image layer name -> (data object, key)
        self._review: dict = {"nid": None, "trail": []}
        self._hidden: set[str] = set()
        self._params_from_user = False
        self._tau_restored = False  # a tau saved with restored corrections (e.g. fitted to the site) is the one to use
        self._setting_params = False
        self._napari_progress = None
        self._t_press = None
        self._restored_note = ""  # "Restored N nuclei ..." stays visible when the models finish loading
        self._shown_image = None  # the image whose settings the controls show
        self._docked = False
        self._retired = False  # closed from the window: another widget may own the layers now
        self._mpp_user: dict[str, float] = {}  # image layer name -> the resolution the user typed
        self._clipboard = None  # (row/col positions, class names) of the nuclei Ctrl+C copied
        self._head_note = ""  # why the chosen head could not be used, shown once the models are in
        self.features_memo = session.FeatureMemo()

        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self.save_now)
        self._move_timer = QTimer(self)
        self._move_timer.setSingleShot(True)
        self._move_timer.setInterval(MOVE_SETTLE_MS)
        self._move_timer.timeout.connect(self._flush_moves)

        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.removing.connect(self._on_layer_removing)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.layers.selection.events.changed.connect(self._on_selection_changed)
        self._refresh_image_choices()
        for lyr in list(self.viewer.layers):
            lyr.events.name.connect(self._on_layer_renamed)
            if L.is_denuc_layer(lyr):
                self._adopt_existing(lyr)
        for lyr in list(self.viewer.layers):
            self._maybe_restore(lyr)
        if preload:
            self._start_preload()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        inner = QWidget()
        scroll.setWidget(inner)
        self._scroll, self._inner = scroll, inner
        root = QVBoxLayout(inner)
        self.setMaximumWidth(MAX_DOCK_WIDTH)
        self.setMinimumWidth(260)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)  # a narrow dock puts fields under their labels
        self.image_combo = QComboBox()
        self.image_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.image_combo.setMinimumContentsLength(8)
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.01, 50.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setValue(DEFAULT_MPP)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.valueChanged.connect(self._on_mpp_edited)
        form.addRow("Resolution", self.mpp_spin)
        self.mpp_note = QLabel("")
        self.mpp_note.setWordWrap(True)
        form.addRow(self.mpp_note)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        form.addRow("Run on", self.scope_combo)
        tau_row = QHBoxLayout()
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.0, 0.99)
        self.tau_spin.setSingleStep(0.05)
        self.tau_spin.setDecimals(2)
        self.tau_spin.setValue(0.5)
        self.tau_spin.setToolTip(
            "Detection score threshold τ. After a run it moves over the cached candidates at once, "
            "without running the network; your edited and reviewed nuclei always stay."
        )
        self.tau_spin.valueChanged.connect(self._on_tau_changed)
        self.tau_count = QLabel("")
        self.tau_count.setWordWrap(True)
        self.tau_count.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        tau_row.addWidget(self.tau_spin)
        self.fit_tau_btn = QPushButton("Fit to view")
        self.fit_tau_btn.setToolTip(
            "Correct every nucleus in view first (add missed ones, delete false ones), then press: τ becomes the "
            "threshold that best reproduces your corrected nuclei, for the whole image."
        )
        self.fit_tau_btn.clicked.connect(self.fit_tau_to_view)
        tau_row.addWidget(self.fit_tau_btn)
        form.addRow("Threshold τ", tau_row)
        form.addRow(self.tau_count)
        root.addLayout(form)

        self.models = _Collapsible("Models")
        mform = QFormLayout(self.models.body)
        mform.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        mform.setRowWrapPolicy(QFormLayout.WrapLongRows)
        det_row = QHBoxLayout()
        self.detector_label = QLabel("bundled")
        b = QPushButton("…")
        b.setFixedWidth(28)
        b.setToolTip("Choose a detector checkpoint (.safetensors)")
        b.clicked.connect(self._choose_detector)
        det_row.addWidget(self.detector_label, 1)
        det_row.addWidget(b)
        mform.addRow("Detector", det_row)
        self.encoder_combo = QComboBox()
        self.encoder_combo.addItems(encoder_choices())
        self.encoder_combo.setToolTip("default: the library's default encoder (DENUC_ENCODER, else the offline default)")
        self.encoder_combo.currentTextChanged.connect(self._on_encoder_changed)
        mform.addRow("Encoder", self.encoder_combo)
        head_row = QHBoxLayout()
        self.head_label = QLabel("default")
        self.head_label.setWordWrap(True)
        self.head_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        b = QPushButton("…")
        b.setFixedWidth(28)
        b.setToolTip("Load a head file (.safetensors with its .json sidecar)")
        b.clicked.connect(self._choose_head)
        head_row.addWidget(self.head_label, 1)
        head_row.addWidget(b)
        mform.addRow("Head", head_row)
        self.nms_spin = QDoubleSpinBox()
        self.nms_spin.setRange(0.5, 50.0)
        self.nms_spin.setDecimals(1)
        self.nms_spin.setSuffix(" µm")
        self.nms_spin.setValue(2.0)
        self.nms_spin.setToolTip("Two detections closer than this are one nucleus (the detector's own value until you change it)")
        self.nms_spin.valueChanged.connect(self._on_param_edited)
        mform.addRow("NMS radius", self.nms_spin)
        b = QPushButton("Project folder…")
        b.setToolTip("Where corrections and retrained heads are kept")
        b.clicked.connect(self._choose_project)
        mform.addRow(b)
        root.addWidget(self.models)

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
        self.progress_bar.setTextVisible(True)
        root.addWidget(self.progress_bar)

        box = QGroupBox("Classes")
        v = QVBoxLayout(box)
        cls_row = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("Class of new nuclei; keys 1-9 set the class of the selected nuclei")
        self.class_combo.currentTextChanged.connect(self._on_current_class_changed)
        self.set_class_btn = QPushButton("Set")
        self.set_class_btn.setToolTip("Set this class on the selected nuclei")
        self.set_class_btn.clicked.connect(lambda: self.set_class_of_selected(self.class_combo.currentText()))
        add_cls = QPushButton("+")
        add_cls.setFixedWidth(28)
        add_cls.setToolTip("Add a class")
        add_cls.clicked.connect(self._ask_new_class)
        cls_row.addWidget(self.class_combo, 1)
        cls_row.addWidget(self.set_class_btn)
        cls_row.addWidget(add_cls)
        v.addLayout(cls_row)
        self.legend_box = QWidget()
        self.legend_grid = QGridLayout(self.legend_box)
        self.legend_grid.setContentsMargins(0, 0, 0, 0)
        self.legend_checks: dict[str, QCheckBox] = {}
        v.addWidget(self.legend_box)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        v.addWidget(self.legend)
        view_row = QHBoxLayout()
        self.confidence_check = QCheckBox("Confidence view")
        self.confidence_check.setToolTip("Colour nuclei by their top class probability instead of their class")
        self.confidence_check.toggled.connect(self._on_confidence_view)
        self.size_spin = QDoubleSpinBox()
        self.size_spin.setRange(1.0, 30.0)
        self.size_spin.setDecimals(1)
        self.size_spin.setValue(L.MARKER_DIAMETER_UM)
        self.size_spin.setSuffix(" µm")
        self.size_spin.setToolTip("Marker diameter in micrometres (drawn at the image's resolution)")
        self.size_spin.valueChanged.connect(lambda _v: self._apply_marker_size())
        view_row.addWidget(self.confidence_check, 1)
        view_row.addWidget(self.size_spin)
        v.addLayout(view_row)
        root.addWidget(box)

        box = QGroupBox("Review")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.prev_btn = QPushButton("◀")
        self.prev_btn.setFixedWidth(32)
        self.prev_btn.setToolTip("Previous nucleus (Shift+N)")
        self.prev_btn.clicked.connect(lambda: self.review_next(back=True))
        self.next_btn = QPushButton("Review next (n)")
        self.next_btn.setToolTip("Centre on the least-confident unreviewed nucleus and select it; 1-9 or r answer and advance")
        self.next_btn.clicked.connect(lambda: self.review_next())
        self.review_filter = QComboBox()
        self.review_filter.addItem("all classes")
        self.review_filter.setToolTip("Review only nuclei predicted as this class")
        row.addWidget(self.prev_btn)
        row.addWidget(self.next_btn, 1)
        v.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Queue"))
        row.addWidget(self.review_filter, 1)
        v.addLayout(row)
        self.review_label = QLabel("")
        self.review_label.setWordWrap(True)
        v.addWidget(self.review_label)
        row = QHBoxLayout()
        self.review_btn = QPushButton("Reviewed (r)")
        self.review_btn.clicked.connect(self.mark_selected_reviewed)
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.setEnabled(False)
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn = QPushButton("Redo")
        self.redo_btn.setEnabled(False)
        self.redo_btn.clicked.connect(self.redo)
        row.addWidget(self.review_btn, 1)
        row.addWidget(self.undo_btn)
        row.addWidget(self.redo_btn)
        v.addLayout(row)
        root.addWidget(box)

        box = QGroupBox("Retrain")
        v = QVBoxLayout(box)
        self.retrain_btn = QPushButton("Retrain head")
        self.retrain_btn.setToolTip("Learn from your reviewed and edited nuclei; you see before/after and choose to keep it")
        self.retrain_btn.clicked.connect(self.retrain)
        v.addWidget(self.retrain_btn)
        self.retrain_report = QLabel("")
        self.retrain_report.setWordWrap(True)
        v.addWidget(self.retrain_report)
        row = QHBoxLayout()
        self.keep_btn = QPushButton("Keep new head")
        self.keep_btn.clicked.connect(lambda: self.answer_retrain(True))
        self.discard_btn = QPushButton("Discard")
        self.discard_btn.clicked.connect(lambda: self.answer_retrain(False))
        for b in (self.keep_btn, self.discard_btn):
            b.setVisible(False)
            row.addWidget(b)
        v.addLayout(row)
        root.addWidget(box)

        row = QHBoxLayout()
        b = QPushButton("Export…")
        b.clicked.connect(self._export_dialog)
        row.addWidget(b)
        b = QPushButton("Import…")
        b.clicked.connect(self._import_dialog)
        row.addWidget(b)
        root.addLayout(row)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        root.addWidget(self.status)
        root.addStretch(1)

    def _set_status(self, text: str):
        self.status.setText(text)

    def _on_param_edited(self, _value):
        if not self._setting_params:
            self._params_from_user = True

    def _on_mpp_edited(self, value):
        img = self.image_layer()
        if img is not None:  # kept for this image: new layers and restarts must not reset it
            self._mpp_user[img.name] = float(value)
        self.mpp_note.setText("set by you")
        self._apply_marker_size()

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
        if self.head_path is not None:
            self.head_label.setText(Path(self.head_path).name)
        else:
            head = getattr(pipe, "head", None)
            self.head_label.setText("bundled" if head is not None else "none (add classes, retrain)")
        if self.points_layer() is None:
            self._sync_classes()

    # ------------------------------------------------------------ layers
    def _image_layers(self):
        return [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Image"]

    def _layer_by_token(self, token):
        for lyr in self.viewer.layers:
            if L.token_of(lyr) == token and lyr.__class__.__name__ == "Points":
                return lyr
        return None

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
        if token in self._infos and _OWNERS.get(token) is self:
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

    # ----------------------------------------------------------- pipeline
    def _start_preload(self):
        _load_native_libs_on_main_thread()
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
                    self._head_note = f"{exc}. Using the default head; your corrections are kept (Retrain head makes a new one)."
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
        self.head_label.setText(Path(path).name if path else "default")
        self._sync_classes()

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
        fcur = self.review_filter.currentText()
        self.review_filter.blockSignals(True)
        self.review_filter.clear()
        self.review_filter.addItems(["all classes", *names])
        if fcur in names:
            self.review_filter.setCurrentText(fcur)
        self.review_filter.blockSignals(False)
        self._on_current_class_changed(self.class_combo.currentText())
        self._refresh_views()

    def _on_current_class_changed(self, name: str):
        lyr = self.points_layer()
        if lyr is not None and name in L.class_names(lyr):
            lyr.feature_defaults = L.feature_defaults(L.class_names(lyr), name)

    def _ask_new_class(self):
        name, ok = QInputDialog.getText(self, "Add a class", "Class name:")
        if ok and name.strip():
            self.add_class(name.strip())

    def add_class(self, name: str, color=None):
        """Add a class to the current points layer (and to the next head); undoable."""
        lyr = self.points_layer()
        if lyr is None:
            if name not in self.extra_classes:
                self.extra_classes.append(name)
            self._sync_classes()
            return
        names = list(L.class_names(lyr))
        if name in names:
            return
        colors = list(L.display_colors(names, L.class_colors(lyr)))
        colors.append(tuple(color) if color else L.palette(len(names) + 1)[-1])
        self._flush_moves()
        meta = lyr.metadata["denuc"]
        meta["class_names"] = names + [name]
        meta["class_colors"] = [list(c) for c in colors]
        self._write(lyr, features=E.with_new_class(lyr.features, name))
        self._record(lyr, f"add class {name}")
        self._sync_classes()

    # -------------------------------------------------------- low level
    @contextlib.contextmanager
    def _quiet(self):
        self._suppress += 1
        try:
            yield
        finally:
            self._suppress -= 1

    def _write(self, lyr, data=None, features=None, rows=None):
        """Put new data/features into the layer, with colours following.

        ``rows``: only these rows changed (a relabel, a review): the columns are swapped inside
        the layer's own table and only those rows are recoloured, so a review step stays fast
        on tens of thousands of nuclei (every full colour update costs napari ~40 ms at 20,000).
        """
        with self._quiet():
            if rows is not None and data is None and features is not None and len(features) == len(lyr.data):
                table = lyr.features
                for c in features.columns:
                    table[c] = features[c].array
                self._sync_style(lyr, rows)
                return
            if data is not None:
                lyr.selected_data = set()
                lyr.data = data
            if features is not None:
                lyr.features = features
            self._sync_style(lyr)

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

    def _history(self, lyr) -> History:
        token = L.token_of(lyr)
        h = self._histories.get(token)
        if h is None:
            h = self._histories[token] = History(lyr)
        return h

    def _record(self, lyr, label: str, extra=None):
        act = self._history(lyr).record(lyr, label, extra)
        self._mark_dirty(lyr)
        self._refresh_views()
        return act

    def _mark_dirty(self, lyr):
        token = L.token_of(lyr)
        if token in self._infos:
            self._dirty.add(token)
            self._autosave_timer.start()

    def _next_nid(self, lyr) -> int:
        info = self._infos[L.token_of(lyr)]
        f = lyr.features
        if "nid" in f and len(f):
            info["next_nid"] = max(info.get("next_nid", 0), int(np.asarray(f["nid"]).max()) + 1)
        return info.get("next_nid", 0)

    def _set_next_nid(self, lyr, value: int):
        self._infos[L.token_of(lyr)]["next_nid"] = int(value)

    # ---------------------------------------------------------- editing
    def _on_data_event(self, event):
        """napari's own edits (mouse add/move/delete, paste): recategorise, flag, record, autosave."""
        if self._suppress:
            return
        lyr = self._layer_by_token(L.token_of(event.source))
        if lyr is None:
            return
        if self._retired:  # dock closed: napari's own edits are still saved, by the layer's owner only
            if _OWNERS.get(L.token_of(lyr)) is self and not str(getattr(event, "action", "")).endswith("ing"):
                self._mark_dirty(lyr)
            return
        action = str(getattr(event, "action", ""))
        if action.endswith(("adding", "removing")):
            self._flush_moves()  # a move just before is its own action
            return
        if action.endswith("changing"):
            return
        self._normalise(lyr)
        if action.endswith("added"):
            n = len(lyr.data)
            rows = sorted({int(i) % n for i in (getattr(event, "data_indices", ()) or ()) if n and -n <= int(i) < n})
            if rows:  # placed by hand: the user's, whatever napari copied into them from a selected nucleus
                self._write(lyr, features=L.placed_by_hand(lyr.features, rows))
            self._record(lyr, "add")
        elif action.endswith("removed"):
            self._tombstone_removed(lyr)
            self._record(lyr, "delete")
        elif action.endswith("changed"):
            idx = [int(i) for i in (getattr(event, "data_indices", ()) or ()) if 0 <= int(i) < len(lyr.data)]
            if idx and len(idx) < len(lyr.data):
                f = lyr.features
                edited, _ = L.flags(f, len(f))
                if not edited[idx].all():
                    self._write(lyr, features=L.with_flags(f, idx, edited=True))
            self._pending_move.add(L.token_of(lyr))
            self._move_timer.start()

    def _flush_moves(self):
        self._move_timer.stop()
        for token in list(self._pending_move):
            self._pending_move.discard(token)
            lyr = self._layer_by_token(token)
            if lyr is not None:
                self._record(lyr, "move")

    def _normalise(self, lyr):
        """Give added/pasted rows ids and restore the column types napari drops on append."""
        names = L.class_names(lyr)
        f, nxt, changed = L.recategorise(lyr.features, names, self._next_nid(lyr))
        self._set_next_nid(lyr, nxt)
        if changed:
            self._write(lyr, features=f)
        else:
            self._sync_style(lyr)

    def _tombstone_removed(self, lyr):
        """Remember where deleted model nuclei were, so a re-detection does not bring them back."""
        _, old_f, _ = self._history(lyr).state()
        old_d = self._history(lyr).state()[0]
        gone = ~np.isin(np.asarray(old_f["nid"]), np.asarray(lyr.features["nid"]))
        if not gone.any():
            return
        src = np.asarray(old_f["source"].astype(str))[gone]
        scores = np.asarray(old_f["score"], dtype=np.float32)[gone]
        conf_known = np.isfinite(np.asarray(old_f[[c for c in old_f.columns if c.startswith("prob_")]], dtype=np.float32)[gone]).any(axis=1) if len(old_f.columns) else np.zeros(int(gone.sum()), bool)
        model_made = (src == "model") | conf_known | (scores < 1.0)
        if model_made.any():
            xy = rc_to_xy(old_d[gone][model_made])
            meta = lyr.metadata["denuc"]
            meta["tombstones"] = list(meta.get("tombstones") or []) + np.round(xy, 3).tolist()

    def set_class_of_selected(self, name: str, lyr=None) -> int:
        """Set the class of the selected nuclei (undoable); they become edited and reviewed."""
        lyr = self._resolve(lyr)
        if lyr is None or not lyr.selected_data:
            self._set_status("Select nuclei first (select mode, click or drag), then choose their class.")
            return 0
        if name not in L.class_names(lyr):
            show_warning(f"unknown class {name!r}")
            return 0
        sel = sorted(int(i) for i in lyr.selected_data)
        self._flush_moves()
        f = lyr.features
        before = np.asarray(f["class"].cat.codes)[sel]
        self._write(lyr, features=L.with_class(f, sel, name), rows=sel)
        self._record(lyr, f"class {name}")
        n = int((before != L.class_names(lyr).index(name)).sum())
        self._set_status(f"{len(sel)} nuclei set to {name} ({n} changed).")
        self._advance_review(lyr, sel)
        return n

    def mark_selected_reviewed(self, lyr=None):
        lyr = self._resolve(lyr)
        if lyr is None or not lyr.selected_data:
            self._set_status("Select the nuclei you have checked, then mark them reviewed.")
            return
        sel = sorted(int(i) for i in lyr.selected_data)
        self._flush_moves()
        self._write(lyr, features=L.with_flags(lyr.features, sel, reviewed=True), rows=sel)
        self._record(lyr, "reviewed")
        self._set_status(f"{len(sel)} {'nucleus' if len(sel) == 1 else 'nuclei'} marked reviewed.")
        self._advance_review(lyr, sel)

    def _resolve(self, lyr):
        """A layer handed to a key binding is napari's own object: use the viewer's handle for it."""
        if lyr is None:
            return self.points_layer()
        return self._layer_by_token(L.token_of(lyr)) or lyr

    # -------------------------------------------------------- undo/redo
    def _apply_state(self, lyr, data, features, act, undo):
        with self._quiet():
            lyr.selected_data = set()
            lyr.data = data
            lyr.features = features
            names = L.class_names(lyr)
            lyr.feature_defaults = L.feature_defaults(names, self.class_combo.currentText())
            self._sync_style(lyr)
        if "tau" in act.extra:  # the threshold control follows its own undo/redo
            tau = act.extra["tau"][0 if undo else 1]
            self._tau_shown[L.token_of(lyr)] = tau
            self._show_tau(tau)
        head = act.extra.get("head_before" if undo else "head_after")
        if head is not None:
            obj, path = head
            self.set_head(path, obj)

    def undo(self, lyr=None):
        """Undo the last change to the points layer (any edit, the widget's or napari's)."""
        return self._undo_redo(lyr, True)

    def redo(self, lyr=None):
        return self._undo_redo(lyr, False)

    def _undo_redo(self, lyr, undo: bool):
        lyr = self._resolve(lyr)
        if lyr is None:
            return None
        self._flush_moves()
        h = self._history(lyr)
        h.record(lyr, "edit")  # anything not yet recorded becomes its own step first
        act = h.undo(lyr, self._apply_state) if undo else h.redo(lyr, self._apply_state)
        if act is None:
            return None
        self._next_nid(lyr)
        self._mark_dirty(lyr)
        self._sync_classes()
        self._set_status(f"{'Undid' if undo else 'Redid'} {act.label}.")
        return act

    # ------------------------------------------------------------- views
    def _refresh_views(self):
        lyr = self.points_layer()
        self._update_legend(lyr)
        self._update_review_label(lyr)
        self._update_tau_count(lyr)
        h = self._histories.get(L.token_of(lyr)) if lyr is not None else None
        self.undo_btn.setEnabled(bool(h and h.undo_stack))
        self.redo_btn.setEnabled(bool(h and h.redo_stack))
        if h and h.undo_stack:
            self.undo_btn.setToolTip(f"Undo {h.undo_stack[-1].label} (Ctrl+Z)")

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

    # ------------------------------------------------------------ review
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

    # ------------------------------------------------------- threshold
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
        self._flush_moves()
        h = self._history(lyr)
        h.record(lyr, "edit")
        top = h.undo_stack[-1] if h.undo_stack and h.undo_stack[-1].label == "threshold" else None
        tau_before = top.extra["tau"][0] if top is not None else self._tau_shown.get(L.token_of(lyr), tau)
        h.pop_top_if("threshold", lyr, self._apply_state)  # consecutive threshold moves are one step
        det, _ = c.select(tau)
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

    # -------------------------------------------------------------- run
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

    def _progress_cb(self, done, total):
        if self._cancel.is_set():
            raise Cancelled()
        self._relay.progress.emit(int(done), int(max(total, 1)))

    def _start_worker(self, fn, on_done, title, on_cancelled=None):
        _load_native_libs_on_main_thread()
        self._cancel.clear()
        self.run_btn.setEnabled(False)
        self.retrain_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        if not self._loading:
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
            if self._retired:  # the dock was closed meanwhile: the layers answer to the open widget now
                return
            if ok and self._cancel.is_set():  # Cancel pressed after the last progress step: still cancelled
                if on_cancelled is not None:
                    on_cancelled(value)
                ok, value = False, Cancelled()
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
        if self._loading:
            self._end_loading()
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
        self._flush_moves()
        self._history(lyr).record(lyr, "edit")
        names_layer = L.class_names(lyr)
        det = self._classes_onto_layer(lyr, det)
        mpp = float(self.mpp_spin.value())
        d, f, nxt, kept = E.merge_detections(
            lyr.data, lyr.features, det, region=cands.region, poly=cands.poly,
            radius_px=float(self.nms_spin.value()) / mpp,
            tombstones=lyr.metadata["denuc"].get("tombstones") or (), next_nid=self._next_nid(lyr),
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
        self._set_status(" ".join(t for t in (msg, self._notes.pop(token, "")) if t))

    def _classes_onto_layer(self, lyr, det):
        """``det`` on the layer's class list; classes the layer lacks are added to it first."""
        names = list(L.class_names(lyr))
        missing = [n for n in det.class_names if n not in names]
        for n in missing:
            colors = list(L.display_colors(names, L.class_colors(lyr)))
            k = list(det.class_names).index(n)
            colors.append(tuple(det.class_colors[k]) if k < len(det.class_colors) else L.palette(len(names) + 1)[-1])
            names.append(n)
            lyr.metadata["denuc"]["class_names"] = list(names)
            lyr.metadata["denuc"]["class_colors"] = [list(c) for c in colors]
            self._write(lyr, features=E.with_new_class(lyr.features, n))
        if missing:
            self._record(lyr, "add classes")
        return E.to_classes(det, names, L.class_colors(lyr))

    def _adopt(self, lyr, image_layer, key=None):
        """Track ``lyr`` as the points layer of ``image_layer``: events, keys, autosave, undo."""
        if key is None:
            key = self._image_key(image_layer)
        token = L.token_of(lyr)
        _OWNERS[token] = self
        meta = lyr.metadata["denuc"]
        meta["image"] = image_layer.name
        base = session.corrections_path(image_layer.name, key, self._store_image_path(image_layer), self.project_dir)
        taken = {Path(i["path"]) for t, i in self._infos.items() if t != token}
        own = meta.get("corrections")  # adopted again (dock reopened): the file it has been writing to stays its own
        path = Path(own) if own and Path(own) not in taken else session.numbered(base, self._copy_number(base, token))
        meta["corrections"] = str(path)
        if path != base:
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

    def _copy_number(self, base, token=None) -> int:
        """1 for the image's own corrections file ``base``; 2, 3, ... while other open nuclei layers
        write to those (the same image file open twice, or two nuclei layers of one image): one file
        each, or the last writer would win and the other's corrections be lost on reopening."""
        taken = {Path(i["path"]) for t, i in self._infos.items() if t != token}
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

    def copy_selected(self, lyr=None):
        """Ctrl+C on the points layer: remember the selected nuclei's positions and classes."""
        lyr = self._resolve(lyr)
        if lyr is None or not lyr.selected_data:
            return
        sel = sorted(int(i) for i in lyr.selected_data)
        self._clipboard = (np.asarray(lyr.data)[sel].copy(), lyr.features["class"].astype(str).to_numpy()[sel].copy())
        self._set_status(f"Copied {len(sel)} {'nucleus' if len(sel) == 1 else 'nuclei'} (Ctrl+V pastes).")

    def paste(self, lyr=None):
        """Ctrl+V: add the copied nuclei at their places with their classes, as the user's nuclei; one undo step."""
        lyr = self._resolve(lyr)
        clip = self._clipboard
        if lyr is None or clip is None or not len(clip[0]):
            return
        data, classes = clip
        self._flush_moves()
        names = L.class_names(lyr)
        n0 = len(lyr.data)
        with self._quiet():
            lyr.add(data)
        rows = list(range(n0, len(lyr.data)))
        self._normalise(lyr)
        f = L.placed_by_hand(lyr.features, rows)
        for name in set(classes):
            if name in names:
                f = L.with_class(f, [r for r, c in zip(rows, classes) if c == name], name)
        self._write(lyr, features=f)
        with self._quiet():
            lyr.selected_data = set(rows)
        lyr.feature_defaults = L.feature_defaults(names, self._new_class(lyr))
        self._record(lyr, "paste")
        self._set_status(f"Pasted {len(rows)} {'nucleus' if len(rows) == 1 else 'nuclei'}.")

    def _on_mode_changed(self, event):
        lyr = self._layer_by_token(L.token_of(event.source))
        if lyr is not None:
            lyr.help = KEYS_HELP  # napari rewrites the help line on every mode change

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

    # ----------------------------------------------------------- retrain
    def retrain(self):
        """Retrain the head on reviewed and edited nuclei (background); the user then keeps or discards it."""
        if self._worker is not None:
            return
        lyr = self.points_layer()
        image_layer = self.image_layer()
        if lyr is None or image_layer is None or not len(lyr.data):
            self._set_status("Run Detect & classify (or import points) on an image first.")
            return
        self._flush_moves()
        self._t_press = time.perf_counter()
        f = lyr.features
        edited, reviewed = L.flags(f, len(f))
        train = edited | reviewed
        if not train.any():
            self._set_status("Review or correct some nuclei first (1-9 sets a class, r confirms one).")
            return
        xy_all = rc_to_xy(lyr.data)
        # A point placed off the image has no pixels to describe it: it must not teach the head.
        full = image_layer.data[0] if getattr(image_layer, "multiscale", False) else image_layer.data
        h, w = full.shape[:2]
        inside = (xy_all[:, 0] >= -0.5) & (xy_all[:, 0] <= w - 0.5) & (xy_all[:, 1] >= -0.5) & (xy_all[:, 1] <= h - 0.5)
        n_outside = int((train & ~inside).sum())
        open_mask = ~train & inside  # unedited, unreviewed, on the image: what a new head may reclassify
        train = train & inside
        if not train.any():
            self._set_status(f"All {n_outside} of your corrected nuclei lie outside the image; nothing to learn from.")
            return
        names = L.class_names(lyr)
        colors = L.class_colors(lyr)
        labels = L.class_ids(lyr)[train]
        nids = np.asarray(f["nid"], dtype=np.int64)
        open_idx = np.flatnonzero(open_mask)
        current = L.class_ids(lyr)[open_idx]
        mpp = float(self.mpp_spin.value())
        data = image_layer.data
        multiscale = bool(getattr(image_layer, "multiscale", False))
        meta = dict(getattr(image_layer, "metadata", None) or {})
        slide_path = meta.get("path") if meta.get("slide") else None  # opened by the slide reader
        image_key = self._image_key(image_layer)
        project = self.project_dir
        token = L.token_of(lyr)

        def job():
            from ..io.images import as_rgb_uint8
            from ..retrain import retrain_head

            pipe = self._ensure_pipeline()
            model_mpp = float(getattr(pipe.encoder, "mpp", 0.5) or 0.5)
            arr, fct = self._level_for(image_layer, model_mpp, mpp) if multiscale else (data, 1.0)
            t0 = time.perf_counter()
            key = (image_key, getattr(pipe.encoder, "id", ""), round(mpp, 6), fct)
            feats, found = self.features_memo.get(key, xy_all)
            missing = np.flatnonzero(~found & inside)  # only nuclei the encoder has not seen (added, moved)
            if len(missing) and slide_path:
                # A slide: read only the encoder windows around these nuclei, never a whole level.
                from ..wsi.slide_features import slide_features

                new = slide_features(pipe.encoder, slide_path, xy_all[missing], mpp=mpp, progress=self._progress_cb)
            elif len(missing):
                image = as_rgb_uint8(np.asarray(arr))
                new = pipe.features_at(image, rescale_points(xy_all[missing], 1.0 / fct), mpp * fct, progress=self._progress_cb)
            if len(missing):
                self.features_memo.put(key, xy_all[missing], new)
                if feats is None:
                    feats = np.zeros((len(xy_all), new.shape[1]), np.float32)
                feats[missing] = new
            t_feat = time.perf_counter() - t0
            enc_id = getattr(pipe.encoder, "id", "") or "encoder"
            path = session.next_head_path(session.heads_dir(project), enc_id)
            # The head reads each nucleus with its neighbours: every nucleus on the image is context.
            on_image = np.flatnonzero(inside)
            row = np.full(len(xy_all), -1)
            row[on_image] = np.arange(len(on_image))
            x = pipe.head.inputs(feats[on_image], xy_all[on_image], mpp) if pipe.head is not None else feats[on_image]
            res = retrain_head(pipe.head, x[row[train]], labels, names, colors, path, metadata={"image": image_layer.name})
            probs = np.asarray(res.head.predict_proba(x[row[open_idx]]), dtype=np.float32) if len(open_idx) else np.zeros((0, len(names)), np.float32)
            fit_info = getattr(res, "fit_info", None)
            if isinstance(fit_info, dict):
                fit_info["features_s"] = t_feat
                fit_info["points_sampled"] = len(missing)
            return res, probs, len(missing)

        def done(result):
            res, probs, n_sampled = result
            new_ids = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
            changed = int((new_ids != current).sum())
            self.pending_retrain = {
                "result": res, "token": token, "nids": nids[open_idx], "probs": probs, "changed": changed,
                "n_open": len(open_idx), "names": names, "head_before": (self.pipeline.head, self.head_path),
            }
            self.timings["retrain_s"] = time.perf_counter() - self._t_press
            self.last_result = res
            self.last_summary = self._retrain_summary(res, changed, len(open_idx), n_sampled)
            if n_outside:
                self.last_summary += f"\nSkipped {n_outside} corrected nuclei outside the image."
            self.retrain_report.setText(self.last_summary)
            self.keep_btn.setVisible(True)
            self.discard_btn.setVisible(True)
            self.progress_bar.setValue(100)
            self._set_status("Keep the new head or discard it (nothing has changed yet).")

        self._start_worker(job, done, "Retraining the head", on_cancelled=lambda r: self._delete_head_files(r[0].path))

    @staticmethod
    def _retrain_summary(res, changed, n_open, n_sampled) -> str:
        per = getattr(res, "per_class", None) or {}
        n_ex = getattr(res, "n_examples", None)
        lines = [f"Learned from {n_ex} of your nuclei" + (f" ({', '.join(f'{k} {v}' for k, v in per.items())})." if per else ".")]
        b, a = getattr(res, "acc_before", None), getattr(res, "acc_after", None)
        n_eval = getattr(res, "n_eval", None)
        if b is not None and a is not None:
            if hasattr(res, "n_eval"):  # both heads scored on the same held-out folds of your nuclei
                on = f" on the same {n_eval} held-out nuclei of yours" if n_eval else " on the same held-out folds"
                lines.append(f"Accuracy{on}: old head {100 * b:.1f}% → new head {100 * a:.1f}%.")
            else:  # an older retrain_head: the two figures are not measured the same way
                lines.append(f"Accuracy on your nuclei: old head {100 * b:.1f}% (as is), new head {100 * a:.1f}% (cross-validated).")
            if a < b:
                lines.append("The new head is worse on your nuclei: discarding it is advised.")
        else:
            lines.append("Too few examples to estimate accuracy yet.")
        lines.append(f"{changed} of {n_open} unedited, unreviewed nuclei would change class.")
        lines.append(f"Features: {n_sampled} nuclei newly sampled, the rest from the cache.")
        return "\n".join(lines)

    def answer_retrain(self, keep: bool):
        """Keep (apply the new head to unedited nuclei, undoable) or discard (nothing changes) the new head."""
        p, self.pending_retrain = self.pending_retrain, None
        self.keep_btn.setVisible(False)
        self.discard_btn.setVisible(False)
        if p is None:
            return
        res = p["result"]
        lyr = self._layer_by_token(p["token"])
        if not keep or lyr is None:
            self._delete_head_files(res.path)
            self.retrain_report.setText(self.retrain_report.text() + "\nDiscarded: the previous head stays.")
            self._set_status("New head discarded; your head and classes are unchanged.")
            return
        self._flush_moves()
        self._history(lyr).record(lyr, "edit")
        f = lyr.features
        nids = np.asarray(f["nid"], dtype=np.int64)
        pos = {int(n): i for i, n in enumerate(nids)}
        rows = np.array([pos.get(int(n), -1) for n in p["nids"]], dtype=np.int64)
        ok = rows >= 0
        if ok.any():
            _, reviewed = L.flags(f, len(f))
            edited, _ = L.flags(f, len(f))
            ok &= ~(edited | reviewed)[np.where(rows >= 0, rows, 0)]  # answered since: the user's word stands
        probs = p["probs"][ok]
        new_f, changed = L.with_predictions(f, rows[ok], probs.argmax(1) if len(probs) else [], probs)
        before = p["head_before"]
        self.set_head(res.path, res.head)
        self._write(lyr, features=new_f)
        self._record(lyr, "retrain", extra={"head_before": before, "head_after": (res.head, str(res.path))})
        self.retrain_report.setText(self.retrain_report.text() + f"\nKept: {changed} nuclei changed class.")
        self._set_status(f"New head {Path(res.path).name} in use; {changed} nuclei changed class (Undo reverts).")

    @staticmethod
    def _delete_head_files(path):
        """Remove a head the user did not keep (weights, sidecar, prior sample)."""
        from ..io.naming import prior_path, sidecar_path

        for q in (Path(path), sidecar_path(path), prior_path(path)):
            with contextlib.suppress(OSError):
                q.unlink()

    # ------------------------------------------------------ import/export
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
        self._flush_moves()
        self._history(lyr).record(lyr, "edit")
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
        if n_skipped:
            msg += f" {n_skipped} fell on your edited or reviewed nuclei and were skipped."
        self._set_status(" ".join(t for t in (msg, self._notes.pop(L.token_of(lyr), "")) if t))
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
        self._flush_moves()
        for token in list(self._dirty):
            lyr = self._layer_by_token(token)
            if lyr is not None:
                self._save_token(token, lyr)

    def _save_token(self, token, lyr):
        info = self._infos.get(token)
        self._dirty.discard(token)
        if info is None or _OWNERS.get(token) is not self:  # another widget answers for it now
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
        path = session.numbered(base, k)
        state = session.load_corrections(path, key)
        if state is None and self.project_dir is not None:  # saved before a project folder was chosen
            path = session.numbered(session.corrections_path(image_layer.name, key, store, None), k)
            state = session.load_corrections(path, key)
        if state is None or (not state.get("xy") and not state.get("tombstones")):
            if k > 1:
                self._set_status(f"'{image_layer.name}' is an image already open with its nuclei: nuclei detected "
                                 f"here are saved separately, to {session.numbered(base, k).name}.")
            return None
        det, source, reviewed = session.state_to_detections_and_flags(state)
        mpp_user = state.get("mpp_user")
        if isinstance(mpp_user, (int, float)) and mpp_user > 0:  # the resolution the user typed for this image
            self._mpp_user[image_layer.name] = float(mpp_user)
            if self.image_layer() is not None and self.image_layer().name == image_layer.name:
                self._on_image_changed(image_layer.name)
        lyr = self._new_layer(image_layer, det, source=source, reviewed=reviewed, state=state)
        head = state.get("head")
        if head and Path(head).is_file():
            self.set_head(head)
        tau = state.get("tau")
        if isinstance(tau, (int, float)) and 0 < tau < 1:  # e.g. fitted to a corrected view: the next detection uses it too
            self._tau_shown[L.token_of(lyr)] = float(tau)
            self._tau_restored = True
            self._show_tau(tau)
        self._sync_classes()
        n_edit = int((np.asarray(source) == "edited").sum())
        self._restored_note = f"Restored {len(det)} nuclei ({n_edit} edited) from {path}."
        self._notes.pop(L.token_of(lyr), None)  # the note names the file already
        more = session.numbered(path, 2) if k == 1 else session.numbered(base, k + 1)
        if more.is_file():  # saved while the image was open twice: it comes back with the next copy opened
            self._restored_note += f" Another set of corrections for this image is in {more.name}: open the image once more to see it."
        self._set_status(self._restored_note)
        return lyr

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

