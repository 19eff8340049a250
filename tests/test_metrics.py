"""Hand-computed cases for napari_denuc.metrics."""

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from napari_denuc.errors import DenucError
from napari_denuc.metrics import PointScorer, match_points


def pairs(result):
    p, g = result
    return sorted(zip(p.tolist(), g.tolist()))


@pytest.mark.parametrize("method", ["greedy", "hungarian"])
def test_empty_inputs(method):
    assert pairs(match_points([], [[1, 1]], 5, method=method)) == []
    assert pairs(match_points([[1, 1]], np.zeros((0, 2)), 5, method=method)) == []
    assert pairs(match_points([], [], 5, method=method)) == []


def test_empty_predictions_and_empty_gt_scores():
    s = PointScorer(("a",))
    s.add([], [[0, 0], [5, 5]], 2, pred_cls=[], gt_cls=[0, 0])  # 2 FN
    r = s.result()
    assert r["detection"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert r["classes"]["a"]["support"] == 2

    s = PointScorer(("a",))
    s.add([[0, 0], [5, 5]], [], 2, pred_cls=[0, 0], gt_cls=[])  # 2 FP
    assert s.result()["detection"]["f1"] == 0.0
    assert s.det.tolist() == [0, 2, 0]

    s = PointScorer(("a",))
    s.add([], [], 2, pred_cls=[], gt_cls=[])
    r = s.result()
    assert s.det.tolist() == [0, 0, 0] and r["detection"]["f1"] == 0.0 and r["f_avg"] == 0.0


@pytest.mark.parametrize("method", ["greedy", "hungarian"])
def test_radius_boundary(method):
    gt = [[3.0, 4.0]]  # distance 5 from the origin
    assert pairs(match_points([[0, 0]], gt, 5.0, method=method)) == [(0, 0)]  # exactly at the radius
    assert pairs(match_points([[0.001, 0]], gt, 5.0, method=method)) == [(0, 0)]  # just inside
    assert pairs(match_points([[-0.001, 0]], gt, 5.0, method=method)) == []  # just outside
    assert pairs(match_points([[0, 0]], gt, 4.999, method=method)) == []


def test_greedy_ties():
    # Equal distance to two gt points: the lower gt index wins.
    assert pairs(match_points([[0, 0]], [[1, 0], [-1, 0]], 2)) == [(0, 0)]
    assert pairs(match_points([[0, 0]], [[-1, 0], [1, 0]], 2)) == [(0, 0)]
    # Equal scores: predictions are taken in index order, so pred 0 wins although pred 1 is closer.
    assert pairs(match_points([[0, 0], [0.5, 0]], [[0.4, 0]], 2, scores=[0.5, 0.5])) == [(0, 0)]
    # Without ties the higher score wins.
    assert pairs(match_points([[0, 0], [0.5, 0]], [[0.4, 0]], 2, scores=[0.4, 0.5])) == [(1, 0)]


def test_greedy_order_matters_and_hungarian_finds_more():
    pred = [[1.0, 0.0], [3.0, 0.0]]  # A, B
    gt = [[2.1, 0.0], [-0.5, 0.0]]  # G0: 1.1 from A, 0.9 from B; G1: 1.5 from A, out of B's reach
    r = 1.6
    # A first: it takes its nearest, G0, and leaves B with nothing.
    assert pairs(match_points(pred, gt, r, scores=[0.9, 0.5])) == [(0, 0)]
    # B first: B takes G0, A falls back to G1.
    assert pairs(match_points(pred, gt, r, scores=[0.5, 0.9])) == [(0, 1), (1, 0)]
    # Hungarian ignores scores and maximises the number of matches.
    assert pairs(match_points(pred, gt, r, scores=[0.9, 0.5], method="hungarian")) == [(0, 1), (1, 0)]


def test_hungarian_breaks_ties_by_total_distance():
    pred = [[0.0, 0.0], [1.0, 0.0]]
    gt = [[0.1, 0.0], [1.1, 0.0]]  # straight: 0.1 + 0.1; crossed: 1.1 + 0.9
    assert pairs(match_points(pred, gt, 2.0, method="hungarian")) == [(0, 0), (1, 1)]


def test_hungarian_is_a_maximum_matching():
    rng = np.random.default_rng(0)
    pred, gt, r = rng.uniform(0, 60, (150, 2)), rng.uniform(0, 60, (140, 2)), 4.0
    p, g = match_points(pred, gt, r, method="hungarian")
    assert len(set(p.tolist())) == len(p) and len(set(g.tolist())) == len(g)
    assert (np.linalg.norm(pred[p] - gt[g], axis=1) <= r).all()
    within = np.linalg.norm(pred[:, None] - gt[None], axis=2) <= r
    best = (maximum_bipartite_matching(csr_matrix(within), perm_type="column") >= 0).sum()
    assert len(p) == best
    assert len(p) >= len(match_points(pred, gt, r)[0])


def test_per_class_pooling_across_images_and_f_avg():
    s = PointScorer(("a", "b"))
    # image 1: the nucleus of class b at (10, 0) is predicted as a
    s.add([[0, 0], [10, 0]], [[0, 0], [10, 0]], 2, scores=[0.9, 0.8], pred_cls=[0, 0], gt_cls=[0, 1])
    # image 2: one correct b, one spurious b
    s.add([[0, 0], [20, 0]], [[0, 0]], 2, scores=[0.9, 0.8], pred_cls=[1, 1], gt_cls=[1])
    r = s.result()
    assert r["n_images"] == 2
    assert s.det.tolist() == [3, 1, 0]
    assert r["detection"]["precision"] == pytest.approx(0.75)
    assert r["detection"]["f1"] == pytest.approx(6 / 7)
    a, b = r["classes"]["a"], r["classes"]["b"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    # Pooled TP=1 FP=1 FN=1 -> 0.5; averaging per-image F1 (0 and 2/3) would give 1/3.
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert r["f_avg"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_detection_only():
    s = PointScorer(None, method="hungarian")
    s.add([[0, 0]], [[0, 1]], 2)
    r = s.result()
    assert r["detection"]["f1"] == 1.0 and r["classes"] is None and r["f_avg"] is None


def test_bad_method_and_missing_classes():
    with pytest.raises(DenucError):
        PointScorer(("a",), method="nearest")
    with pytest.raises(DenucError):
        match_points([], [], 1, method="nearest")
    with pytest.raises(DenucError):
        PointScorer(("a",)).add([[0, 0]], [[0, 0]], 1)
