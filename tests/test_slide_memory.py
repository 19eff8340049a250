"""The lean paths behind the slide-training memory bound give the values of the plain ones, bit for bit.

``PointDetector.neck_features_rgb`` runs the backbone's full-resolution layers in strips,
``lite.iter_stain_channels`` yields one stain channel at a time, and ``wsi.slide_features``
maps large blocks while it reads a slide (the RSS bound itself is
``test_slide_training.py::test_cli_on_big_slide_bounded_memory``).
"""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # dozens of tiny strips: with two threads on a busy 2-core machine each op's barrier costs
    # more than the op (15 s instead of 0.1 s). The equality was also checked with 2 threads on
    # real 2048 x 2048 windows of the bundled detector (docs/benchmarks.md, "Slide training memory").
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _detector(name, seed=0):
    from napari_denuc.detection.model import PointDetector

    torch.manual_seed(seed)
    det = PointDetector(name)
    # non-trivial batch-norm statistics, so that a wrong row or a wrong padding shows
    g = torch.Generator().manual_seed(seed + 1)
    for m in det.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return det.eval()


@pytest.mark.parametrize("name, strip_pixels", [("shufflenet_v2_x0_5", 1), ("shufflenet_v2_x0_5", 192 * 8 * 3),
                                                ("shufflenet_v2_x1_0", 192 * 100)])
def test_neck_features_in_strips_equal_the_whole_pass(name, strip_pixels):
    """Strips of 1, 3 and 12 stride-8 rows (the halo spans several strips): every value identical."""
    det = _detector(name)
    rng = np.random.default_rng(3)
    rgb = torch.from_numpy((rng.random((1, 256, 192, 3)) * 255).astype(np.uint8))
    with torch.inference_mode():
        whole = det.neck_features(det.normalize(rgb))
        strips = det.neck_features_rgb(rgb, strip_pixels=strip_pixels)
    assert strips.shape == whole.shape == (1, det.neck_channels, 32, 24)
    assert torch.equal(strips, whole)
    # a strip edge in the middle of a nucleus-sized dark blob changes nothing either
    img = np.full((1, 256, 192, 3), 230, np.uint8)
    img[:, 90:140, 60:110] = (60, 30, 120)
    rgb = torch.from_numpy(img)
    with torch.inference_mode():
        assert torch.equal(det.neck_features_rgb(rgb, strip_pixels=192 * 8 * 2), det.neck_features(det.normalize(rgb)))


def test_neck_features_rgb_plain_pass_when_strips_do_not_apply(monkeypatch):
    """Sides that are not multiples of the stride, one strip, or a backbone without ``early``: the plain pass."""
    det = _detector("shufflenet_v2_x0_5")
    calls = []
    real = type(det.backbone).early
    monkeypatch.setattr(type(det.backbone), "early", lambda self, x: calls.append(x.shape) or real(self, x))
    rgb = torch.from_numpy((np.random.default_rng(4).random((1, 100, 64, 3)) * 255).astype(np.uint8))
    with torch.inference_mode():
        assert torch.equal(det.neck_features_rgb(rgb, strip_pixels=64), det.neck_features(det.normalize(rgb)))
    assert calls == [(1, 3, 100, 64)] * 2  # one whole pass each: 100 rows is no multiple of 8
    calls.clear()
    rgb = torch.from_numpy((np.random.default_rng(4).random((1, 256, 64, 3)) * 255).astype(np.uint8))
    with torch.inference_mode():
        det.neck_features_rgb(rgb, strip_pixels=64 * 8 * 4)
    assert len(calls) == 8 and max(c[2] for c in calls) == 4 * 8 + 2 * 64  # strips this time: 4 rows and the halo
    timm_det = _detector("efficientnet_lite0")  # no strip path (yet): the plain pass
    assert not hasattr(timm_det.backbone, "early")
    with torch.inference_mode():
        assert torch.equal(timm_det.neck_features_rgb(rgb, strip_pixels=64), timm_det.neck_features(timm_det.normalize(rgb)))


def _stain_channels_all_at_once(rgb_uint8):
    """The former ``lite.stain_channels``, verbatim: the reference for the generator."""
    from napari_denuc.encoders.lite import _hed_matrix

    m = _hed_matrix() * 10.0
    lut = (np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0) / np.log(1e-6)).astype(np.float32)
    od = [lut[rgb_uint8[..., i]] for i in range(3)]
    out = []
    for j in range(3):
        ch = od[0] * m[0, j]
        ch += od[1] * m[1, j]
        ch += od[2] * m[2, j]
        np.maximum(ch, 0, out=ch)
        out.append(ch)
    bright = (od[0] + od[1] + od[2]) * (1.0 / 3.0)
    return out + [bright]


