"""The dock widget with a fast fake pipeline (the real models are covered by test_napari_e2e.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.napari

SAMPLE = ("napari-denuc", "brca_m2c_tile")


@pytest.fixture
def gt():
    from napari_denuc._sample_data import SAMPLE_LABELS
    from napari_denuc.data.brca_m2c import read_labels

    return read_labels(SAMPLE_LABELS)


@pytest.fixture
def widget(make_napari_viewer, tmp_path, monkeypatch, gt):
    from napari_denuc.widget._widget import DenucWidget
    from napari_fakes import FakePipeline

    monkeypatch.setenv("DENUC_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    viewer.open_sample(*SAMPLE)
    w = DenucWidget(viewer, preload=False)
    w.pipeline = FakePipeline(*gt)
    viewer.window.add_dock_widget(w)
    return w


def run(qtbot, w, action="run_detection"):
    getattr(w, action)()
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=30000)


def test_widget_reads_image_and_mpp(widget):
    assert widget.image_combo.currentText() == "BRCA-M2C sample"
    assert widget.mpp_spin.value() == pytest.approx(0.5)
    assert "from the image" in widget.mpp_note.text()


def test_assumed_mpp_is_shown(make_napari_viewer, monkeypatch, tmp_path):
    from napari_denuc.widget._widget import DenucWidget

    monkeypatch.setenv("DENUC_HOME", str(tmp_path))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="plain")
    w = DenucWidget(viewer, preload=False)
    assert w.mpp_spin.value() == pytest.approx(0.5)
    assert "assumed" in w.mpp_note.text()


def test_detect_makes_coloured_points_layer(qtbot, widget, gt):
    run(qtbot, widget)
    lyr = widget.points_layer()
    assert lyr is not None and lyr.name == "BRCA-M2C sample nuclei"
    assert len(lyr.data) == len(gt[0])
    # napari (row, col) = library (y, x)
    np.testing.assert_allclose(lyr.data[:, ::-1], gt[0])
    f = lyr.features
    assert list(f["class"].cat.categories) == ["lymphocyte", "tumor", "stromal"]
    for col in ("score", "prob_lymphocyte", "prob_tumor", "prob_stromal", "source", "reviewed"):
        assert col in f.columns
    assert set(f["source"].astype(str)) == {"model"} and not f["reviewed"].any()
    colors = {n: np.array(c) / 255 for n, c in zip(widget.pipeline.head.class_names, widget.pipeline.head.class_colors)}
    for i in range(0, len(f), 37):
        np.testing.assert_allclose(lyr.face_color[i, :3], colors[str(f["class"].iloc[i])], atol=1e-6)
    counts = widget.legend.text()
    assert "lymphocyte" in counts and f"total {len(gt[0])}" in counts
    assert widget.timings["detect_to_layer_s"] > 0


def test_relabel_keys_and_undo(qtbot, widget):
    run(qtbot, widget)
    lyr = widget.points_layer()
    before = lyr.features["class"].astype(str).to_numpy().copy()
    lyr.selected_data = {0, 1, 2}
    widget._key_handler(2)(lyr)  # key "3" -> stromal
    f = lyr.features
    assert (f["class"].iloc[:3] == "stromal").all()
    assert (f["source"].iloc[:3] == "edited").all() and f["reviewed"].iloc[:3].all()
    np.testing.assert_allclose(lyr.face_color[0, :3], np.array((0, 120, 255)) / 255, atol=1e-6)
    assert "3" in {str(k) for k in lyr.keymap}  # number keys are bound on the layer
    widget.undo()
    np.testing.assert_array_equal(lyr.features["class"].astype(str).to_numpy(), before)
    assert (lyr.features["source"] == "model").all()
    widget.undo()  # undo the detection: the layer goes
    assert widget.points_layer() is None


def test_add_move_delete_are_edits(qtbot, widget):
    run(qtbot, widget)
    lyr = widget.points_layer()
    n = len(lyr.data)
    widget.class_combo.setCurrentText("tumor")
    lyr.add([[100.0, 120.0]])
    assert len(lyr.data) == n + 1
    row = lyr.features.iloc[-1]
    assert row["class"] == "tumor" and row["source"] == "edited" and row["reviewed"]
    np.testing.assert_allclose(lyr.face_color[-1, :3], np.array((230, 0, 0)) / 255, atol=1e-6)
    lyr.selected_data = {5}
    lyr._move({5}, lyr.data[5] + 3)
    lyr._drag_start = None
    assert lyr.features["source"].iloc[5] == "edited"
    lyr.selected_data = {7}
    lyr.remove_selected()
    assert len(lyr.data) == n
    assert f"total {n}" in widget.legend.text()


def test_retrain_reclassifies_unedited_keeps_edited(qtbot, widget, gt, tmp_path):
    run(qtbot, widget)
    lyr = widget.points_layer()
    xy, labels = gt
    # the user reviews a third of the nuclei and sets their true class
    label_like_gt(widget, lyr, labels, np.arange(0, len(xy), 3))
    # and forces two nuclei to a class that is surely "wrong" for the model
    lyr.selected_data = {1, 2}
    widget.set_class_of_selected("tumor")
    edited = lyr.features["source"].astype(str).to_numpy() == "edited"
    user_cls = lyr.features["class"].astype(str).to_numpy().copy()
    enc_calls = widget.pipeline.encoder.n_points
    head_before = widget.pipeline.head
    run(qtbot, widget, "retrain")
    n_after = widget.pipeline.encoder.n_points
    assert widget.pipeline.head is not head_before
    assert widget.head_path and widget.head_path.endswith("v001.safetensors")
    from pathlib import Path

    assert Path(widget.head_path).is_file() and Path(widget.head_path + ".json").is_file()
    assert Path(widget.head_path).parent == tmp_path / "home" / "heads"
    f = lyr.features
    np.testing.assert_array_equal(f["class"].astype(str).to_numpy()[edited], user_cls[edited])
    # unedited nuclei now carry the new head's prediction
    feats = widget.pipeline.features_at(widget.image_layer().data, xy[~edited], 0.5)
    pred = np.asarray(widget.pipeline.head.predict(feats))
    np.testing.assert_array_equal(f["class"].cat.codes.to_numpy()[~edited], pred)
    assert "cross-validated" in widget.last_summary and "Saved as head-fake-v001" in widget.last_summary
    # only the hand-added nucleus... none here: every training nucleus came from the feature memo
    assert n_after == enc_calls
    assert "0 nuclei newly sampled" in widget.last_summary
    assert widget.timings["retrain_s"] < 30
    # a second retrain makes a new version, never overwrites
    run(qtbot, widget, "retrain")
    assert widget.head_path.endswith("v002.safetensors")
    assert (tmp_path / "home" / "heads" / "head-fake-v001.safetensors").is_file()
    # undo the retrain: the previous head comes back
    widget.undo()
    assert widget.head_path.endswith("v001.safetensors")


def test_retrain_with_missing_class_explains(qtbot, widget):
    run(qtbot, widget)
    lyr = widget.points_layer()
    head = widget.pipeline.head
    lyr.selected_data = set(range(10))
    widget.set_class_of_selected("lymphocyte")
    widget.retrain()
    assert not widget.is_busy()
    assert "'tumor' has 0" in widget.status.text() and "'stromal' has 0" in widget.status.text()
    assert widget.pipeline.head is head


def label_like_gt(widget, lyr, labels, idx):
    for k, name in enumerate(("lymphocyte", "tumor", "stromal")):
        lyr.selected_data = set(idx[labels[idx] == k].tolist())
        widget.set_class_of_selected(name)


def test_failed_retrain_keeps_head(qtbot, widget, monkeypatch, gt):
    run(qtbot, widget)
    lyr = widget.points_layer()
    label_like_gt(widget, lyr, gt[1], np.arange(0, len(gt[1]), 4))
    classes = lyr.features["class"].astype(str).to_numpy().copy()
    head = widget.pipeline.head

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(head), "save", boom)
    run(qtbot, widget, "retrain")
    assert widget.pipeline.head is head
    assert "unchanged" in widget.status.text()
    np.testing.assert_array_equal(lyr.features["class"].astype(str).to_numpy(), classes)


def test_cancel_leaves_everything(qtbot, widget):
    widget.pipeline.slow_s = 3.0
    widget.run_detection()
    qtbot.wait(300)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.is_busy(), timeout=10000)
    assert widget.points_layer() is None
    assert "Cancelled" in widget.status.text()


def test_autosave_and_restore(qtbot, widget, tmp_path):
    run(qtbot, widget)
    lyr = widget.points_layer()
    lyr.selected_data = {3, 4}
    widget.set_class_of_selected("stromal")
    qtbot.waitUntil(lambda: not widget._autosave_timer.isActive(), timeout=5000)
    files = list((tmp_path / "home" / "corrections").glob("*.denuc.json"))
    assert len(files) == 1
    state = json.loads(files[0].read_text())
    assert state["source"][3] == "edited" and state["class"][4] == "stromal"
    n = len(lyr.data)
    viewer = widget.viewer
    viewer.layers.clear()
    viewer.open_sample(*SAMPLE)  # the same image again: corrections come back
    lyr2 = widget.points_layer()
    assert lyr2 is not None and len(lyr2.data) == n
    assert lyr2.features["source"].iloc[3] == "edited" and lyr2.features["class"].iloc[4] == "stromal"
    assert "Restored" in widget.status.text()


def test_rerun_keeps_user_points(qtbot, widget):
    run(qtbot, widget)
    lyr = widget.points_layer()
    lyr.add([[10.0, 10.0]])  # far from any nucleus
    n = len(lyr.data)
    run(qtbot, widget)
    assert len(widget.points_layer().data) == n
    assert (widget.points_layer().features["source"] == "edited").sum() == 1


def test_field_of_view_and_shapes_roi(qtbot, widget, gt):
    viewer = widget.viewer
    viewer.camera.center = (0, 100, 100)
    viewer.camera.zoom = 8
    widget.scope_combo.setCurrentText("Current field of view")
    run(qtbot, widget)
    n_fov = len(widget.points_layer().data)
    assert 0 < n_fov < len(gt[0])
    widget.undo()
    viewer.add_shapes([np.array([[0, 0], [0, 200], [200, 200], [200, 0]])], shape_type="polygon", name="roi")
    widget.scope_combo.setCurrentText("Inside Shapes ROI")
    run(qtbot, widget)
    xy = widget.points_layer().data[:, ::-1]
    assert len(xy) and (xy <= 200).all()
    expected = ((gt[0] >= 0) & (gt[0] <= 200)).all(1).sum()
    assert abs(len(xy) - expected) <= 2


def test_multiscale_uses_level_nearest_model_mpp(qtbot, make_napari_viewer, tmp_path, monkeypatch, gt):
    from napari_denuc._sample_data import make_sample_data
    from napari_denuc.widget._widget import DenucWidget
    from napari_fakes import FakePipeline

    monkeypatch.setenv("DENUC_HOME", str(tmp_path))
    img = make_sample_data()[0][0]
    up = np.repeat(np.repeat(img, 2, 0), 2, 1)  # "40x": 0.25 mpp, level 1 is the 20x image
    viewer = make_napari_viewer()
    viewer.add_image([up, img], rgb=True, multiscale=True, name="pyramid", metadata={"mpp": 0.25})
    w = DenucWidget(viewer, preload=False)
    w.pipeline = FakePipeline(*gt)
    arr, f = w._level_for(viewer.layers["pyramid"], 0.5, 0.25)
    assert f == 2 and arr.shape == img.shape
    run(qtbot, w)
    lyr = w.points_layer()
    np.testing.assert_allclose(lyr.data[:, ::-1], gt[0] * 2)  # full-resolution coordinates


def test_20k_points_stay_responsive(make_napari_viewer):
    from napari_denuc.results import Detections
    from napari_denuc.widget import layer as L

    rng = np.random.default_rng(0)
    n = 20000
    det = Detections(rng.random((n, 2)) * 8000, rng.random(n), rng.integers(0, 3, n), ("a", "b", "c"), probs=rng.random((n, 3)))
    viewer = make_napari_viewer()
    t = time.perf_counter()
    lyr = viewer.add_points(**L.layer_kwargs(det, "big"))
    t_add = time.perf_counter() - t
    t = time.perf_counter()
    lyr.selected_data = set(range(0, n, 2))
    L.set_class(lyr, lyr.selected_data, "c")
    t_relabel = time.perf_counter() - t
    assert (lyr.features["class"].iloc[::2] == "c").all()
    np.testing.assert_allclose(lyr.face_color[::2, :3], np.tile(np.array((0, 120, 255)) / 255, (n // 2, 1)), atol=1e-6)
    assert t_add < 5 and t_relabel < 2, (t_add, t_relabel)
