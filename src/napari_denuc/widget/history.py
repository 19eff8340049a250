"""Undo/redo for a points layer, as diffs keyed by the stable nucleus id ``nid``. No Qt.

Every change to the layer (the widget's actions and napari's own add/move/delete) is
recorded: the history keeps a shadow copy of the layer as of the last record, and ``record``
compares the layer with it. An action stores only the rows that differ: the old rows with
their old positions and the new rows with their new positions. Undo drops the new rows and
puts the old ones back at their old positions; redo does the reverse. Because nothing goes
unrecorded, the layer always equals the state right after the action on top of the stack,
so undoing it touches no other nucleus.

A change of the class list (a new class) or a reordering of surviving rows is stored as a
whole before/after copy (rare, and still exact). Widget state that is not in the layer (the
active head) rides along in ``Action.extra`` and is restored through ``on_apply``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

META_KEYS = ("class_names", "class_colors", "tombstones")
DEPTH = 200


@dataclass
class _Side:
    pos: np.ndarray  # positions of these rows in their state
    data: np.ndarray
    features: pd.DataFrame


@dataclass
class Action:
    label: str
    before: _Side | None = None  # None: a whole-state action (see full_before/full_after)
    after: _Side | None = None
    full_before: tuple | None = None
    full_after: tuple | None = None
    meta_before: dict | None = None
    meta_after: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        if self.before is None:
            return -1
        return len(self.before.pos) + len(self.after.pos)


def _meta(layer) -> dict:
    d = layer.metadata.get("denuc", {})
    return {k: copy.deepcopy(d.get(k)) for k in META_KEYS}


def _nid(features) -> np.ndarray:
    return np.asarray(features["nid"], dtype=np.int64)


def _rows_differ(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """Row-wise inequality of two frames with the same columns and categories (NaN == NaN)."""
    diff = np.zeros(len(a), dtype=bool)
    for c in a.columns:
        x, y = a[c], b[c]
        if isinstance(x.dtype, pd.CategoricalDtype):
            diff |= np.asarray(x.cat.codes) != np.asarray(y.cat.codes)
            continue
        xv, yv = np.asarray(x), np.asarray(y)
        if xv.dtype.kind == "f" or yv.dtype.kind == "f":
            xv, yv = xv.astype(np.float64), yv.astype(np.float64)
            diff |= ~((xv == yv) | (np.isnan(xv) & np.isnan(yv)))
        else:
            diff |= xv != yv
    return diff


def _schema(features) -> tuple:
    out = []
    for c in features.columns:
        dt = features[c].dtype
        cats = tuple(map(str, dt.categories)) if isinstance(dt, pd.CategoricalDtype) else None
        out.append((c, cats))
    return tuple(out)


def _apply_side(data, features, remove: _Side, insert: _Side):
    """Drop the rows at ``remove.pos`` and put ``insert``'s rows at ``insert.pos``."""
    n = len(data)
    keep = np.ones(n, dtype=bool)
    keep[remove.pos] = False
    m = int(keep.sum()) + len(insert.pos)
    slots = np.ones(m, dtype=bool)
    slots[insert.pos] = False
    out = np.empty((m, data.shape[1] if data.ndim == 2 else 2), dtype=np.float64)
    out[slots] = data[keep]
    out[insert.pos] = insert.data
    surv = features.iloc[np.flatnonzero(keep)]
    pos = np.concatenate([np.flatnonzero(slots), insert.pos])
    f = pd.concat([surv, insert.features], ignore_index=True)
    order = np.argsort(pos, kind="stable")
    f = f.iloc[order].reset_index(drop=True)
    for c in features.columns:  # concat of an empty piece can lose a categorical dtype
        if f[c].dtype != features[c].dtype:
            f[c] = f[c].astype(features[c].dtype)
    return out, f


