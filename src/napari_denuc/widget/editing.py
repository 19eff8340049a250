"""Changes to a nuclei layer: the widget's writes, napari's own edits (add, move, delete), the
keys' actions (class, reviewed, copy/paste), classes added, and undo/redo over all of them.
"""

from __future__ import annotations

import contextlib

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtWidgets import QInputDialog

from . import edits as E
from . import layer as L
from .coords import rc_to_xy
from .history import History
from .persistence import OWNERS


def nuclei(n: int) -> str:
    return f"{n} {'nucleus' if n == 1 else 'nuclei'}"


class EditingMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    @contextlib.contextmanager
    def _quiet(self):
        self._suppress += 1
        try:
            yield
        finally:
            self._suppress -= 1

    def _write(self, lyr, data=None, features=None, rows=None):
        """Put new data/features into the layer, with colours following.

        ``rows``: only these rows changed (a relabel, a review): the columns are swapped inside
        the layer's own table and only those rows are recoloured, so a review step stays fast
        on tens of thousands of nuclei (every full colour update costs napari ~40 ms at 20,000).
        """
        with self._quiet():
            if rows is not None and data is None and features is not None and len(features) == len(lyr.data):
                table = lyr.features
                for c in features.columns:
                    table[c] = features[c].array
                self._sync_style(lyr, rows)
                return
            if data is not None:
                lyr.selected_data = set()
                lyr.data = data
            if features is not None:
                lyr.features = features
            self._sync_style(lyr)

    def _history(self, lyr) -> History:
        token = L.token_of(lyr)
        h = self._histories.get(token)
        if h is None:
            h = self._histories[token] = History(lyr)
        return h

    def _begin_step(self, lyr) -> History:
        """Record what is not recorded yet (a move settling, napari's own edit) as its own step,
        so that the step which follows holds only its own change."""
        self._flush_moves()
        h = self._history(lyr)
        h.record(lyr, "edit")
        return h

    def _record(self, lyr, label: str, extra=None):
        act = self._history(lyr).record(lyr, label, extra)
        self._mark_dirty(lyr)
        self._refresh_views()
        return act

    def _mark_dirty(self, lyr):
        token = L.token_of(lyr)
        if token in self._infos:
            self._dirty.add(token)
            self._autosave_timer.start()

    def _next_nid(self, lyr) -> int:
        info = self._infos[L.token_of(lyr)]
        f = lyr.features
        if "nid" in f and len(f):
            info["next_nid"] = max(info.get("next_nid", 0), int(np.asarray(f["nid"]).max()) + 1)
        return info.get("next_nid", 0)

    def _set_next_nid(self, lyr, value: int):
        self._infos[L.token_of(lyr)]["next_nid"] = int(value)

    def _on_data_event(self, event):
        """napari's own edits (mouse add/move/delete, paste): recategorise, flag, record, autosave."""
        if self._suppress:
            return
        lyr = self._layer_by_token(L.token_of(event.source))
        if lyr is None:
            return
        if self._retired:  # dock closed: napari's own edits are still saved, by the layer's owner only
            if OWNERS.get(L.token_of(lyr)) is self and not str(getattr(event, "action", "")).endswith("ing"):
                self._mark_dirty(lyr)
            return
        action = str(getattr(event, "action", ""))
        if action.endswith(("adding", "removing")):
            self._flush_moves()  # a move just before is its own action
            return
        if action.endswith("changing"):
            return
        self._normalise(lyr)
        if action.endswith("added"):
            n = len(lyr.data)
            rows = sorted({int(i) % n for i in (getattr(event, "data_indices", ()) or ()) if n and -n <= int(i) < n})
            if rows:  # placed by hand: the user's, whatever napari copied into them from a selected nucleus
                self._write(lyr, features=L.placed_by_hand(lyr.features, rows))
            self._record(lyr, "add")
        elif action.endswith("removed"):
            self._tombstone_removed(lyr)
            self._record(lyr, "delete")
        elif action.endswith("changed"):
            idx = [int(i) for i in (getattr(event, "data_indices", ()) or ()) if 0 <= int(i) < len(lyr.data)]
            # every index is also what a programmatic `layer.data = ...` reports; a mouse drag moves
            # the selection, so all nuclei dragged at once (or the only one) still count as edits
            if idx and (len(idx) < len(lyr.data) or set(idx) <= set(lyr.selected_data)):
                f = lyr.features
                edited, _ = L.flags(f, len(f))
                if not edited[idx].all():
                    self._write(lyr, features=L.with_flags(f, idx, edited=True))
            self._pending_move.add(L.token_of(lyr))
            self._move_timer.start()

    def _flush_moves(self):
        self._move_timer.stop()
        for token in list(self._pending_move):
            self._pending_move.discard(token)
            lyr = self._layer_by_token(token)
            if lyr is not None:
                self._record(lyr, "move")

    def _normalise(self, lyr):
        """Give added/pasted rows ids and restore the column types napari drops on append."""
        names = L.class_names(lyr)
        f, nxt, changed = L.recategorise(lyr.features, names, self._next_nid(lyr))
        self._set_next_nid(lyr, nxt)
        if changed:
            self._write(lyr, features=f)
        else:
            self._sync_style(lyr)

    def _tombstone_removed(self, lyr):
        """Remember where deleted model nuclei were, so a re-detection does not bring them back."""
        old_d, old_f, _ = self._history(lyr).state()
        gone = ~np.isin(np.asarray(old_f["nid"]), np.asarray(lyr.features["nid"]))
        if not gone.any():
            return
        src = np.asarray(old_f["source"].astype(str))[gone]
        scores = np.asarray(old_f["score"], dtype=np.float32)[gone]
        conf_known = np.isfinite(np.asarray(old_f[[c for c in old_f.columns if c.startswith("prob_")]], dtype=np.float32)[gone]).any(axis=1) if len(old_f.columns) else np.zeros(int(gone.sum()), bool)
        model_made = (src == "model") | conf_known | (scores < 1.0)
        if model_made.any():
            xy = rc_to_xy(old_d[gone][model_made])
            meta = lyr.metadata["denuc"]
            meta["tombstones"] = list(meta.get("tombstones") or []) + np.round(xy, 3).tolist()

    def set_class_of_selected(self, name: str, lyr=None) -> int:
        """Set the class of the selected nuclei (undoable); they become edited and reviewed."""
        lyr = self._resolve(lyr)
        if lyr is None or not lyr.selected_data:
            self._set_status("Select nuclei first (select mode, click or drag), then choose their class.")
            return 0
        if name not in L.class_names(lyr):
            show_warning(f"unknown class {name!r}")
            return 0
        sel = sorted(int(i) for i in lyr.selected_data)
        self._flush_moves()
        f = lyr.features
        before = np.asarray(f["class"].cat.codes)[sel]
        self._write(lyr, features=L.with_class(f, sel, name), rows=sel)
        self._record(lyr, f"class {name}")
        n = int((before != L.class_names(lyr).index(name)).sum())
        self._set_status(f"{len(sel)} nuclei set to {name} ({n} changed).")
        self._advance_review(lyr, sel)
        return n

    def mark_selected_reviewed(self, lyr=None):
        lyr = self._resolve(lyr)
        if lyr is None or not lyr.selected_data:
            self._set_status("Select the nuclei you have checked, then mark them reviewed.")
            return
        sel = sorted(int(i) for i in lyr.selected_data)
        self._flush_moves()
        self._write(lyr, features=L.with_flags(lyr.features, sel, reviewed=True), rows=sel)
        self._record(lyr, "reviewed")
        self._set_status(f"{nuclei(len(sel))} marked reviewed.")
        self._advance_review(lyr, sel)

    def _resolve(self, lyr):
        """A layer handed to a key binding is napari's own object: use the viewer's handle for it."""
        if lyr is None:
            return self.points_layer()
        return self._layer_by_token(L.token_of(lyr)) or lyr

    def copy_selected(self, lyr=None):
        """Ctrl+C on the points layer: remember the selected nuclei's positions and classes."""
        lyr = self._resolve(lyr)
        if lyr is None or not lyr.selected_data:
            return
        sel = sorted(int(i) for i in lyr.selected_data)
        self._clipboard = (np.asarray(lyr.data)[sel].copy(), lyr.features["class"].astype(str).to_numpy()[sel].copy())
        self._set_status(f"Copied {nuclei(len(sel))} (Ctrl+V pastes).")

    def paste(self, lyr=None):
        """Ctrl+V: add the copied nuclei at their places with their classes, as the user's nuclei; one undo step."""
        lyr = self._resolve(lyr)
        clip = self._clipboard
        if lyr is None or clip is None or not len(clip[0]):
            return
        data, classes = clip
        self._flush_moves()
        names = L.class_names(lyr)
        n0 = len(lyr.data)
        with self._quiet():
            lyr.add(data)
        rows = list(range(n0, len(lyr.data)))
        self._normalise(lyr)
        f = L.placed_by_hand(lyr.features, rows)
        for name in set(classes):
            if name in names:
                f = L.with_class(f, [r for r, c in zip(rows, classes) if c == name], name)
        self._write(lyr, features=f)
        with self._quiet():
            lyr.selected_data = set(rows)
        lyr.feature_defaults = L.feature_defaults(names, self._new_class(lyr))
        self._record(lyr, "paste")
        self._set_status(f"Pasted {nuclei(len(rows))}.")

    def _ask_new_class(self):
        name, ok = QInputDialog.getText(self, "Add a class", "Class name:")
        if ok and name.strip():
            self.add_class(name.strip())

    def add_class(self, name: str, color=None):
        """Add a class to the current points layer (and to the next head); undoable."""
        lyr = self.points_layer()
        if lyr is None:
            if name not in self.extra_classes:
                self.extra_classes.append(name)
            self._sync_classes()
            return
        if name in L.class_names(lyr):
            return
        self._flush_moves()
        self._append_class(lyr, name, color)
        self._record(lyr, f"add class {name}")
        self._sync_classes()

    def _classes_onto_layer(self, lyr, det):
        """``det`` on the layer's class list; classes the layer lacks are added to it first."""
        missing = [n for n in det.class_names if n not in L.class_names(lyr)]
        for n in missing:
            k = list(det.class_names).index(n)
            self._append_class(lyr, n, det.class_colors[k] if k < len(det.class_colors) else None)
        if missing:
            self._record(lyr, "add classes")
        return E.to_classes(det, list(L.class_names(lyr)), L.class_colors(lyr))

    def _append_class(self, lyr, name, color=None):
        """Add ``name`` (with ``color``, else the palette's next) to the layer's classes; the caller records the step."""
        names = list(L.class_names(lyr))
        colors = list(L.display_colors(names, L.class_colors(lyr)))
        colors.append(tuple(color) if color else L.palette(len(names) + 1)[-1])
        meta = lyr.metadata["denuc"]
        meta["class_names"] = names + [name]
        meta["class_colors"] = [list(c) for c in colors]
        self._write(lyr, features=E.with_new_class(lyr.features, name))

    def _apply_state(self, lyr, data, features, act, undo):
        with self._quiet():
            lyr.selected_data = set()
            lyr.data = data
            lyr.features = features
            names = L.class_names(lyr)
            lyr.feature_defaults = L.feature_defaults(names, self.class_combo.currentText())
            self._sync_style(lyr)
        if "tau" in act.extra:  # the threshold control follows its own undo/redo
            tau = act.extra["tau"][0 if undo else 1]
            self._tau_shown[L.token_of(lyr)] = tau
            self._show_tau(tau)

    def _step_head(self, extra, undo: bool) -> str:
        """Undo/redo of a Keep sets the head back only if the head in use is still the one that
        step left: the head is shared by all images, and a later Keep on another image must not
        be lost through an old step on this one (its nuclei go back; the head stays). Returns a
        note for the status line when the head stays."""
        (head, path), (expected, _) = (extra["head_before"], extra["head_after"]) if undo else (extra["head_after"], extra["head_before"])
        if self.pipeline is not None and self.pipeline.head is not expected:
            return f"; the head in use ({self.head_label.text()}) stays: it was kept or chosen later"
        self.set_head(path, head)
        return ""

    def undo(self, lyr=None):
        """Undo the last change to the points layer (any edit, the widget's or napari's)."""
        return self._undo_redo(lyr, True)

    def redo(self, lyr=None):
        return self._undo_redo(lyr, False)

    def _undo_redo(self, lyr, undo: bool):
        lyr = self._resolve(lyr)
        if lyr is None:
            return None
        h = self._begin_step(lyr)
        act = h.undo(lyr, self._apply_state) if undo else h.redo(lyr, self._apply_state)
        if act is None:
            return None
        note = self._step_head(act.extra, undo) if "head_before" in act.extra else ""
        self._next_nid(lyr)
        self._mark_dirty(lyr)
        self._sync_classes()
        self._set_status(f"{'Undid' if undo else 'Redid'} {act.label}{note}.")
        return act
