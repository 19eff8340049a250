"""Undo/redo diffs and the pure edit logic of the widget, on real napari Points layers (no viewer).

The property test drives random sequences of the widget's actions through ``History`` and
checks that every undo gives back exactly the state before that action (so no other nucleus
moves, changes class or loses a flag) and that redo gives back exactly the state after it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_denuc.results import Detections
from napari_denuc.widget import edits as E
from napari_denuc.widget import layer as L
from napari_denuc.widget.history import History

NAMES = ("lymphocyte", "tumor", "stromal")


def _det(n, seed=0, names=NAMES, scores=None):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(len(names)), n).astype(np.float32)
    return Detections(rng.uniform(0, 200, (n, 2)), rng.uniform(0.3, 1, n) if scores is None else scores,
                      p.argmax(1), names, probs=p)


def _layer(n=30, seed=0):
    from napari.layers import Points

    kw = L.layer_kwargs(_det(n, seed), "nuclei", mpp=0.5)
    data = kw.pop("data")
    return Points(data, **kw)


def _state(layer):
    return (np.array(layer.data, copy=True), layer.features.copy(deep=True),
            {k: list(v) if isinstance(v, list) else v for k, v in layer.metadata["denuc"].items() if k != "token"})


def _assert_state(layer, state):
    data, feats, meta = state
    np.testing.assert_array_equal(np.asarray(layer.data), data)
    pd.testing.assert_frame_equal(layer.features.reset_index(drop=True), feats.reset_index(drop=True))
    now = {k: v for k, v in layer.metadata["denuc"].items() if k != "token"}
    assert now == meta


class Sim:
    """The widget's actions, as the widget performs them, without Qt."""

    def __init__(self, layer):
        self.layer = layer
        self.next_nid = int(layer.features["nid"].max()) + 1
        self.h = History(layer)

    def names(self):
        return list(L.class_names(self.layer))

    def write(self, data=None, features=None):
        if data is not None:
            self.layer.data = data
        if features is not None:
            self.layer.features = features

    def normalise(self):
        f, self.next_nid, changed = L.recategorise(self.layer.features, self.names(), self.next_nid)
        if changed:
            self.layer.features = f

    def act(self, kind, r):
        lyr, n = self.layer, len(self.layer.data)
        if kind == "add":
            lyr.add([[r.uniform(0, 200), r.uniform(0, 200)]])
            self.normalise()
        elif kind == "delete" and n > 1:
            lyr.selected_data = {int(r.integers(n))}
            lyr.remove_selected()
            self.normalise()
        elif kind == "move" and n:
            i = int(r.integers(n))
            d = np.array(lyr.data, copy=True)
            d[i] += r.normal(0, 3, 2)
            self.write(data=d, features=L.with_flags(lyr.features, [i], edited=True))
        elif kind == "relabel" and n:
            idx = r.choice(n, size=min(n, 3), replace=False)
            self.write(features=L.with_class(lyr.features, idx, self.names()[int(r.integers(len(self.names())))]))
        elif kind == "review" and n:
            self.write(features=L.with_flags(lyr.features, r.choice(n, size=min(n, 2), replace=False), reviewed=True))
        elif kind == "detect":
            det = E.to_classes(_det(20, int(r.integers(1000))), self.names(), ()) if set(NAMES) <= set(self.names()) else None
            if det is not None:
                region = (50.0, 50.0, 150.0, 150.0) if r.random() < 0.5 else None
                d, f, self.next_nid, _ = E.merge_detections(lyr.data, lyr.features, det, region=region, radius_px=3.0,
                                                            tombstones=lyr.metadata["denuc"]["tombstones"], next_nid=self.next_nid)
                self.write(d, f)
        elif kind == "import":
            det = E.to_classes(_det(10, int(r.integers(1000))), self.names(), ())
            mode = "merge" if r.random() < 0.6 else "replace"
            d, f, self.next_nid, _, _ = E.import_table(lyr.data, lyr.features, det, mode, radius_px=3.0, next_nid=self.next_nid,
                                                       reviewed=r.random(10) < 0.3)
            self.write(d, f)
        elif kind == "retrain" and n:
            k = len(self.names())
            idx = np.flatnonzero(~(L.flags(lyr.features, n)[0] | L.flags(lyr.features, n)[1]))
            p = r.dirichlet(np.ones(k), len(idx)).astype(np.float32)
            f, _ = L.with_predictions(lyr.features, idx, p.argmax(1), p)
            self.write(features=f)
        elif kind == "add_class":
            name = f"class{len(self.names())}"
            meta = lyr.metadata["denuc"]
            meta["class_names"] = [*self.names(), name]
            meta["class_colors"] = [*meta["class_colors"], [1, 2, 3]]
            self.write(features=E.with_new_class(lyr.features, name))
        elif kind == "tombstone" and n > 1:  # delete a model nucleus the way the widget does: with a tombstone
            i = int(r.integers(n))
            meta = lyr.metadata["denuc"]
            meta["tombstones"] = [*meta["tombstones"], np.asarray(lyr.data[i])[::-1].round(3).tolist()]
            lyr.selected_data = {i}
            lyr.remove_selected()
        return self.h.record(lyr, kind)


