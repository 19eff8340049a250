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
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .errors import DenucError

MATCHING = ("greedy", "hungarian")


def match_points(pred_xy, gt_xy, radius: float, scores=None, method: str = "greedy"):
    """Match predictions to ground truth within ``radius``.

    Returns ``(pred_idx, gt_idx)``: integer arrays of equal length, one entry per matched pair.
    A distance equal to ``radius`` still matches.
    """
    if method not in MATCHING:
        raise DenucError(f"unknown matching {method!r}; use one of {', '.join(MATCHING)}")
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        return empty
    tree = cKDTree(gt_xy)
    # Sorted gt indices within radius, per prediction; the tiny slack keeps pairs whose distance
    # equals the radius but comes out a rounding error above it.
    candidates = tree.query_ball_point(pred_xy, radius * (1 + 1e-9), return_sorted=True)
    if method == "hungarian":
        return _hungarian(pred_xy, gt_xy, candidates)

    order = np.arange(len(pred_xy)) if scores is None else np.argsort(-np.asarray(scores), kind="stable")
    taken = np.zeros(len(gt_xy), dtype=bool)
    pi, gi = [], []
    for p in order:
        cand = [g for g in candidates[p] if not taken[g]]
        if not cand:
            continue
        d = np.linalg.norm(gt_xy[cand] - pred_xy[p], axis=1)
        g = cand[int(np.argmin(d))]  # equal distances: the lowest gt index, so results are reproducible
        taken[g] = True
        pi.append(p)
        gi.append(g)
    return np.asarray(pi, dtype=np.int64), np.asarray(gi, dtype=np.int64)


def _hungarian(pred_xy, gt_xy, candidates):
    """Maximum matching, ties broken by the smallest total distance.

    Solved separately on each connected group of mutually reachable points: a dense
    P x G cost matrix for a whole slide would not fit in memory, and groups are small.
    """
    rows = np.repeat(np.arange(len(pred_xy)), [len(c) for c in candidates])
    cols = np.fromiter((g for c in candidates for g in c), dtype=np.int64, count=len(rows))
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_p = len(pred_xy)
    graph = coo_matrix((np.ones(len(rows)), (rows, n_p + cols)), shape=(n_p + len(gt_xy),) * 2)
    _, comp = connected_components(graph, directed=False)
    dist = np.linalg.norm(pred_xy[rows] - gt_xy[cols], axis=1)
    pi, gi = [], []
    edge_comp = comp[rows]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    for edges in np.split(order, bounds):
        ps, p_local = np.unique(rows[edges], return_inverse=True)
        gs, g_local = np.unique(cols[edges], return_inverse=True)
        # A big constant per allowed pair makes "more matches" dominate; distance breaks ties.
        cost = np.zeros((len(ps), len(gs)))
        cost[p_local, g_local] = dist[edges] - 1e6
        r, c = linear_sum_assignment(cost)
        keep = cost[r, c] < 0
        pi.append(ps[r[keep]])
        gi.append(gs[c[keep]])
    pi, gi = np.concatenate(pi), np.concatenate(gi)
    order = np.argsort(pi)
    return pi[order].astype(np.int64), gi[order].astype(np.int64)


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
        if pred_cls is None or gt_cls is None:
            raise DenucError("per-class scoring needs the classes of both predictions and ground truth")
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