def test_stain_channels_one_at_a_time_are_the_same_values():
    from skimage.color import rgb2hed

    from napari_denuc.encoders.lite import iter_stain_channels, stain_channels

    rgb = (1 + np.random.default_rng(5).random((70, 90, 3)) * 254).astype(np.uint8)
    rgb[0, :4] = 0  # the table's floor for black (rgb2hed's is 1e-6)
    ref = _stain_channels_all_at_once(rgb)
    got = list(iter_stain_channels(rgb))
    assert len(got) == 4 and all(g.dtype == np.float32 and np.array_equal(g, r) for g, r in zip(got, ref))
    assert all(np.array_equal(a, b) for a, b in zip(stain_channels(rgb), ref))
    # and they still are rgb2hed's H, E, D (x10, clipped at 0) away from black pixels
    hed = np.maximum(rgb2hed(rgb[1:]), 0) * 10
    for j in range(3):
        np.testing.assert_allclose(got[j][1:], hed[..., j], rtol=1e-4, atol=1e-4)


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_large_blocks_mapped_only_while_reading_and_restored(monkeypatch, tmp_path):
    from _encoder_helpers import PositionEncoder

    from napari_denuc.wsi import slide_features as sf
    from napari_denuc.wsi.synthetic import make_test_slide

    fake = _FakeLibc()
    monkeypatch.setattr(sf, "_LIBC", fake)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    seen = []

    class Spy(PositionEncoder):
        def encode_windows(self, batch):
            seen.append(list(fake.calls))
            return super().encode_windows(batch)

    make_test_slide(tmp_path / "s.tif", 512, mpp=0.5, seed=0)
    enc = Spy(stride=8, window=64, overlap=32, mpp=0.5)
    f = sf.slide_features(enc, tmp_path / "s.tif", np.array([[100.0, 120.0], [300.0, 40.0]]), cache=False)
    assert f.shape == (2, 2) and np.isfinite(f).all()
    assert seen and all((sf.M_MMAP_THRESHOLD, sf.MAP_LARGE_BLOCKS) in c for c in seen)  # mapped while encoding
    settings = [c for c in fake.calls if c[0] != "trim"]
    assert settings == [(sf.M_MMAP_THRESHOLD, 1 << 20), (sf.M_MMAP_THRESHOLD, 32 << 20), (sf.M_TRIM_THRESHOLD, 64 << 20)]

    # restored after an error too
    fake.calls.clear()

    class Broken(PositionEncoder):
        def encode_windows(self, batch):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sf.slide_features(Broken(stride=8, window=64, overlap=32, mpp=0.5), tmp_path / "s.tif", np.array([[10.0, 10.0]]), cache=False)
    assert [c for c in fake.calls if c[0] != "trim"][-1] == (sf.M_TRIM_THRESHOLD, 64 << 20)

    # nested: set once, restored by the outer one only
    fake.calls.clear()
    with sf._large_blocks_mapped():
        with sf._large_blocks_mapped():
            pass
        assert fake.calls == [(sf.M_MMAP_THRESHOLD, 1 << 20)]
    assert fake.calls[1:] == [(sf.M_MMAP_THRESHOLD, 32 << 20), (sf.M_TRIM_THRESHOLD, 64 << 20)]

    # a process that chose its own threshold keeps it
    fake.calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    sf.slide_features(enc, tmp_path / "s.tif", np.array([[10.0, 10.0]]), cache=False)
    assert [c for c in fake.calls if c[0] != "trim"] == []


@pytest.mark.parametrize("data, preload, expected", [("slides=L.csv", "", "1"), ("brca_m2c=/data", "", "None"),
                                                     ("slides=L.csv", "import torch", "None")])
def test_cli_asks_for_huge_pages_only_for_slides_before_torch_loads(data, preload, expected):
    """torch reads THP_MEM_ALLOC_ENABLE at its first allocation: set only for slides=, only if torch is not loaded."""
    import os
    import subprocess
    import sys

    code = (f"{preload}\nimport os\nfrom napari_denuc.cli.train import build_parser, _huge_pages_for_slides\n"
            f"_huge_pages_for_slides(build_parser().parse_args(['head', '--data', {data!r}, '--out', 'h.safetensors']))\n"
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert r.stdout.split()[-1] == expected
