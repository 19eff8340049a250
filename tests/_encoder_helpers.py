"""Shared fixtures for the encoder tests: a tiny random ViT with UNI2-h's token layout."""

from __future__ import annotations

import numpy as np

from napari_denuc.encoders.base import Encoder
from napari_denuc.encoders.registry import SILU, SWIGLU_PACKED, EncoderSpec

# UNI2-h's layout (patch 14, 1 class + 8 register tokens, no_embed_class, SwiGLU) at width 32, depth 1.
TINY_UNI2H_KWARGS = dict(
    img_size=224, patch_size=14, depth=1, num_heads=2, init_values=1e-5, embed_dim=32, mlp_ratio=2.66667 * 2,
    num_classes=0, no_embed_class=True, mlp_layer=SWIGLU_PACKED, act_layer=SILU, reg_tokens=8, dynamic_img_size=True,
)


def tiny_spec(name="tiny-uni2h", prefix_tokens=9, **over) -> EncoderSpec:
    fields = dict(
        name=name, feature_dim=32, mpp=0.5, hub="hf-hub:example/tiny-uni2h", arch="vit_giant_patch14_224",
        kwargs=TINY_UNI2H_KWARGS, patch_size=14, prefix_tokens=prefix_tokens, gated=True,
        url="https://huggingface.co/example/tiny-uni2h",
    )
    fields.update(over)
    return EncoderSpec(**fields)


def build_tiny_vit(seed=0):
    import timm
    import torch

    from napari_denuc.encoders.timm_encoder import resolve_kwargs

    torch.manual_seed(seed)
    return timm.create_model("vit_giant_patch14_224", pretrained=False, **resolve_kwargs(TINY_UNI2H_KWARGS))


class PositionEncoder(Encoder):
    """Synthetic dense encoder: each p x p cell's feature is the mean of (R, G) over the cell.

    On an image with R = x and G = y its features are the cell-centre coordinates, so the
    sampled feature at a point must be the point itself (bilinear interpolation of a linear
    function is exact).
    """

    cache_dtype = np.float32

    def __init__(self, stride=14, window=56, overlap=28, mpp=0.5, cache_dir=None):
        self.id = f"position-{stride}"
        self.feature_dim = 2
        self.mpp = mpp
        self.stride = self.align = stride
        self.window, self.overlap = window, overlap
        self.batch_size = 3
        self.calls = 0
        self.windows_encoded = 0
        self._setup_cache(cache_dir is not None, cache_dir)

    def encode_windows(self, batch):
        self.calls += 1
        self.windows_encoded += len(batch)
        b, h, w, _ = batch.shape
        p = self.stride
        x = batch[..., :2].astype(np.float64).reshape(b, h // p, p, w // p, p, 2).mean(axis=(2, 4))
        return x.transpose(0, 3, 1, 2).astype(np.float32)


def coordinate_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