class History:
    """Undo and redo stacks of one points layer."""

    def __init__(self, layer, depth: int = DEPTH):
        self.depth = depth
        self.undo_stack: list[Action] = []
        self.redo_stack: list[Action] = []
        self.reset(layer)

    def reset(self, layer) -> None:
        """Take the layer as it is now as the base state (no action recorded)."""
        self._data = np.array(layer.data, dtype=np.float64, copy=True).reshape(-1, 2)
        self._features = layer.features.copy(deep=True)
        self._meta = _meta(layer)

    def state(self) -> tuple:
        """The recorded state (data, features, meta): what the layer held at the last record."""
        return self._data, self._features, self._meta

    def diff(self, layer, label: str, extra=None) -> Action | None:
        """The action from the recorded state to the layer's current state (None when equal)."""
        data = np.array(layer.data, dtype=np.float64, copy=True).reshape(-1, 2)
        feats = layer.features
        meta = _meta(layer)
        old_d, old_f, old_m = self._data, self._features, self._meta
        meta_changed = meta != old_m
        act = Action(label, extra=dict(extra or {}))
        if meta_changed:
            act.meta_before, act.meta_after = old_m, copy.deepcopy(meta)
        if _schema(feats) != _schema(old_f) or "nid" not in feats:
            act.full_before = (old_d, old_f)
            act.full_after = (data, feats.copy(deep=True))
            return act
        old_id, new_id = _nid(old_f), _nid(feats)
        in_new = np.isin(old_id, new_id)
        in_old = np.isin(new_id, old_id)
        # surviving rows must keep their relative order for the positional diff to be exact
        surv_old = old_id[in_new]
        surv_new = new_id[in_old]
        if not np.array_equal(surv_old, surv_new):
            act.full_before = (old_d, old_f)
            act.full_after = (data, feats.copy(deep=True))
            return act
        io, inn = np.flatnonzero(in_new), np.flatnonzero(in_old)
        changed = (old_d[io] != data[inn]).any(axis=1) | _rows_differ(
            old_f.iloc[io].reset_index(drop=True), feats.iloc[inn].reset_index(drop=True)
        )
        b_pos = np.sort(np.concatenate([np.flatnonzero(~in_new), io[changed]])).astype(np.int64)
        a_pos = np.sort(np.concatenate([np.flatnonzero(~in_old), inn[changed]])).astype(np.int64)
        if not len(b_pos) and not len(a_pos) and not meta_changed and not act.extra:
            return None
        act.before = _Side(b_pos, old_d[b_pos], old_f.iloc[b_pos].reset_index(drop=True).copy())
        act.after = _Side(a_pos, data[a_pos], feats.iloc[a_pos].reset_index(drop=True).copy())
        return act

    def record(self, layer, label: str, extra=None) -> Action | None:
        """Push what changed since the last record as one undoable action."""
        act = self.diff(layer, label, extra)
        if act is None:
            return None
        self.undo_stack.append(act)
        del self.undo_stack[: -self.depth]
        self.redo_stack.clear()
        self.reset(layer)
        return act

    def _apply(self, layer, act: Action, undo: bool, on_apply=None) -> None:
        data, feats = np.asarray(layer.data, dtype=np.float64).reshape(-1, 2), layer.features
        if act.full_before is not None:
            d, f = act.full_before if undo else act.full_after
            d, f = d.copy(), f.copy(deep=True)
        else:
            remove, insert = (act.after, act.before) if undo else (act.before, act.after)
            d, f = _apply_side(data, feats, remove, insert)
        meta = act.meta_before if undo else act.meta_after
        if meta is not None:
            layer.metadata.setdefault("denuc", {}).update(copy.deepcopy(meta))
        if on_apply is not None:
            on_apply(layer, d, f, act, undo)
        else:
            layer.data = d
            layer.features = f
        self.reset(layer)

    def undo(self, layer, on_apply=None) -> Action | None:
        return self._step(layer, self.undo_stack, self.redo_stack, True, on_apply)

    def redo(self, layer, on_apply=None) -> Action | None:
        return self._step(layer, self.redo_stack, self.undo_stack, False, on_apply)

    def _step(self, layer, source: list, target: list, undo: bool, on_apply) -> Action | None:
        """Apply the top action of ``source`` (backwards when ``undo``) and move it to ``target``."""
        if not source:
            return None
        act = source.pop()
        self._apply(layer, act, undo, on_apply)
        target.append(act)
        return act

    def pop_top_if(self, label: str, layer, on_apply=None) -> bool:
        """Undo the top action without keeping it for redo, when it is ``label`` (coalescing)."""
        if self.undo_stack and self.undo_stack[-1].label == label:
            act = self.undo_stack.pop()
            self._apply(layer, act, True, on_apply)
            return True
        return False
