"""Retrain head: learn from the user's nuclei in the background, show before/after, keep or discard."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..geometry import rescale_points
from . import layer as L
from . import session
from .coords import rc_to_xy


def _with_classes_of(head, names, colors):
    """(names, colours): the layer's classes, then those of ``head`` the layer lacks, with the head's colours."""
    head_names = tuple(getattr(head, "class_names", None) or ())
    missing = [n for n in head_names if n not in names]
    if not missing:
        return tuple(names), tuple(colors)
    by_name = dict(zip(head_names, getattr(head, "class_colors", None) or ()))
    spare = L.palette(len(names) + len(missing))[len(names):]
    return tuple(names) + tuple(missing), tuple(colors) + tuple(tuple(by_name.get(n) or c) for n, c in zip(missing, spare))


class RetrainingMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def retrain(self):
        """Retrain the head on reviewed and edited nuclei (background); the user then keeps or discards it."""
        if self._worker is not None:
            return
        lyr = self.points_layer()
        image_layer = self.image_layer()
        if lyr is None or image_layer is None or not len(lyr.data):
            self._set_status("Run Detect & classify (or import points) on an image first.")
            return
        self._flush_moves()
        self._t_press = time.perf_counter()
        f = lyr.features
        edited, reviewed = L.flags(f, len(f))
        train = edited | reviewed
        if not train.any():
            self._set_status("Review or correct some nuclei first (1-9 sets a class, r confirms one).")
            return
        xy_all = rc_to_xy(lyr.data)
        # A point placed off the image has no pixels to describe it: it must not teach the head.
        inside = self.on_image(image_layer, xy_all)
        n_outside = int((train & ~inside).sum())
        open_mask = ~train & inside  # unedited, unreviewed, on the image: what a new head may reclassify
        train = train & inside
        if not train.any():
            self._set_status(f"All {n_outside} of your corrected nuclei lie outside the image; nothing to learn from.")
            return
        names = L.class_names(lyr)
        colors = L.class_colors(lyr)
        labels = L.class_ids(lyr)[train]
        nids = np.asarray(f["nid"], dtype=np.int64)
        open_idx = np.flatnonzero(open_mask)
        current = L.class_ids(lyr)[open_idx]
        mpp = float(self.mpp_spin.value())
        source = self._feature_source(image_layer)
        image_key = source["key"]
        project = self.project_dir
        token = L.token_of(lyr)

        def job():
            from ..retrain import retrain_head

            pipe = self._ensure_pipeline()
            t0 = time.perf_counter()
            feats, n_sampled = self._features_of(source, xy_all, inside, mpp, pipe)
            t_feat = time.perf_counter() - t0
            # the file is named by the encoder's registry name (the head inside records its versioned id)
            enc_name = getattr(pipe.encoder, "name", "")
            path = session.next_head_path(session.heads_dir(project), enc_name or getattr(pipe.encoder, "id", ""))
            # The head reads each nucleus with its neighbours: every nucleus on the image is context.
            on_image = np.flatnonzero(inside)
            row = np.full(len(xy_all), -1)
            row[on_image] = np.arange(len(on_image))
            x = pipe.head.inputs(feats[on_image], xy_all[on_image], mpp) if pipe.head is not None else feats[on_image]
            # Nuclei the head in use learned from (it was kept from an earlier retrain) are not held out
            # for it: both heads are scored on the others only. The new head remembers all of them.
            old_learned = dict((getattr(pipe.head, "metadata", None) or {}).get("learned_from") or {})
            seen = np.isin(nids[train], old_learned.get(image_key, []))
            elsewhere = [len(v) for k, v in old_learned.items() if k != image_key and v]  # other images' corrections it holds
            old_learned[image_key] = sorted({*old_learned.get(image_key, []), *nids[train].tolist()})
            # A class the head in use knows and this layer lacks (added, and kept, on another image) stays in the new head.
            names_h, colors_h = _with_classes_of(pipe.head, names, colors)
            res = retrain_head(pipe.head, x[row[train]], labels, names_h, colors_h, path, scored=~seen,
                               metadata={"image": image_layer.name, "learned_from": old_learned,
                                         **({"encoder": enc_name} if enc_name else {})})
            probs = np.asarray(res.head.predict_proba(x[row[open_idx]]), dtype=np.float32) if len(open_idx) else np.zeros((0, len(names)), np.float32)
            fit_info = getattr(res, "fit_info", None)
            if isinstance(fit_info, dict):
                fit_info["features_s"] = t_feat
                fit_info["points_sampled"] = n_sampled
                fit_info["n_learned_before"] = int(seen.sum())
                fit_info["learned_elsewhere"] = (int(sum(elsewhere)), len(elsewhere))
            return res, probs, n_sampled

        def done(result):
            res, probs, n_sampled = result
            new_ids = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
            changed = int((new_ids != current).sum())
            self._drop_pending_head()  # retrained again before answering: the earlier head was never kept
            self.pending_retrain = {
                "result": res, "token": token, "nids": nids[open_idx], "probs": probs, "changed": changed,
                "n_open": len(open_idx), "names": names,
            }
            self.timings["retrain_s"] = time.perf_counter() - self._t_press
            self.last_result = res
            self.last_summary = self._retrain_summary(res, changed, len(open_idx), n_sampled)
            if n_outside:
                self.last_summary += f"\nSkipped {n_outside} corrected nuclei outside the image."
            self.retrain_report.setText(self.last_summary)
            self._offer_keep_or_discard(self._new_head_worse(res))
            self.progress_bar.setValue(100)
            self._set_status("Keep the new head or discard it (nothing has changed yet).")

        self._start_worker(job, done, "Retraining the head", on_cancelled=lambda r: self._delete_head_files(r[0].path))

    def _feature_source(self, image_layer) -> dict:
        """What a worker needs to read features on ``image_layer`` (taken on the GUI thread)."""
        meta = dict(getattr(image_layer, "metadata", None) or {})
        return {"layer": image_layer, "data": image_layer.data, "multiscale": bool(getattr(image_layer, "multiscale", False)),
                "slide": meta.get("path") if meta.get("slide") else None,  # opened by the slide reader
                "key": self._image_key(image_layer)}

    def _features_of(self, source, xy_all, inside, mpp, pipe):
        """(features (N, D), how many were newly sampled) of the nuclei ``xy_all``, in the worker.

        From what Detect & classify kept; only nuclei on the image the encoder has not seen (added,
        moved) go through it. Rows off the image stay zero (nothing may learn from or reclassify them).
        """
        from ..io.images import as_rgb_uint8

        model_mpp = float(getattr(pipe.encoder, "mpp", 0.5) or 0.5)
        arr, fct = self._level_for(source["layer"], model_mpp, mpp) if source["multiscale"] else (source["data"], 1.0)
        key = (source["key"], getattr(pipe.encoder, "id", ""), round(mpp, 6), fct)
        feats, found = self.features_memo.get(key, xy_all)
        missing = np.flatnonzero(~found & inside)
        if len(missing) and source["slide"]:
            # A slide: read only the encoder windows around these nuclei, never a whole level.
            from ..wsi.slide_features import slide_features

            new = slide_features(pipe.encoder, source["slide"], xy_all[missing], mpp=mpp, progress=self._progress_cb)
        elif len(missing):
            image = as_rgb_uint8(np.asarray(arr))
            new = pipe.features_at(image, rescale_points(xy_all[missing], 1.0 / fct), mpp * fct, progress=self._progress_cb)
        if len(missing):
            self.features_memo.put(key, xy_all[missing], new)
            if feats is None:
                feats = np.zeros((len(xy_all), new.shape[1]), np.float32)
            feats[missing] = new
        if feats is None:  # nothing on the image: no features to read
            feats = np.zeros((len(xy_all), int(getattr(pipe.encoder, "feature_dim", 0) or 0)), np.float32)
        return feats, len(missing)

    @staticmethod
    def _retrain_summary(res, changed, n_open, n_sampled) -> str:
        per = getattr(res, "per_class", None) or {}
        n_ex = getattr(res, "n_examples", None)
        lines = [f"Learned from {n_ex} of your nuclei" + (f" ({', '.join(f'{k} {v}' for k, v in per.items())})." if per else ".")]
        n_other, n_images = (getattr(res, "fit_info", None) or {}).get("learned_elsewhere", (0, 0))
        if n_other:  # the corrections of other images reach the new head through the head in use
            lines.append(f"It updates the head in use, which learned from {n_other} of your nuclei on "
                         f"{n_images} other image{'s' if n_images > 1 else ''}: it keeps what it learned there.")
        b, a = getattr(res, "acc_before", None), getattr(res, "acc_after", None)
        n_eval = getattr(res, "n_eval", None)
        seen = (getattr(res, "fit_info", None) or {}).get("n_learned_before", 0)
        left_out = f" (not the {seen} nuclei the old head learned from)" if seen else ""
        if b is not None and a is not None:
            if hasattr(res, "n_eval"):  # both heads scored on the same held-out folds of your nuclei
                on = f" on the same {n_eval} held-out nuclei of yours" if n_eval else " on the same held-out folds"
                lines.append(f"Accuracy{on}{left_out}: old head {100 * b:.1f}% → new head {100 * a:.1f}%.")
            else:  # an older retrain_head: the two figures are not measured the same way
                lines.append(f"Accuracy on your nuclei: old head {100 * b:.1f}% (as is), new head {100 * a:.1f}% (cross-validated).")
            if RetrainingMixin._new_head_worse(res):
                lines.append("The new head is worse on your nuclei: discarding it is advised.")
        elif seen:
            lines.append(f"Too few nuclei the old head has not learned from (it learned from {seen}) to compare the heads yet.")
        else:
            lines.append("Too few examples to estimate accuracy yet.")
        lines.append(f"{changed} of {n_open} unedited, unreviewed nuclei would change class.")
        lines.append(f"Features: {n_sampled} nuclei newly sampled, the rest from the cache.")
        return "\n".join(lines)

    @staticmethod
    def _new_head_worse(res) -> bool:
        """The new head scored below the old one on the user's held-out nuclei."""
        b, a = getattr(res, "acc_before", None), getattr(res, "acc_after", None)
        return b is not None and a is not None and a < b

    def _offer_keep_or_discard(self, worse: bool):
        """Keep and Discard; a worse head is kept only "anyway", and Discard has the focus (Space, Enter)."""
        self.keep_btn.setText("Keep anyway" if worse else "Keep new head")
        self.keep_btn.setToolTip("The new head is worse on your held-out nuclei; Discard is advised" if worse else "")
        for b in (self.keep_btn, self.discard_btn):
            b.setVisible(True)
        self.discard_btn.setDefault(worse)
        if worse:
            self.discard_btn.setFocus()

    def answer_retrain(self, keep: bool):
        """Keep (apply the new head to unedited nuclei, undoable) or discard (nothing changes) the new head."""
        p, self.pending_retrain = self.pending_retrain, None
        self.keep_btn.setVisible(False)
        self.discard_btn.setVisible(False)
        if p is None:
            return
        res = p["result"]
        lyr = self._layer_by_token(p["token"])
        if not keep or lyr is None:
            self._delete_head_files(res.path)
            self.retrain_report.setText(self.retrain_report.text() + "\nDiscarded: the previous head stays.")
            self._set_status("New head discarded; your head and classes are unchanged.")
            return
        changed = self._apply_head(lyr, p["nids"], p["probs"], res.head, res.path, "retrain")
        self.retrain_report.setText(self.retrain_report.text() + f"\nKept: {changed} nuclei changed class.")
        self._set_status(f"New head {Path(res.path).name} in use; {changed} nuclei changed class (Undo reverts).")

    def _apply_head(self, lyr, nids, probs, head, path, label) -> int:
        """Use ``head`` (file ``path``, None: bundled) and give nuclei ``nids`` its ``probs`` (over its
        classes), except those edited or reviewed since: one undo step, which also restores the head
        before. Returns how many nuclei changed class."""
        from ..results import Detections

        self._begin_step(lyr)
        ids = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
        if tuple(head.class_names) != tuple(L.class_names(lyr)):  # e.g. the bundled head lacks a class the user added
            det = Detections(np.zeros((len(ids), 2)), np.zeros(len(ids)), ids, head.class_names, head.class_colors, probs)
            det = self._classes_onto_layer(lyr, det)
            ids, probs = det.class_ids, det.probs
        f = lyr.features
        pos = {int(n): i for i, n in enumerate(np.asarray(f["nid"], dtype=np.int64))}
        rows = np.array([pos.get(int(n), -1) for n in nids], dtype=np.int64)
        ok = rows >= 0
        if ok.any():
            edited, reviewed = L.flags(f, len(f))
            ok &= ~(edited | reviewed)[np.where(rows >= 0, rows, 0)]  # answered since: the user's word stands
        new_f, changed = L.with_predictions(f, rows[ok], ids[ok], probs[ok])
        before = (self.pipeline.head, self.head_path)
        self.set_head(path, head)
        self._write(lyr, features=new_f)
        self._record(lyr, label, extra={"head_before": before, "head_after": (head, None if path is None else str(path))})
        return changed

    def use_bundled_head(self):
        """Back to the head the plugin ships with: it reclassifies the unedited, unreviewed nuclei on the
        image (in the background; one undo step, which restores the head before). Edited and reviewed
        nuclei keep their classes."""
        from . import models

        if self._worker is not None or self.head_path is None:
            return
        lyr, image_layer = self.points_layer(), self.image_layer()
        token = L.token_of(lyr) if lyr is not None and image_layer is not None else None
        xy_all, inside, open_idx, nids, source = np.zeros((0, 2)), np.zeros(0, bool), np.zeros(0, np.int64), [], None
        if token is not None:
            self._flush_moves()
            edited, reviewed = L.flags(lyr.features, len(lyr.data))
            xy_all = rc_to_xy(lyr.data)
            inside = self.on_image(image_layer, xy_all)
            open_idx = np.flatnonzero(~(edited | reviewed) & inside)
            nids = np.asarray(lyr.features["nid"], dtype=np.int64)[open_idx]
            source = self._feature_source(image_layer)
        mpp = float(self.mpp_spin.value())
        encoder_name = self.encoder_name

        def job():
            pipe = self._ensure_pipeline()
            head = models.bundled_head(encoder_name, pipe.encoder)
            if head is None:
                raise DenucError(f"encoder {encoder_name or 'default'!r} has no bundled head; choose a head file (Models > Head)")
            if not len(open_idx):
                return head, np.zeros((0, head.num_classes), np.float32)
            feats, _ = self._features_of(source, xy_all, inside, mpp, pipe)
            on_image = np.flatnonzero(inside)  # every nucleus on the image is context for the head
            row = np.full(len(xy_all), -1)
            row[on_image] = np.arange(len(on_image))
            x = head.inputs(feats[on_image], xy_all[on_image], mpp)
            return head, np.asarray(head.predict_proba(x[row[open_idx]]), dtype=np.float32)

        def done(result):
            head, probs = result
            lyr = self._layer_by_token(token) if token is not None else None
            if lyr is None:
                self.set_head(None, head)
                self._set_status("Bundled head in use.")
                return
            changed = self._apply_head(lyr, nids, probs, head, None, "use bundled head")
            self.progress_bar.setValue(100)
            self._set_status(f"Bundled head in use; {changed} unedited nuclei changed class (Undo reverts).")

        self._start_worker(job, done, "Switching to the bundled head")

    def _drop_pending_head(self):
        """Delete the head waiting for Keep or Discard, if any (it was never in use)."""
        p, self.pending_retrain = self.pending_retrain, None
        if p is not None:
            self._delete_head_files(p["result"].path)

    @staticmethod
    def _delete_head_files(path):
        """Remove a head the user did not keep (weights, sidecar, prior sample)."""
        from ..io.naming import prior_path, sidecar_path

        for q in (Path(path), sidecar_path(path), prior_path(path)):
            with contextlib.suppress(OSError):
                q.unlink()
