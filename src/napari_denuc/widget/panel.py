"""The dock's controls: what the user sees and presses, wired to the widget's actions."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..io.images import DEFAULT_MPP
from . import layer as L
from .models import encoder_choices

SCOPES = ("Whole image", "Current field of view", "Inside Shapes ROI")


MAX_DOCK_WIDTH = 340  # < 27% of a 1280 px screen


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


class PanelMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

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
        self._build_image_form(root)
        self._build_models(root)
        self._build_run(root)
        self._build_classes(root)
        self._build_review(root)
        self._build_retrain(root)
        self._build_files_and_status(root)

    def _build_image_form(self, root):
        """Image, resolution, scope and threshold τ."""
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

    def _build_models(self, root):
        """The folded Models section: detector, encoder, head, NMS radius, project folder."""
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

    def _build_run(self, root):
        """Detect & classify, Cancel and the progress bar."""
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

    def _build_classes(self, root):
        """The class list, its legend (check boxes hide a class), confidence view and marker size."""
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

    def _build_review(self, root):
        """The review queue, Reviewed, Undo, Redo."""
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
        self.review_btn.clicked.connect(lambda: self.mark_selected_reviewed())  # not clicked's checked flag as the layer
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.setEnabled(False)
        self.undo_btn.clicked.connect(lambda: self.undo())
        self.redo_btn = QPushButton("Redo")
        self.redo_btn.setEnabled(False)
        self.redo_btn.clicked.connect(lambda: self.redo())
        row.addWidget(self.review_btn, 1)
        row.addWidget(self.undo_btn)
        row.addWidget(self.redo_btn)
        v.addLayout(row)
        root.addWidget(box)

    def _build_retrain(self, root):
        """Retrain head, its report, Keep / Discard."""
        box = QGroupBox("Retrain")
        v = QVBoxLayout(box)
        self.retrain_btn = QPushButton("Retrain head")
        self.retrain_btn.setToolTip("Learn from your reviewed and edited nuclei; you see before/after and choose to keep it")
        self.retrain_btn.clicked.connect(self.retrain)
        self.bundled_btn = QPushButton("Use bundled head")
        self.bundled_btn.setToolTip("Go back to the head the plugin ships with: your unedited, unreviewed nuclei "
                                    "are reclassified by it (Undo reverts); edited and reviewed ones stay as they are")
        self.bundled_btn.clicked.connect(self.use_bundled_head)
        self.bundled_btn.setVisible(False)  # shown while another head is in use
        row = QHBoxLayout()
        row.addWidget(self.retrain_btn, 1)
        row.addWidget(self.bundled_btn)
        v.addLayout(row)
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

    def _build_files_and_status(self, root):
        """Export…, Import… and the status line."""
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

    def _set_status(self, text: str, token: str | None = None):
        """``text``, followed by the note held for the layer ``token`` (told once), if any."""
        note = self._notes.pop(token, "") if token is not None else ""
        self.status.setText(" ".join(t for t in (text, note) if t))
