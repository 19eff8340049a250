"""``get_encoder``: a registry name (or ``timm:<model>``) -> a ready encoder.

Kept apart from :mod:`.registry` (pure data) so the registry imports no implementation and
the implementations may import the registry's types without a cycle.
"""

from __future__ import annotations

from .registry import get_spec


def get_encoder(
    name: str = "lite",
    *,
    detector=None,
    weights=None,
    device=None,
    pretrained: bool = True,
    cache_dir=None,
    batch_size: int = 8,
    cache: bool = True,
    window: int | None = None,
    overlap: int | None = None,
):
    """Build the encoder ``name`` ready for ``features_at(image, xy, mpp)``.

    ``weights`` (a ``.safetensors``/``.bin`` state dict) builds the architecture without any
    network access; otherwise pretrained weights come from the Hugging Face hub (cached per its
    conventions, ``HF_HUB_OFFLINE`` honoured). ``pretrained=False`` gives random weights (tests,
    benchmarks). ``detector`` is only used by ``lite`` (its neck features join the filter bank).
    """
    from .timm_encoder import TimmEncoder

    options = dict(device=device, cache_dir=cache_dir, batch_size=batch_size, cache=cache, window=window, overlap=overlap)
    if name.startswith("timm:"):
        encoder = TimmEncoder.from_timm_name(name[len("timm:"):], weights=weights, pretrained=pretrained, **options)
    else:
        spec = get_spec(name)
        if spec.factory is not None:
            encoder = spec.factory(spec, detector=detector, weights=weights, pretrained=pretrained, **options)
        else:
            encoder = TimmEncoder.from_spec(spec, weights=weights, pretrained=pretrained, **options)
    encoder.name = name
    return encoder