ACTIONS = ["add", "delete", "move", "relabel", "review", "detect", "import", "retrain", "add_class", "tombstone"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=12), st.integers(0, 10_000))
def test_undo_redo_restore_exact_states(actions, seed):
    r = np.random.default_rng(seed)
    sim = Sim(_layer(25, seed % 7))
    states = [_state(sim.layer)]
    for kind in actions:
        if sim.act(kind, r) is not None:
            states.append(_state(sim.layer))
    assert len(sim.h.undo_stack) == len(states) - 1
    for k in range(len(states) - 1, 0, -1):
        sim.h.undo(sim.layer)
        _assert_state(sim.layer, states[k - 1])
    assert sim.h.undo(sim.layer) is None
    for k in range(1, len(states)):
        sim.h.redo(sim.layer)
        _assert_state(sim.layer, states[k])


def test_undo_relabel_keeps_later_moves_and_adds():
    """Issue 8, item 4: undoing an earlier relabel must not revert later work."""
    sim = Sim(_layer(20))
    lyr = sim.layer
    r = np.random.default_rng(0)
    sim.write(features=L.with_class(lyr.features, [0, 1], "stromal"))
    sim.h.record(lyr, "relabel")
    sim.act("move", r)
    sim.act("add", r)
    after_add = _state(lyr)
    # undo the add, the move, then redo both: the relabel never reverts
    sim.h.undo(lyr)
    sim.h.undo(lyr)
    assert list(lyr.features["class"].astype(str)[:2]) == ["stromal", "stromal"]
    sim.h.redo(lyr)
    sim.h.redo(lyr)
    _assert_state(lyr, after_add)


def test_diff_stores_only_changed_rows():
    sim = Sim(_layer(500))
    lyr = sim.layer
    sim.write(features=L.with_class(lyr.features, [3, 4], "tumor"))
    act = sim.h.record(lyr, "relabel")
    assert act.n_rows <= 4  # 2 rows before + 2 after, not a 500-row snapshot


def test_recategorise_restores_categorical_and_ids():
    lyr = _layer(5)
    lyr.feature_defaults = L.feature_defaults(NAMES, "tumor")
    lyr.add([[1.0, 1.0]])
    lyr.add([[2.0, 2.0]])  # napari turns the categorical column into strings here
    f, nxt, changed = L.recategorise(lyr.features, NAMES, 5)
    assert changed and isinstance(f["class"].dtype, pd.CategoricalDtype)
    assert list(f["class"].cat.categories) == list(NAMES)
    assert list(f["class"].astype(str)[-2:]) == ["tumor", "tumor"]
    assert list(f["nid"]) == [0, 1, 2, 3, 4, 5, 6] and nxt == 7
    assert list(f["source"].astype(str)[-2:]) == ["edited", "edited"]
    # a pasted duplicate id gets a fresh one
    f2 = pd.concat([f, f.iloc[[1]]], ignore_index=True)
    f3, nxt, _ = L.recategorise(f2, NAMES, nxt)
    assert len(set(f3["nid"])) == len(f3) and f3["nid"].iloc[-1] == 7


