"""DeNuC nuclei detection and classification for H&E images: library, CLI and napari plugin.

The public API is imported lazily, so that napari (which imports this package to find its
manifest) starts without loading torch.
"""

__version__ = "0.1.0"

_API = {
    "Pipeline": "napari_denuc.pipeline",
    "Detections": "napari_denuc.results",
    "DenucError": "napari_denuc.errors",
    "load_detector": "napari_denuc.detection.checkpoint",
    "PointDetector": "napari_denuc.detection.model",
    "get_encoder": "napari_denuc.encoders",
    "list_encoders": "napari_denuc.encoders",
    "LinearHead": "napari_denuc.head",
    "read_image": "napari_denuc.io.images",
    "read_points": "napari_denuc.io.points",
    "write_points": "napari_denuc.io.points",
    "load_dataset": "napari_denuc.data",
    "PointScorer": "napari_denuc.metrics",
    "predict_slides": "napari_denuc.wsi",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'napari_denuc' has no attribute {name!r}")
