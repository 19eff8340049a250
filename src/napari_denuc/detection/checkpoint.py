"""Detector checkpoints: weights in safetensors, everything else in a JSON sidecar.

``detector.safetensors`` holds the weights; ``detector.safetensors.json`` beside it holds the
architecture, the model's mpp, the score threshold and NMS radius chosen on
validation data, a training-data summary and metrics. Loading needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DenucError

FORMAT = "napari-denuc-detector"
BUNDLED = "detector.safetensors"


def sidecar_path(path) -> Path:
    """``<checkpoint>.json`` beside the weights, as for heads."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def file_digest(path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


@dataclass
class Detector:
    """A loaded detector and the settings it was validated with."""

    model: object  # PointDetector
    mpp: float = 0.5
    tau: float = 0.5
    nms_um: float = 2.0
    meta: dict = field(default_factory=dict)
    id: str = "untrained"

    def candidates(self, image, mpp: float, nms_um: float | None = None, **options):
        """(xy, scores) at the low score floor ``infer.CANDIDATE_TAU``; ``infer.threshold(xy, scores, tau)``
        then gives exactly ``detect(image, mpp, tau)`` for any tau above the floor, without the network."""
        from .infer import CANDIDATE_TAU

        return self.detect(image, mpp, tau=CANDIDATE_TAU, nms_um=nms_um, **options)

    def detect(self, image, mpp: float, tau: float | None = None, nms_um: float | None = None, **options):
        """(xy, scores) of nuclei in ``image`` (RGB, any size) stated at ``mpp``; see detection.infer.detect."""
        from .infer import detect

        self.model.eval()
        # Windows per forward pass: fewer for backbones whose early, full-resolution activations are wide.
        options.setdefault("batch_size", getattr(self.model, "infer_batch", 4))
        return detect(
            self.model,
            image,
            mpp,
            model_mpp=self.mpp,
            tau=self.tau if tau is None else tau,
            nms_um=self.nms_um if nms_um is None else nms_um,
            **options,
        )


def save_detector(model, path, mpp: float, tau: float = 0.5, nms_um: float = 2.0, **meta) -> None:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically."""
    from safetensors.torch import save

    from ..io.atomic import atomic_write

    path = Path(path)
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    info = {
        "format": FORMAT,
        "version": 1,
        "architecture": {"backbone": model.backbone_name, "neck_channels": model.neck_channels, "init": getattr(model, "init", None)},
        "mpp": mpp,
        "tau": tau,
        "nms_um": nms_um,
        **meta,
    }
    atomic_write(sidecar_path(path), json.dumps(info, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def bundled_detector_path() -> Path:
    return Path(str(resources.files("napari_denuc") / "weights" / BUNDLED))


def load_detector(path=None, device: str | None = None) -> Detector:
    """Load a detector checkpoint (default: the one bundled with the package)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import PointDetector

    path = Path(path) if path is not None else bundled_detector_path()
    if not path.is_file():
        raise DenucError(f"detector checkpoint not found: {path}")
    side = sidecar_path(path)
    if not side.is_file():
        raise DenucError(f"{path} has no sidecar {side.name}: not a napari-denuc detector checkpoint")
    try:
        info = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DenucError(f"{side} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DenucError(f"{side} does not describe a napari-denuc detector (format {info.get('format') if isinstance(info, dict) else None!r})")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DenucError(f"cannot read detector weights {path}: truncated or not safetensors ({exc})") from None
    arch = info.get("architecture", {})
    backbone = arch.get("backbone", "shufflenet_v2_x0_5") if isinstance(arch, dict) else None
    if not isinstance(backbone, str) or not backbone:
        raise DenucError(f"{side} names no detector backbone; it is not a napari-denuc detector checkpoint")
    try:
        model = PointDetector(backbone, arch.get("neck_channels"))
    except DenucError as exc:
        raise DenucError(
            f"{path} was made for the backbone {backbone!r}, which this napari-denuc cannot build ({exc}); "
            "update napari-denuc or use another checkpoint"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise DenucError(f"{path} does not hold weights of a {arch.get('backbone')} detector: {first}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    model.mpp = float(info.get("mpp", 0.5))  # read by encoders that sample the neck (lite)
    return Detector(
        model,
        mpp=float(info.get("mpp", 0.5)),
        tau=float(info.get("tau", 0.5)),
        nms_um=float(info.get("nms_um", 2.0)),
        meta=info,
        id=f"{arch.get('backbone')}-{file_digest(path)}",
    )
