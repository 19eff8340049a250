"""What Detect & classify, the threshold, Import and the review queue do to a layer's table. No Qt.

Every function takes the layer's ``(data, features)`` (napari ``(row, col)`` data and the
feature frame described in ``layer.py``) and returns new ones; the widget writes them to the
layer and records one undoable action.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..results import Detections
from . import layer as L
from .coords import rc_to_xy, xy_to_rc


@dataclass
class Candidates:
    """Everything one detection run found, down to a low score floor, with encoder features.

    Greedy NMS keeps a point when no higher-scoring kept point lies within the radius. A point
    above a threshold ``tau`` is therefore suppressed only by points also above ``tau``, so
    thresholding the NMS output of a low floor at ``tau`` gives exactly NMS at ``tau``: moving
    the threshold needs neither the detector nor the encoder again.
    """

    det: Detections  # full-resolution (x, y)
    features: np.ndarray | None
    tau_floor: float
    region: tuple | None = None  # (x0, y0, x1, y1) full-resolution box the run covered, None: all
    poly: np.ndarray | None = None
    head: object = None  # the head that classified them
    mpp: float = 0.5  # of the full-resolution pixels

    def select(self, tau: float) -> tuple[Detections, np.ndarray | None]:
        keep = self.det.scores > tau  # the detector keeps prob > tau
        det, feats = subset(self.det, keep), (None if self.features is None else self.features[keep])
        if self.head is not None and feats is not None and len(det):
            # Classified here, by ``head``: a context head reads the other nuclei kept at this tau
            # (not every low-score candidate), and a head kept since the run classifies what the
            # threshold brings in (``with_head``).
            probs = np.asarray(self.head.predict_proba(self.head.inputs(feats, det.xy, self.mpp)), dtype=np.float32)
            det = Detections(det.xy, det.scores, probs.argmax(1), tuple(self.head.class_names), tuple(self.head.class_colors), probs)
        return det, feats

    def count(self, tau: float) -> int:
        return int((self.det.scores > tau).sum())

    def with_head(self, head) -> Candidates:
        """These candidates, classified by ``head`` from now on (the head in use since the run);
        unchanged when ``head`` reads another encoder's features than the cached ones."""
        if head is None or head is self.head or getattr(head, "encoder_id", None) != getattr(self.head, "encoder_id", None):
            return self
        return replace(self, head=head)


def subset(det: Detections, keep) -> Detections:
    keep = np.asarray(keep)
    return Detections(
        det.xy[keep], det.scores[keep], det.class_ids[keep], det.class_names, det.class_colors,
        None if det.probs is None else det.probs[keep],
    )


def to_classes(det: Detections, names, colors) -> Detections:
    """``det`` relabelled onto the class list ``names`` (every class of ``det`` must be in it)."""
    if tuple(det.class_names) == tuple(names):
        return det
    lookup = {n: k for k, n in enumerate(names)}
    ids = np.array([lookup[det.class_names[c]] for c in det.class_ids], dtype=np.int64)
    probs = None
    if det.probs is not None:
        probs = np.full((len(det), len(names)), np.nan, np.float32)
        for k, n in enumerate(det.class_names):
            probs[:, lookup[n]] = det.probs[:, k]
    out = Detections(det.xy, det.scores, ids, names, colors, None)
    out.probs = probs  # NaN for classes the source did not score
    return out


def in_region(xy, region, poly=None) -> np.ndarray:
    inside = np.ones(len(xy), bool)
    if region is not None and len(xy):
        x0, y0, x1, y1 = region
        inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    if poly is not None and len(xy):
        from skimage.measure import points_in_poly

        inside &= points_in_poly(xy, poly)
    return inside


def _near(xy, others, radius) -> np.ndarray:
    if not len(xy) or not len(others):
        return np.zeros(len(xy), bool)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.asarray(others, dtype=np.float64).reshape(-1, 2)).query(xy, k=1)
    return d <= radius


def _append(data, features, det, source, reviewed, next_nid):
    new_f = L.make_features(det, source, reviewed, first_nid=next_nid)
    names = list(features["class"].cat.categories)
    f = pd.concat([features, new_f[features.columns]], ignore_index=True)
    f["class"] = pd.Categorical(f["class"].astype(str), categories=names)
    f["source"] = pd.Categorical(f["source"].astype(str), categories=list(L.SOURCES))
    f["reviewed"] = f["reviewed"].astype(bool)
    d = np.concatenate([np.asarray(data, dtype=np.float64).reshape(-1, 2), xy_to_rc(det.xy)], axis=0)
    return d, f, next_nid + len(det)


