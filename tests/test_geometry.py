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


def test_inside_image_is_the_pixel_centre_rule():
    """Pixel i covers [i - 0.5, i + 0.5): an image w px wide spans x in [-0.5, w - 0.5)."""
    from napari_denuc.geometry import inside_image

    xy = np.array([[-0.5, 0], [-0.51, 0], [9.49, 4.49], [9.5, 0], [0, 4.5], [3, -1], [3, 2]])
    np.testing.assert_array_equal(inside_image(xy, (5, 10, 3)), [True, False, True, False, False, False, True])
    assert inside_image(np.zeros((0, 2)), (5, 10)).shape == (0,)
