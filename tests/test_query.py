import numpy as np
import pytest

from _encoder_helpers import PositionEncoder, coordinate_image
from napari_denuc.encoders.query import (
    bilinear_sample,
    cell_coordinate,
    plan_windows,
    query_features,
    resample_image,
)
from napari_denuc.errors import DenucError


def test_patch_centre_geometry():
    # patch i of size p covers [i*p, (i+1)*p): its centre (i + 0.5) * p - 0.5 maps to cell i
    for p in (8, 14, 16):
        i = np.arange(5)
        assert np.allclose(cell_coordinate((i + 0.5) * p - 0.5, p), i)
    # the detector's stride-8 grid: cell (i, j) centred at (j*8 + 3.5, i*8 + 3.5)
    assert cell_coordinate(3.5, 8) == 0 and cell_coordinate(11.5, 8) == 1


def test_bilinear_sample_matches_manual_interpolation():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(3, 4, 5)).astype(np.float32)
    u, v = np.array([1.25, 0.0, 3.9, 4.0]), np.array([2.5, 0.0, 0.1, 3.0])
    got = bilinear_sample(fmap, u, v)
    for k in range(len(u)):
        u0, v0 = min(int(u[k]), 3), min(int(v[k]), 2)
        a, b = u[k] - u0, v[k] - v0
        exp = ((1 - a) * (1 - b) * fmap[:, v0, u0] + a * (1 - b) * fmap[:, v0, u0 + 1]
               + (1 - a) * b * fmap[:, v0 + 1, u0] + a * b * fmap[:, v0 + 1, u0 + 1])
        assert np.allclose(got[k], exp, atol=1e-5)
    # clamped outside the outermost centres
    assert np.allclose(bilinear_sample(fmap, np.array([-3.0]), np.array([-1.0]))[0], fmap[:, 0, 0])


def _interior_points(h, w, n, margin, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(margin, w - 1 - margin, n), rng.uniform(margin, h - 1 - margin, n)], axis=1)


def test_sampled_feature_is_the_point_position():
    img = coordinate_image(200, 240)
    xy = _interior_points(200, 240, 60, margin=14)
    enc = PositionEncoder(stride=14, window=56, overlap=28)
    f = enc.features_at(img, xy, 0.5)
    assert f.shape == (60, 2) and f.dtype == np.float32
    assert np.allclose(f, xy, atol=1e-3)


@pytest.mark.parametrize("window,overlap", [(56, 28), (84, 42), (112, 0), (252, 56)])
def test_features_do_not_depend_on_tiling(window, overlap):
    img = coordinate_image(180, 250)
    xy = _interior_points(180, 250, 40, margin=14, seed=1)
    ref = PositionEncoder(window=56, overlap=14).features_at(img, xy, 0.5)
    got = PositionEncoder(window=window, overlap=overlap).features_at(img, xy, 0.5)
    assert np.allclose(got, ref, atol=1e-3)


def test_resampling_maps_points_with_pixel_centre_convention():
    img = coordinate_image(120, 160)
    xy = np.array([[40.0, 30.0], [100.0, 80.0]])
    small, xy2 = resample_image(img, xy, 0.25, 0.5)
    assert small.shape == (60, 80, 3)
    assert np.allclose(xy2, (xy + 0.5) * 0.5 - 0.5)
    # a 0.25-mpp image queried at 0.5 mpp: the features are the positions in the resampled image
    enc = PositionEncoder(stride=4, window=32, overlap=8)
    f = enc.features_at(img, xy, 0.25)
    # R = x in the source image; after 2x averaging R at new pixel x' is 2x' + 0.5
    assert np.allclose(f, 2 * xy2 + 0.5, atol=0.6)


def test_only_windows_with_points_are_encoded_and_cache_hits(tmp_path):
    img = coordinate_image(200, 240)
    xy = np.array([[20.0, 20.0], [30.0, 25.0]])
    enc = PositionEncoder(window=56, overlap=28, cache_dir=tmp_path)
    f1 = enc.features_at(img, xy, 0.5)
    assert enc.windows_encoded == 1
    f2 = enc.features_at(img, xy, 0.5)
    assert enc.windows_encoded == 1  # second query: nothing re-encoded
    assert np.array_equal(f1, f2)
    # added points: only the windows not cached yet are encoded
    more = np.vstack([xy, [[200.0, 150.0]]])
    f3 = enc.features_at(img, more, 0.5)
    assert enc.windows_encoded == 2
    assert np.array_equal(f3[:2], f1)
    # a fresh encoder object with the same id and cache dir reuses the files
    enc2 = PositionEncoder(window=56, overlap=28, cache_dir=tmp_path)
    enc2.features_at(img, more, 0.5)
    assert enc2.windows_encoded == 0
    files = list(tmp_path.rglob("*"))
    assert all(not p.name.startswith(".tmp") for p in files)
    assert any(p.suffix == ".npy" for p in files)
    # another image content -> another cache entry
    img2 = img.copy()
    img2[0, 0, 2] = 7
    enc2.features_at(img2, xy, 0.5)
    assert enc2.windows_encoded == 1


def test_batches_and_progress():
    img = coordinate_image(200, 240)
    xy = _interior_points(200, 240, 50, margin=14, seed=3)
    enc = PositionEncoder(window=56, overlap=28)
    calls = []
    enc.features_at(img, xy, 0.5, progress=lambda d, t: calls.append((d, t)))
    total = calls[-1][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert enc.windows_encoded == total
    assert enc.calls == -(-total // enc.batch_size)  # windows streamed in batches of batch_size


def test_plan_windows_small_image_shrinks_window():
    ww, wh, ox, oy = plan_windows((100, 60, 3), 224, 56, 14)
    assert (ww, wh) == (70, 112) and list(ox) == [0] and list(oy) == [0]


def test_empty_points_and_bad_inputs():
    enc = PositionEncoder()
    img = coordinate_image(64, 64)
    assert enc.features_at(img, np.zeros((0, 2)), 0.5).shape == (0, 2)
    with pytest.raises(DenucError):
        enc.features_at(img.astype(np.float32), np.zeros((1, 2)), 0.5)
    with pytest.raises(DenucError):
        enc.features_at(img, np.zeros((1, 3)), 0.5)
    with pytest.raises(DenucError):
        enc.features_at(img, np.zeros((1, 2)), None)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from napari_denuc.encoders.query import default_cache_dir

    monkeypatch.setenv("DENUC_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DENUC_CACHE")
    assert default_cache_dir().parts[-2:] == ("napari-denuc", "features")


def test_query_with_tiny_vit_and_lite():
    from napari_denuc.encoders import get_encoder

    img = (np.random.default_rng(0).random((150, 170, 3)) * 255).astype(np.uint8)
    xy = _interior_points(150, 170, 10, margin=1)
    lite = get_encoder("lite", cache=False)
    f = query_features(lite, img, xy, 0.5)
    assert f.shape == (10, lite.feature_dim) and np.isfinite(f).all()
