"""Frozen timm encoders (UNI2-h, UNI, Virchow2, H-optimus-0, Prov-GigaPath, any ``timm:<name>``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..io.naming import file_fingerprint
from .base import Encoder, pick_device
from .registry import SILU, SWIGLU_PACKED, EncoderSpec

log = logging.getLogger(__name__)


def resolve_kwargs(kwargs: dict) -> dict:
    """Replace the registry's layer-type names by the classes."""
    import torch
    import timm.layers

    names = {SWIGLU_PACKED: timm.layers.SwiGLUPacked, SILU: torch.nn.SiLU}
    return {k: names.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


def _access_message(spec: EncoderSpec) -> str:
    return (
        f"the {spec.name} weights are gated on Hugging Face: request access on {spec.url or spec.hub}, "
        "then log in with `hf auth login` or set HF_TOKEN (or pass weights=PATH to a local copy); "
        "to work offline without it use the 'lite' encoder"
    )


def _offline_message(spec: EncoderSpec) -> str:
    return (
        f"the {spec.name} weights are not in the Hugging Face cache and the hub cannot be reached "
        "(no network or HF_HUB_OFFLINE=1): download them once while online, or pass weights=PATH "
        "to a local .safetensors/.bin file, or use the offline 'lite' encoder"
    )


def _hub_error_to_denuc(spec: EncoderSpec, exc: BaseException) -> DenucError | None:
    """Map huggingface_hub / network errors to a one-line DenucError (None: not ours to map)."""
    try:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - very old huggingface_hub
        from huggingface_hub.utils import (  # type: ignore
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    chain = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:  # timm may wrap the hub error
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, GatedRepoError):
            return DenucError(_access_message(spec))
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return DenucError(_offline_message(spec))
        if isinstance(e, RepositoryNotFoundError):
            # Without a token, gated repos answer 401 and look "not found".
            if spec.gated:
                return DenucError(_access_message(spec))
            return DenucError(f"the model repository for {spec.name} ({spec.hub}) was not found on Hugging Face")
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                return DenucError(_access_message(spec))
            return DenucError(f"downloading the {spec.name} weights failed ({e.__class__.__name__}: {str(e).splitlines()[0]})")
        name = type(e).__name__
        if "Connect" in name or "Timeout" in name or "NetworkError" in name:
            return DenucError(_offline_message(spec))
    return None


def load_state_dict_file(path) -> dict:
    """A state dict from ``.safetensors`` or a torch file (loaded with ``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DenucError(f"encoder weights file {path} not found; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            import torch

            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DenucError(f"could not read encoder weights {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise DenucError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return sd


def _load_weights(model, weights, name: str) -> str:
    """Strictly load a local state dict into ``model``; returns the encoder id, which names the
    file's content so that caches and heads never mix features of different weights."""
    sd = load_state_dict_file(weights)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError:
        missing, unexpected = _key_diff(model, sd)
        raise DenucError(
            f"{weights} is not a {name} state dict ({len(missing)} missing, {len(unexpected)} unexpected "
            f"or mis-shaped keys, e.g. {(missing + unexpected)[:3]}); pass the weights of this encoder"
        ) from None
    return f"{name}+{file_fingerprint(weights)}"


class TimmEncoder(Encoder):
    """A frozen timm ViT read out as a dense patch-token map (stride = patch size)."""

    def __init__(self, model, spec: EncoderSpec, encoder_id: str, device=None, cache_dir=None, batch_size=8,
                 cache=True, window=None, overlap=None):
        import torch

        if spec.prefix_tokens != getattr(model, "num_prefix_tokens", 0):
            raise DenucError(
                f"encoder {spec.name}: the registry says {spec.prefix_tokens} prefix token(s) "
                f"but the model has {getattr(model, 'num_prefix_tokens', 0)}; fix the EncoderSpec"
            )
        if not hasattr(model, "forward_intermediates"):
            raise DenucError(f"timm model {spec.arch or spec.hub} has no forward_intermediates; use a ViT-style model")
        self.spec = spec
        self.id = encoder_id
        self.feature_dim = int(spec.feature_dim)
        self.mpp = float(spec.mpp)
        self.stride = int(spec.patch_size)
        self.align = self.stride
        self.window = int(window or spec.window)
        self.overlap = int(spec.overlap if overlap is None else overlap)
        self.batch_size = int(batch_size)
        self.device = pick_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._setup_cache(cache, cache_dir)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: EncoderSpec, weights=None, pretrained=True, **options):
        import timm

        kwargs = resolve_kwargs(spec.kwargs)
        encoder_id = spec.name
        if weights is not None:
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
            encoder_id = _load_weights(model, weights, spec.name)
        elif pretrained:
            if not spec.hub:
                raise DenucError(f"encoder {spec.name} has no download source; pass weights=PATH")
            model = _create_from_hub(spec, kwargs)
        else:
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
            encoder_id = spec.name + "+random"
            options["cache"] = False  # random weights differ per build: caching would mix them up
        return cls(model, spec, encoder_id, **options)

    @classmethod
    def from_timm_name(cls, name: str, weights=None, pretrained=True, **options):
        import timm

        if not name:
            raise DenucError("give a timm model name after 'timm:', e.g. timm:vit_small_patch16_224")
        probe_spec = EncoderSpec(name=f"timm:{name}", feature_dim=0, hub=name, arch=name)
        kwargs = dict(num_classes=0, dynamic_img_size=True)
        try:
            if weights is not None:
                model = timm.create_model(name, pretrained=False, **kwargs)
            else:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except DenucError:
            raise
        except TypeError:  # not a ViT with dynamic_img_size
            raise DenucError(f"timm model {name!r} is not a ViT-style model with patch tokens; pick a vit_* model") from None
        except Exception as exc:
            mapped = _hub_error_to_denuc(probe_spec, exc)
            if mapped is not None:
                raise mapped from None
            raise DenucError(f"could not create timm model {name!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        encoder_id = f"timm:{name}"
        if weights is not None:
            encoder_id = _load_weights(model, weights, encoder_id)
        elif not pretrained:
            encoder_id += "+random"
            options["cache"] = False
        if not hasattr(model, "patch_embed"):
            raise DenucError(f"timm model {name!r} is not a ViT-style model with patch tokens; pick a vit_* model")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        patch = model.patch_embed.patch_size
        spec = EncoderSpec(
            name=f"timm:{name}",
            feature_dim=int(model.num_features),
            mpp=0.5,
            hub=name,
            arch=name,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
            prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
            licence=str(cfg.get("license", "")),
            window=int(cfg.get("input_size", (3, 224, 224))[-1]),
        )
        return cls(model, spec, encoder_id, **options)

    # ------------------------------------------------------------------ encoding
    def encode_windows(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(B, h, w, 3) uint8 -> (B, C, h/p, w/p) float32 patch-token map, prefix tokens dropped."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch_uint8)).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        use_amp = self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
            # forward_intermediates rather than forward_features: it drops exactly
            # model.num_prefix_tokens (class + register) tokens and reshapes to the (possibly
            # non-square, dynamic-size) patch grid for us. norm=True applies the final norm,
            # so the last block equals forward_features(x)[:, prefix:] -- the representation
            # the foundation model was trained and linearly probed with.
            fmap = self.model.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )[0]
        return fmap.float().cpu().numpy()


def _key_diff(model, sd):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own or tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected


def _create_from_hub(spec: EncoderSpec, kwargs: dict):
    """``timm.create_model(hub, pretrained=True)``: huggingface_hub caches, shows progress and
    honours ``HF_HUB_OFFLINE``; its errors become DenucError messages that say what to do."""
    import timm

    log.info("loading %s from %s (Hugging Face cache)", spec.name, spec.hub)
    try:
        return timm.create_model(spec.hub, pretrained=True, **kwargs)
    except Exception as exc:
        mapped = _hub_error_to_denuc(spec, exc)
        if mapped is not None:
            raise mapped from None
        raise
