"""The DeNuC dock widget: detect, classify, correct, review, retrain, export.

Qt through qtpy only; public napari API only (a menu-opened widget gets a ``PublicOnlyProxy``
viewer, and every layer it hands out is a new proxy object). Layers are therefore known by
the token in ``layer.metadata["denuc"]``, never by ``id()``. torch/timm are imported by the
pipeline, which is built in a worker thread as soon as the widget opens.

The widget's methods live in one module per job (each a mixin of :class:`DenucWidget`, which
holds all the state, set here in ``__init__``):

- ``panel``: the dock's controls;
- ``models``: building the pipeline in the background, choosing detector, encoder, head;
- ``images``: the image layer worked on, its resolution and content key;
- ``tracking``: the nuclei layers: adoption, key bindings, the viewer's layer events;
- ``editing``: every change to a nuclei layer (napari's edits, the keys' actions) and undo/redo;
- ``views``: colours, legend, class list, hidden classes, marker size;
- ``review``: the review queue;
- ``threshold``: τ over cached candidates and Fit to view;
- ``detect``: Detect & classify;
- ``workers``: background jobs, progress, Cancel;
- ``retraining``: Retrain head, keep or discard;
- ``transfer``: import and export;
- ``persistence``: autosave, restore, project folder, closing the dock.
"""

from __future__ import annotations

import threading

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from . import edits as E
from . import layer as L
from . import session
from .detect import DetectMixin
from .editing import EditingMixin
from .history import History
from .images import ImagesMixin
from .models import ModelsMixin
from .panel import PanelMixin
from .persistence import PersistenceMixin
from .retraining import RetrainingMixin
from .review import ReviewMixin
from .threshold import ThresholdMixin
from .tracking import TrackingMixin
from .transfer import TransferMixin
from .views import ViewsMixin
from .workers import ProgressRelay, WorkersMixin

AUTOSAVE_DELAY_MS = 500
MOVE_SETTLE_MS = 250  # a drag emits one data event per mouse move: record the move once it settles


class DenucWidget(
    PanelMixin, ModelsMixin, ImagesMixin, TrackingMixin, EditingMixin, ViewsMixin, ReviewMixin,
    ThresholdMixin, DetectMixin, WorkersMixin, RetrainingMixin, TransferMixin, PersistenceMixin, QWidget,
):
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
        self.head_path = session.load_head()  # the head kept (or chosen) last, in an earlier session too; None: the default head
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

        self._relay = ProgressRelay()
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
