"""Detector + frozen encoder + linear head on one image: the DeNuC pipeline."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import DenucError
from .io.images import as_rgb_uint8
from .results import Detections

# Heads shipped in weights/, per encoder. The encoders read the neck of a frozen detector of
# their own (encoders.lite.bundled_neck), so the heads fit any detector.
BUNDLED_HEADS = {"effnet-lite0-nuclei": "effnet_lite0_nuclei_head.safetensors", "effnet-lite0": "effnet_lite0_head.safetensors",
                 "lite": "lite_head.safetensors"}


def bundled_head_path(encoder: str = "effnet-lite0-nuclei") -> Path | None:
    """The head shipped for ``encoder`` (None when there is none)."""
    name = BUNDLED_HEADS.get(encoder)
    return Path(str(resources.files("napari_denuc") / "weights" / name)) if name else None


def head_encoder_name(head) -> str | None:
    """The encoder a head file was trained with, by name, or None when it does not say.

    ``denuc-train head`` records the name (``"encoder"`` in the sidecar); a head without it (an
    older one) is known when its encoder id is that of a bundled head's, e.g. a head trained on ``lite``.
    """
    import json

    from .io.naming import sidecar_path

    def meta(path):
        try:
            return json.loads(sidecar_path(path).read_text())
        except (OSError, ValueError):
            return {}

    own = meta(head)
    if own.get("encoder"):
        return str(own["encoder"])
    for name in BUNDLED_HEADS:
        if own.get("encoder_id") and meta(bundled_head_path(name)).get("encoder_id") == own["encoder_id"]:
            return name
    return None


def default_encoder_name() -> str:
    """``$DENUC_ENCODER`` if set; else ``uni2-h`` when its weights are cached; else the offline
    ``effnet-lite0-nuclei`` (``encoders.default_encoder_name``)."""
    from .encoders import default_encoder_name as cached_or_lite

    return os.environ.get("DENUC_ENCODER") or cached_or_lite()


def resolve_models(encoder=None, head=None, encoder_weights=None) -> tuple[str, object]:
    """``(encoder name, head path or None)`` that ``Pipeline.from_defaults`` builds for these
    arguments: the encoder given, else the default; the head given, else (or for ``"bundled"``) the
    encoder's bundled head (none for own encoder weights). Cheap: no model is loaded."""
    bundled = str(head) == "bundled"  # as in denuc-train head --from-head bundled
    if bundled:
        head = None
    name = encoder or default_encoder_name()
    shipped = bundled_head_path(name) if encoder_weights is None else None
    if head is None and shipped is not None and shipped.is_file():
        head = shipped
    elif bundled:
        raise DenucError(f"no head is shipped for the encoder {name!r}" + (" with your own --encoder-weights" if encoder_weights else ""))
    return name, head


def _phase(progress, start: float, span: float):
    """Map a (done, total) callback of one phase onto a 0-100 overall scale."""
    if progress is None:
        return None
    return lambda done, total: progress(int(start + span * done / max(total, 1)), 100)