def merge_detections(data, features, det: Detections, *, region=None, poly=None, radius_px: float,
                     tombstones=(), next_nid: int = 0, reclassify: bool = False):
    """The layer after a (re-)detection in ``region``: ``(data, features, next_nid, n_kept_user)``.

    - unreviewed model nuclei in the region are replaced by ``det``;
    - edited or reviewed nuclei are never replaced, and no detection within ``radius_px`` of
      one of them (or of a kept nucleus outside the region) is added;
    - a detection within ``radius_px`` of a tombstone (a model nucleus the user deleted) is
      not added: deleted nuclei never come back;
    - a model nucleus whose detection comes back at the same place keeps its row (and id);
      with ``reclassify`` (Detect & classify) it takes the detection's class, score and
      probabilities (the head in use may not be the one that classified it).
    """
    names = list(features["class"].cat.categories)
    det = to_classes(det, names, ()) if tuple(det.class_names) != tuple(names) else det
    xy_old = rc_to_xy(data) if len(data) else np.zeros((0, 2))
    edited, reviewed = L.flags(features, len(xy_old))
    user = edited | reviewed
    inside = in_region(xy_old, region, poly)
    replace = inside & ~user
    same = np.zeros(len(det), bool)
    if replace.any() and len(det):
        from scipy.spatial import cKDTree

        d, j = cKDTree(xy_old[replace]).query(det.xy, k=1)
        hit = d < 1e-3
        same = hit
        idx_replace = np.flatnonzero(replace)
        replace[idx_replace[j[hit]]] = False  # the same nucleus again: keep its row
        if reclassify and det.probs is not None:
            features = _refreshed(features, idx_replace[j[hit]], subset(det, hit))
    keep = ~replace
    det = subset(det, ~same)
    drop = _near(det.xy, xy_old[keep], radius_px) | _near(det.xy, tombstones, radius_px)
    det = subset(det, ~drop)
    kept_f = features.iloc[np.flatnonzero(keep)].reset_index(drop=True)
    d, f, next_nid = _append(np.asarray(data).reshape(-1, 2)[keep], kept_f, det, "model", False, next_nid)
    return d, f, next_nid, int(user.sum())


def _refreshed(features, rows, det: Detections) -> pd.DataFrame:
    """``features`` with ``det``'s class, score and probabilities at ``rows`` (the same nuclei found again)."""
    if not len(rows):
        return features
    f, _ = L.with_predictions(features, rows, det.class_ids, det.probs)
    if "score" in f:
        score = np.asarray(f["score"], dtype=np.float32).copy()
        score[rows] = det.scores
        f["score"] = score
    return f


def import_table(data, features, det: Detections, mode: str, *, radius_px: float, next_nid: int,
                 source=None, reviewed=None):
    """The layer after importing ``det`` (``mode`` "replace" or "merge").

    ``det``'s classes must already be among the layer's. Flags come from the file when it has
    them (``source``/``reviewed`` arrays), else imported nuclei are unreviewed model nuclei.
    Merge keeps every nucleus of the layer except unreviewed model nuclei that an imported
    nucleus lands on (within ``radius_px``); an imported nucleus that lands on an edited or
    reviewed one is skipped. Returns ``(data, features, next_nid, n_added, n_skipped)``.
    """
    n = len(det)
    source = np.asarray(["model"] * n if source is None else source, dtype=object)
    reviewed = np.zeros(n, bool) if reviewed is None else np.asarray(reviewed, dtype=bool)
    if mode == "replace":
        empty_f = features.iloc[:0]
        d, f, next_nid = _append(np.zeros((0, 2)), empty_f, det, source, reviewed, next_nid)
        return d, f, next_nid, n, 0
    xy_old = rc_to_xy(data) if len(data) else np.zeros((0, 2))
    edited, rev_old = L.flags(features, len(xy_old))
    user = edited | rev_old
    skip = _near(det.xy, xy_old[user], radius_px)
    keep_det = ~skip
    det, source, reviewed = subset(det, keep_det), source[keep_det], reviewed[keep_det]
    covered = _near(xy_old, det.xy, radius_px) & ~user
    keep = ~covered
    kept_f = features.iloc[np.flatnonzero(keep)].reset_index(drop=True)
    d, f, next_nid = _append(np.asarray(data).reshape(-1, 2)[keep], kept_f, det, source, reviewed, next_nid)
    return d, f, next_nid, len(det), int(skip.sum())


def with_new_class(features: pd.DataFrame, name: str) -> pd.DataFrame:
    f = features.copy()
    f["class"] = f["class"].cat.add_categories([name])
    cols = list(f.columns)
    f[L.prob_column(name)] = np.full(len(f), np.nan, np.float32)
    # keep prob columns together, before source/reviewed (the writers do not care; humans do)
    last_prob = max(i for i, c in enumerate(cols) if c.startswith("prob_") or c == "score")
    cols.insert(last_prob + 1, L.prob_column(name))
    return f[cols]


def review_candidates(features: pd.DataFrame, names, class_filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mask of nuclei still to review, their margins): unreviewed, of ``class_filter`` if given.

    The margin is top-1 minus top-2 class probability; nuclei without probabilities (none are
    unreviewed model nuclei in practice) sort last.
    """
    n = len(features)
    _, reviewed = L.flags(features, n)
    todo = ~reviewed
    if class_filter:
        todo &= np.asarray(features["class"].cat.codes) == list(names).index(class_filter)
    m = L.margins(features, names)
    return todo, np.where(np.isfinite(m), m, np.inf)


def next_to_review(features: pd.DataFrame, names, class_filter: str | None = None) -> tuple[int | None, float | None]:
    """(row, margin) of the least-confident nucleus still to review, or (None, None)."""
    todo, m = review_candidates(features, names, class_filter)
    if not todo.any():
        return None, None
    masked = np.where(todo, m, np.inf)
    i = int(np.argmin(masked))
    if not todo[i]:  # every remaining one has infinite margin: take the first
        i = int(np.flatnonzero(todo)[0])
    v = float(m[i])
    return i, (v if np.isfinite(v) else None)
