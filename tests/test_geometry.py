import numpy as np

from napari_denuc.geometry import rescale_points


def test_pixel_centres_map_to_pixel_centres():
    # the centre of the 2x2 block of pixels (0..1, 0..1) at level 0 is the centre of pixel 0 at level 1
    assert np.allclose(rescale_points([[0.5, 0.5]], 0.5), [[0.0, 0.0]])
    # pixel 0 of a level-1 image covers level-0 pixels 0 and 1: its centre is at 0.5
    assert np.allclose(rescale_points([[0.0, 0.0]], 2.0), [[0.5, 0.5]])
    assert np.allclose(rescale_points([[1.0, 3.0]], 4.0), [[5.5, 13.5]])


def test_round_trip_and_anisotropic_factor():
    xy = np.random.default_rng(0).uniform(0, 500, size=(50, 2))
    assert np.allclose(rescale_points(rescale_points(xy, 0.37), 1 / 0.37), xy)
    out = rescale_points([[10.0, 10.0]], (2.0, 0.5))
    assert np.allclose(out, [[20.5, 4.75]])