def test_merge_never_replaces_user_nuclei_or_revives_tombstones():
    lyr = _layer(0)
    det = _det(40, 1)
    d, f, nxt, _ = E.merge_detections(lyr.data, lyr.features, det, radius_px=3.0, next_nid=0)
    f = L.with_class(f, [0], "stromal")  # edited
    f = L.with_flags(f, [1], reviewed=True)
    tomb = [det.xy[2].tolist()]
    d2, f2, _, kept = E.merge_detections(np.delete(d, 2, 0), f.drop(index=2).reset_index(drop=True),
                                         _det(40, 1), radius_px=3.0, tombstones=tomb, next_nid=nxt)
    xy2 = d2[:, ::-1]
    assert kept == 2
    assert np.hypot(*(xy2 - det.xy[2]).T).min() > 3.0  # the deleted nucleus stays deleted
    assert f2["class"].iloc[0] == "stromal" and f2["source"].iloc[0] == "edited" and f2["reviewed"].iloc[1]
    assert len(d2) == 39
    # the unchanged model nuclei kept their rows and ids
    assert set(f2["nid"]) == set(f["nid"]) - {f["nid"].iloc[2]}


def test_import_merge_keeps_flags_and_user_nuclei():
    lyr = _layer(0)
    d, f, nxt, _ = E.merge_detections(lyr.data, lyr.features, _det(10, 2), radius_px=3.0, next_nid=0)
    f = L.with_class(f, [0], "tumor")
    imp = _det(10, 2)  # the same positions
    rev = np.array([True] + [False] * 9)
    src = np.array(["edited"] + ["model"] * 9, dtype=object)
    d2, f2, _, added, skipped = E.import_table(d, f, imp, "merge", radius_px=3.0, next_nid=nxt, source=src, reviewed=rev)
    assert skipped == 1 and added == 9 and len(d2) == 10
    assert f2["class"].iloc[0] == "tumor"  # the user's nucleus stands
    _, f3, _, added, _ = E.import_table(d, f, imp, "replace", radius_px=3.0, next_nid=nxt, source=src, reviewed=rev)
    assert added == 10 and list(f3["reviewed"]) == list(rev) and list(f3["source"].astype(str)) == list(src)


def test_review_order_is_least_confident_first_and_filters():
    det = Detections(np.arange(8).reshape(4, 2), np.ones(4), [0, 1, 1, 2], NAMES,
                     probs=[[0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.3, 0.35, 0.35], [0.2, 0.2, 0.6]])
    f = L.make_features(det)
    i, m = E.next_to_review(f, NAMES)
    assert i == 2 and m == pytest.approx(0.0)
    f = L.with_flags(f, [2], reviewed=True)
    assert E.next_to_review(f, NAMES)[0] == 0
    assert E.next_to_review(f, NAMES, "stromal")[0] == 3
    f = L.with_flags(f, [0, 1, 3], reviewed=True)
    assert E.next_to_review(f, NAMES) == (None, None)


def test_palette_is_colour_blind_safe_and_clear_of_selection_blue():
    import colorsys

    cols = L.display_colors(NAMES, ())

    def hue(c):
        return 360 * colorsys.rgb_to_hsv(*(np.array(c) / 255))[0]

    sel = hue((0, 153, 255))  # napari's selection highlight, (0, 0.6, 1)
    gaps = [min(abs(hue(c) - sel), 360 - abs(hue(c) - sel)) for c in cols]
    assert min(gaps) > 30 and gaps[2] > 90, gaps  # stromal (yellow) is nowhere near it
    assert cols == L.PALETTE[:3]
    mine = ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert L.display_colors(NAMES, mine) == mine  # the user's colours win


