"""Distance-based point matching and F1, the standard nuclei detection/classification metric.

Within each class, predictions are matched one-to-one to ground-truth points no
farther than ``radius`` pixels. ``greedy`` (the default, as in MCSpatNet and DeNuC)
takes predictions in descending score order and gives each the nearest unmatched
ground truth; ``hungarian`` maximises the number of matches, breaking ties by the
smallest total distance. TP/FP/FN are pooled over all images before computing
precision, recall and F1; ``f_avg`` is the mean per-class F1. Detection F1
ignores classes.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from .errors import DenucError

MATCHING = ("greedy", "hungarian")


def match_points(pred_xy, gt_xy, radius: float, scores=None, method: str = "greedy"):
    """Match predictions to ground truth within ``radius``.

    Returns ``(pred_idx, gt_idx)``: integer arrays of equal length, one entry per matched pair.
    A distance equal to ``radius`` still matches.
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        return empty
    if method not in MATCHING:
        raise DenucError(f"unknown matching {method!r}; use one of {', '.join(MATCHING)}")
    tree = cKDTree(gt_xy)
    if method == "hungarian":
        dist = tree.sparse_distance_matrix(cKDTree(pred_xy), radius).toarray().T  # (P, G); 0 = out of range
        within = np.zeros((len(pred_xy), len(gt_xy)), dtype=bool)
        pairs = tree.query_ball_point(pred_xy, radius)
        for p, gs in enumerate(pairs):
            within[p, gs] = True
        if not within.any():
            return empty
        # Big constant per pair makes "more matches" dominate; distance breaks ties.
        cost = np.where(within, dist - 1e6, 0.0)
        rows, cols = linear_sum_assignment(cost)
        keep = within[rows, cols]
        return rows[keep].astype(np.int64), cols[keep].astype(np.int64)

    order = np.arange(len(pred_xy)) if scores is None else np.argsort(-np.asarray(scores), kind="stable")
    taken = np.zeros(len(gt_xy), dtype=bool)
    candidates = tree.query_ball_point(pred_xy, radius, return_sorted=False)
    pi, gi = [], []
    for p in order:
        cand = [g for g in candidates[p] if not taken[g]]
        if not cand:
            continue
        d = np.linalg.norm(gt_xy[cand] - pred_xy[p], axis=1)
        g = cand[int(np.argmin(d))]
        taken[g] = True
        pi.append(p)
        gi.append(g)
    return np.asarray(pi, dtype=np.int64), np.asarray(gi, dtype=np.int64)


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class PointScorer:
    """Accumulates TP/FP/FN over images, then reports detection and per-class figures.

    ``add`` takes one image's predictions and ground truth; ``radius`` is in pixels of that
    image (convert from micrometres with the image's mpp). Pass ``class_names=None`` to
    score detection only.
    """

    def __init__(self, class_names=None, method: str = "greedy"):
        if method not in MATCHING:
            raise DenucError(f"unknown matching {method!r}; use one of {', '.join(MATCHING)}")
        self.class_names = tuple(class_names) if class_names is not None else None
        self.method = method
        self.det = np.zeros(3, dtype=np.int64)  # tp, fp, fn
        k = len(self.class_names) if self.class_names else 0
        self.cls = np.zeros((k, 3), dtype=np.int64)
        self.support = np.zeros(k, dtype=np.int64)
        self.n_images = 0

    def add(self, pred_xy, gt_xy, radius: float, scores=None, pred_cls=None, gt_cls=None):
        pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
        gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
        self.n_images += 1
        p, _ = match_points(pred_xy, gt_xy, radius, scores, self.method)
        self.det += (len(p), len(pred_xy) - len(p), len(gt_xy) - len(p))
        if self.class_names is None:
            return
        pred_cls = np.asarray(pred_cls, dtype=np.int64).reshape(len(pred_xy))
        gt_cls = np.asarray(gt_cls, dtype=np.int64).reshape(len(gt_xy))
        sc = None if scores is None else np.asarray(scores)
        for k in range(len(self.class_names)):
            pm, gm = pred_cls == k, gt_cls == k
            p, _ = match_points(pred_xy[pm], gt_xy[gm], radius, None if sc is None else sc[pm], self.method)
            self.cls[k] += (len(p), pm.sum() - len(p), gm.sum() - len(p))
            self.support[k] += gm.sum()

    def result(self) -> dict:
        out = {"n_images": self.n_images, "detection": _prf(*self.det), "classes": None, "f_avg": None}
        if self.class_names is not None:
            out["classes"] = {
                name: {**_prf(*self.cls[k]), "support": int(self.support[k])} for k, name in enumerate(self.class_names)
            }
            out["f_avg"] = float(np.mean([c["f1"] for c in out["classes"].values()])) if self.class_names else 0.0
        return out
