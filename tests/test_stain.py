"""Stain normalisation (napari_denuc.stain) on tiles rendered from known stains and on a real tile."""

import numpy as np
import pytest

from napari_denuc._sample_data import SAMPLE_IMAGE
from napari_denuc.stain import MACENKO_TARGET, macenko_normalize, macenko_stains, reinhard_normalize


def _render(he, conc):
    """RGB uint8 from a (3, 2) stain matrix and (N, 2) concentrations, as Beer-Lambert has it."""
    od = conc @ np.asarray(he, dtype=np.float64).T
    return np.clip(256.0 * np.exp(-od) - 1.0 + 0.5, 0, 255).astype(np.uint8)


def _unit(m):
    m = np.asarray(m, dtype=np.float64)
    return m / np.linalg.norm(m, axis=0, keepdims=True)


# A bluer haematoxylin and a paler, more orange eosin than the reference: another lab's stain.
OTHER_LAB = _unit([[0.45, 0.10], [0.80, 0.90], [0.40, 0.42]])


@pytest.fixture
def concentrations():
    """Haematoxylin and eosin per pixel, spread up to the reference's concentration range."""
    rng = np.random.default_rng(0)
    top = np.asarray(MACENKO_TARGET[1]) / 0.99
    return rng.uniform(0, 1, (120 * 120, 2)) * top


def test_macenko_finds_the_stains_it_was_rendered_with(concentrations):
    image = _render(OTHER_LAB, concentrations).reshape(120, 120, 3)
    he, max_conc = macenko_stains(image)
    cosines = (he * OTHER_LAB).sum(axis=0)
    assert cosines.min() > 0.99  # haematoxylin first, eosin second, both found
    assert max_conc[0] > max_conc[1]


def test_macenko_maps_another_labs_stain_onto_the_reference(concentrations):
    ref = np.asarray(MACENKO_TARGET[0])
    other = _render(OTHER_LAB, concentrations).reshape(120, 120, 3)
    same_tissue_in_reference_stain = _render(ref, concentrations).reshape(120, 120, 3)
    before = np.abs(other.astype(int) - same_tissue_in_reference_stain).mean()
    after = np.abs(macenko_normalize(other).astype(int) - same_tissue_in_reference_stain).mean()
    assert after < before / 2  # 5.6 against 14.8 grey levels; with H and E swapped it would be 18
    he, _ = macenko_stains(macenko_normalize(other))
    assert ((he * ref).sum(axis=0)).min() > 0.99


def test_macenko_on_a_real_tile_gives_the_reference_stains():
    from napari_denuc.io.images import read_image

    image, _ = read_image(SAMPLE_IMAGE)
    out = macenko_normalize(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    he, _ = macenko_stains(out)
    assert ((he * np.asarray(MACENKO_TARGET[0])).sum(axis=0)).min() > 0.98
    # The nuclei stay where they were: the haematoxylin map hardly changes but for its scale.
    from skimage.color import rgb2hed

    h_in, h_out = rgb2hed(image)[..., 0].ravel(), rgb2hed(out)[..., 0].ravel()
    assert np.corrcoef(h_in, h_out)[0, 1] > 0.9


def test_glass_is_left_alone():
    glass = np.full((64, 64, 3), 242, dtype=np.uint8)
    assert macenko_stains(glass) is None
    np.testing.assert_array_equal(macenko_normalize(glass), glass)


def test_reinhard_keeps_tissue_statistics_at_the_target(concentrations):
    from skimage.color import rgb2lab

    from napari_denuc.stain import REINHARD_TARGET

    out = reinhard_normalize(_render(OTHER_LAB, concentrations).reshape(120, 120, 3))
    lab = rgb2lab(out).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(axis=0), REINHARD_TARGET[0], atol=2.5)
