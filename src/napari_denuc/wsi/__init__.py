"""Whole-slide batch prediction: tiling with a tissue mask, seam-free merging, resumable runs, Dask.

Public API (used by ``denuc-predict``)::

    from napari_denuc.wsi import expand_inputs, predict_slides, PipelineFactory
    items = expand_inputs(["slides/", "more/*.svs", "list.csv"], mpp=None)
    result = predict_slides(items, "out/", PipelineFactory(device="cuda", batch_size=8))
    sys.exit(result.exit_code)
"""

from .run import BatchResult, PipelineFactory, SlideResult, make_client, predict_slides
from .slides import expand_inputs, open_slide, resolve_mpp
from .tiling import MaskParams, plan_tiles, tissue_mask

__all__ = [
    "BatchResult",
    "MaskParams",
    "PipelineFactory",
    "SlideResult",
    "expand_inputs",
    "make_client",
    "open_slide",
    "plan_tiles",
    "predict_slides",
    "resolve_mpp",
    "tissue_mask",
]
