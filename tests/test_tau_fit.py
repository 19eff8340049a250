"""detection.tau_fit: the threshold fitted to a user's corrected nuclei."""

import numpy as np
import pytest

from napari_denuc.detection.tau_fit import TAUS, best_tau, f1, threshold_counts


def _site(seed=0, n=300):
    """A detector under-confident at a new site: true nuclei score 0.3-1.0, false ones 0.1-0.28."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 1000, (n, 2))
    false = rng.uniform(0, 1000, (60, 2))
    xy = np.concatenate([truth + rng.normal(0, 1.0, truth.shape), false])
    scores = np.concatenate([rng.uniform(0.3, 1.0, n), rng.uniform(0.1, 0.28, 60)])
    return xy, scores, truth


def test_counts_and_f1_against_a_hand_count():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    scores = np.array([0.9, 0.4, 0.6])
    truth = np.array([[1.0, 0.0], [10.0, 1.0], [100.0, 100.0]])
    c = threshold_counts(xy, scores, truth, radius_px=6.0, taus=(0.3, 0.5, 0.95))
    # tau 0.3: 2 matched, the point at (50, 50) false, (100, 100) missed; 0.5: one match lost; 0.95: nothing kept
    np.testing.assert_array_equal(c, [[2, 1, 1], [1, 1, 2], [0, 0, 3]])
    np.testing.assert_allclose(f1(c), [4 / 6, 2 / 5, 0.0])


def test_best_tau_finds_the_new_sites_threshold():
    xy, scores, truth = _site()
    c = threshold_counts(xy, scores, truth, radius_px=6.0)
    tau = best_tau(c, current=0.55)
    assert tau == pytest.approx(0.30)  # the lowest tau that keeps every true and no false nucleus
    assert f1(c)[TAUS.index(0.3)] == pytest.approx(1.0)
    assert f1(c)[TAUS.index(0.55)] < 0.8  # the shipped tau misses a third of the nuclei here


def test_best_tau_keeps_current_unless_clearly_better():
    c = np.array([[90, 10, 10], [90, 9, 10], [90, 10, 10]], float)  # 0.2 / 0.25 / 0.3: the middle one by 0.005
    taus = (0.2, 0.25, 0.3)
    assert best_tau(c, taus, current=0.3) == 0.3  # gain below MIN_GAIN: no change
    assert best_tau(c, taus, current=0.3, min_gain=0.001) == 0.25
    tie = np.array([[90, 10, 10], [95, 5, 5], [95, 5, 5], [90, 10, 10]], float)
    assert best_tau(tie, (0.2, 0.3, 0.4, 0.5), current=0.5) == 0.4  # among ties, the one nearest current
    assert best_tau(tie, (0.2, 0.3, 0.4, 0.5)) == 0.3
