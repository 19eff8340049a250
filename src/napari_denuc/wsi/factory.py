"""The pipeline factory: a picklable recipe that builds the model once per process.

``factory()`` returns a ``process_tile(rgb_uint8_tile, mpp) -> Detections`` callable (tile-local
coordinates at the resolution read) and caches the pipeline it builds per process, so every
Dask worker loads the model once. ``factory.config()`` (a JSON-able dict) identifies the
results for resuming.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .worker import relax_malloc_trim, set_threads

DEFAULT_TARGET_MPP = 0.5

_PIPELINES: dict[str, object] = {}


def _file_identity(value):
    """A path's size and mtime (so a retrained model at the same path invalidates stale tiles)."""
    if value is None:
        return None
    p = Path(str(value))
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return str(value)


@dataclass(frozen=True)
class PipelineFactory:
    """Builds ``napari_denuc.pipeline.Pipeline.from_defaults(...)`` once per process.

    ``detector``, ``encoder``, ``head``: as for ``Pipeline.from_defaults`` (None = defaults);
    ``device``: "cpu", "cuda", "cuda:1"...; ``batch_size``: detector windows per forward pass;
    ``threads``: torch/OpenMP threads per process (None: torch's default; ``predict_slides``
    sets 1 for Dask workers); ``target_mpp``: the tiling resolution, by default the detector's mpp;
    ``tau``: the detection score threshold (None: the detector's own), e.g. one fitted in the widget.
    """

    detector: str | None = None
    encoder: str | None = None
    head: str | None = None
    device: str | None = None
    batch_size: int | None = None
    threads: int | None = None
    encoder_weights: str | None = None
    target_mpp: float | None = None
    tau: float | None = None

    def config(self) -> dict:
        # device/batch_size/threads don't change what is detected; model files are identified by content stamp.
        # Defaults are resolved: the default encoder changes when UNI2-h's weights arrive in the cache, and
        # the bundled detector and heads with an update; tiles or outputs of the old ones must not be reused.
        from ..detection.checkpoint import bundled_detector_path
        from ..pipeline import resolve_models

        encoder, head = resolve_models(self.encoder, self.head, self.encoder_weights)
        return {
            "kind": "pipeline",
            "detector": _file_identity(self.detector or bundled_detector_path()),
            "encoder": encoder,
            "head": _file_identity(head),
            "encoder_weights": _file_identity(self.encoder_weights),
            "target_mpp": self.target_mpp,
            **({"tau": self.tau} if self.tau is not None else {}),  # unset: the same config as before the option
        }

    def pipeline(self):
        key = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        pipe = _PIPELINES.get(key)
        if pipe is None:
            set_threads(self.threads)
            relax_malloc_trim()
            from ..pipeline import Pipeline

            pipe = Pipeline.from_defaults(
                detector=self.detector,
                encoder=self.encoder,
                head=self.head,
                device=self.device,
                encoder_weights=self.encoder_weights,
            )
            if self.batch_size:
                pipe.detect_options["batch_size"] = int(self.batch_size)
            if self.tau is not None:
                pipe.detector.tau = float(self.tau)
            _PIPELINES[key] = pipe
        return pipe

    def resolve_target_mpp(self) -> float:
        if self.target_mpp:
            return float(self.target_mpp)
        return float(getattr(self.pipeline().detector, "mpp", DEFAULT_TARGET_MPP))

    def __call__(self):
        pipe = self.pipeline()
        return lambda tile, mpp: pipe.run(tile, mpp)


def factory_config(factory) -> dict:
    if hasattr(factory, "config"):
        return factory.config()
    return {"repr": repr(factory)}


def resolve_target_mpp(factory) -> float:
    t = getattr(factory, "target_mpp", None)
    if t:
        return float(t)
    if hasattr(factory, "resolve_target_mpp"):
        return float(factory.resolve_target_mpp())
    return DEFAULT_TARGET_MPP