class Pipeline:
    """Runs the detector, then the encoder at the detected points, then the head.

    With no head the pipeline still detects, and every nucleus gets the single class
    ``nucleus`` (train a head from corrections in napari, or with ``denuc-train head``).
    """

    def __init__(self, detector, encoder=None, head=None, detect_options: dict | None = None):
        self.detector = detector
        self.encoder = encoder
        self.head = head
        # extra keyword arguments of every detector call, e.g. {"batch_size": 8} (windows per forward pass)
        self.detect_options = dict(detect_options or {})
        if head is not None and encoder is not None and head.feature_dim != encoder.feature_dim:
            raise DenucError(
                f"the head expects {head.feature_dim}-d features from encoder {head.encoder_id!r}, "
                f"but encoder {encoder.id!r} gives {encoder.feature_dim}-d"
            )

    @classmethod
    def from_defaults(cls, detector=None, encoder=None, head=None, device=None, encoder_weights=None):
        """Build from paths/names; None means the bundled detector, the default encoder and the
        encoder's bundled head (also for ``head="bundled"``)."""
        from .detection.checkpoint import load_detector
        from .encoders import get_encoder
        from .encoders.lite import bundled_neck
        from .head import LinearHead

        det = load_detector(detector, device=device)
        name, head = resolve_models(encoder, head, encoder_weights)
        enc = get_encoder(name, detector=bundled_neck(device).model, weights=encoder_weights, device=device)
        lin = LinearHead.load(head, encoder=enc) if head is not None else None
        return cls(det, enc, lin)

    @property
    def tau(self) -> float:
        return self.detector.tau

    @property
    def nms_um(self) -> float:
        return self.detector.nms_um

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.head.class_names) if self.head is not None else ("nucleus",)

    @property
    def class_colors(self):
        return tuple(self.head.class_colors) if self.head is not None else ()

    def detect(self, image, mpp: float, tau=None, nms_um=None, progress=None):
        return self.detector.detect(image, mpp, tau=tau, nms_um=nms_um, progress=progress, **self.detect_options)

    def features_at(self, image, xy, mpp: float, progress=None) -> np.ndarray:
        if self.encoder is None:
            raise DenucError("this pipeline has no encoder")
        return self.encoder.features_at(image, np.asarray(xy, dtype=np.float64).reshape(-1, 2), mpp, progress=progress)

    def classify(self, image, xy, mpp: float, progress=None):
        """(class_ids, probs, background) for points ``xy``; requires a head.

        ``xy`` should be all the nuclei of the image: a head with context reads each one's neighbours.

        ``background`` is each point's probability of being no nucleus at all (zeros unless
        the head was trained with a background class).
        """
        if self.head is None:
            raise DenucError("this pipeline has no classification head")
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        k = len(self.head.class_names)
        if len(xy) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, k), dtype=np.float32), np.zeros(0, dtype=np.float32)
        inputs = self.head.inputs(self.features_at(image, xy, mpp, progress=progress), xy, mpp)
        probs = self.head.predict_proba(inputs)
        return probs.argmax(1), probs, self.head.background_proba(inputs)

    def run(
        self,
        image,
        mpp: float,
        progress: Callable[[int, int], None] | None = None,
        roi: tuple[float, float, float, float] | None = None,
        tau: float | None = None,
        nms_um: float | None = None,
        return_features: bool = False,
    ) -> Detections | tuple[Detections, np.ndarray | None]:
        """Detect and classify nuclei in ``image`` (RGB, any size) at ``mpp``.

        ``roi`` = (x0, y0, x1, y1) restricts the work to a box, in input pixels; the
        returned points are always in the full image's pixel coordinates.

        ``return_features=True`` returns ``(detections, features)``: the encoder features
        (N, D) of the returned nuclei, row for row (None when the pipeline has no encoder).
        The napari widget keeps them to retrain the head without encoding the image again.
        """
        image = as_rgb_uint8(image)
        x0 = y0 = 0
        if roi is not None:
            h, w = image.shape[:2]
            x0, y0 = max(0, int(np.floor(roi[0]))), max(0, int(np.floor(roi[1])))
            x1, y1 = min(w, int(np.ceil(roi[2]))), min(h, int(np.ceil(roi[3])))
            if x1 <= x0 or y1 <= y0:
                raise DenucError(f"the region {roi} does not overlap the {w}x{h} image")
            image = image[y0:y1, x0:x1]
        with_head = self.head is not None
        want_feats = with_head or (return_features and self.encoder is not None)
        xy, scores = self.detect(image, mpp, tau, nms_um, progress=_phase(progress, 0, 50 if want_feats else 100))
        feats = None
        if want_feats:
            xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
            if len(xy):
                feats = np.asarray(self.features_at(image, xy, mpp, progress=_phase(progress, 50, 50)), dtype=np.float32)
            else:
                feats = np.zeros((0, int(getattr(self.encoder, "feature_dim", 0) or 0)), np.float32)
        if with_head:
            k = len(self.head.class_names)
            if len(xy):
                inputs = self.head.inputs(feats, xy, mpp)
                probs = np.asarray(self.head.predict_proba(inputs), dtype=np.float32)
                background = np.asarray(self.head.background_proba(inputs))
            else:
                probs, background = np.zeros((0, k), np.float32), np.zeros(0, np.float32)
            class_ids = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
            real = background < 0.5  # a head with a background class rejects false detections
            xy, scores, class_ids, probs, feats = xy[real], scores[real], class_ids[real], probs[real], feats[real]
        else:
            class_ids, probs = np.zeros(len(xy), dtype=np.int64), None
        if progress is not None:
            progress(100, 100)
        det = Detections(xy + (x0, y0), scores, class_ids, self.class_names, self.class_colors, probs)
        return (det, feats) if return_features else det