def test_rethreshold_of_cached_candidates_equals_detect_at_higher_tau():
    """The claim the threshold control rests on, with the bundled detector on the sample tile:
    greedy NMS output at a low tau, filtered at a higher tau, is NMS at the higher tau."""
    from napari_denuc._sample_data import make_sample_data
    from napari_denuc.detection.checkpoint import bundled_detector_path, load_detector

    if not bundled_detector_path().is_file():
        pytest.skip("no bundled detector")
    det = load_detector()
    image = make_sample_data()[0][0][:512, :512]
    xy_lo, s_lo = det.detect(image, 0.5, tau=0.3)
    for tau in (0.4, det.tau, 0.7):
        xy_hi, s_hi = det.detect(image, 0.5, tau=tau)
        keep = s_lo > tau
        assert len(xy_hi) > 20
        np.testing.assert_array_equal(np.sort(xy_lo[keep], 0), np.sort(xy_hi, 0))
        np.testing.assert_array_equal(np.sort(s_lo[keep]), np.sort(s_hi))
    assert len(xy_lo) > len(det.detect(image, 0.5, tau=0.7)[0])  # the floor really holds more candidates


def test_cached_candidates_take_a_later_head_of_the_same_encoder_only():
    """The threshold path classifies cached candidates with the head kept since the run (its
    classes too), but not with a head for another encoder: the cached features are not its input."""
    from napari_denuc.head import LinearHead

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 8)).astype(np.float32)
    run_head = LinearHead(8, NAMES, encoder_id="enc-a")
    c = E.Candidates(_det(40), feats, 0.3, head=run_head)
    kept = LinearHead(8, (*NAMES, "plasma"), encoder_id="enc-a")
    kept.fit(feats, np.arange(40) % 4, epochs=30)
    det, _ = c.with_head(kept).select(0.5)
    assert det.class_names == kept.class_names
    np.testing.assert_array_equal(det.class_ids, kept.predict(kept.inputs(feats[c.det.scores > 0.5], det.xy, 0.5)))
    assert c.with_head(LinearHead(16, NAMES, encoder_id="enc-b")) is c


def test_any_file_source_text_maps_onto_model_or_edited():
    det = _det(4)
    f = L.make_features(det, source=np.array(["model", "user", "imported", "edited"], dtype=object))
    assert list(f["source"].astype(str)) == ["model", "edited", "edited", "edited"]
    assert not f["source"].isna().any()


def test_pipeline_run_return_features_matches_features_at():
    """``Pipeline.run(return_features=True)``: the widget's detection path, row for row (RGBA input too)."""
    from napari_denuc._sample_data import SAMPLE_LABELS, make_sample_data
    from napari_denuc.data.brca_m2c import read_labels
    from napari_fakes import fake_pipeline

    image = make_sample_data()[0][0]
    xy, labels = read_labels(SAMPLE_LABELS)
    pipe = fake_pipeline(xy, labels, image)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], 2)
    det, feats = pipe.run(rgba, 0.5, roi=(100, 100, 600, 500), return_features=True)
    plain = pipe.run(image, 0.5, roi=(100, 100, 600, 500))
    np.testing.assert_array_equal(det.xy, plain.xy)
    np.testing.assert_array_equal(det.class_ids, plain.class_ids)
    assert feats.shape == (len(det), 8)
    np.testing.assert_allclose(feats, pipe.features_at(image[100:500, 100:600], det.xy - (100, 100), 0.5))
    np.testing.assert_allclose(det.probs, pipe.head.predict_proba(feats), rtol=1e-6)
