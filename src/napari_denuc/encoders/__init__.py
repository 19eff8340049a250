"""Frozen encoders: a registry (``get_encoder``), the point query with its feature cache, ``lite``,
the offline ImageNet ``effnet-lite*``.

>>> enc = get_encoder("lite", detector=det)          # or "uni2-h", "timm:vit_small_patch16_224"
>>> feats = enc.features_at(image_rgb_uint8, xy, mpp)  # (N, enc.feature_dim) float32
"""

from .build import get_encoder
from .registry import (
    EncoderSpec,
    default_encoder_name,
    get_spec,
    list_encoders,
    register_encoder,
    weights_cached,
)

__all__ = [
    "EncoderSpec",
    "default_encoder_name",
    "get_encoder",
    "get_spec",
    "list_encoders",
    "register_encoder",
    "weights_cached",
]
