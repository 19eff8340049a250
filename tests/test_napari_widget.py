"""The dock widget on the user's path: Plugins > DeNuC, real mouse clicks and key presses.

The pipeline is the library's own ``Pipeline`` around a fake detector and encoder
(``napari_fakes``); the real models are covered by test_napari_e2e.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from qtpy.QtCore import Qt

pytestmark = [
    pytest.mark.napari,
    # the widget must use public napari API only (napari 0.10 removes private access)
    pytest.mark.filterwarnings("error:Private attribute access:FutureWarning"),
]

SAMPLE = ("napari-denuc", "brca_m2c_tile")
PLUGIN = ("napari-denuc", "DeNuC")


@pytest.fixture
def gt():
    from napari_denuc._sample_data import SAMPLE_LABELS
    from napari_denuc.data.brca_m2c import read_labels

    return read_labels(SAMPLE_LABELS)


@pytest.fixture
def sample_image():
    from napari_denuc._sample_data import make_sample_data

    return make_sample_data()[0][0]


@pytest.fixture
def env(tmp_path, monkeypatch, gt, sample_image):
    """DENUC_HOME in tmp, and the widget's pipeline factory builds the fake pipeline."""
    from napari_denuc.widget import _widget
    from napari_fakes import fake_head, fake_pipeline

    monkeypatch.setenv("DENUC_HOME", str(tmp_path / "home"))
    head = fake_head(gt[0], gt[1], sample_image)
    built = []

    def factory(detector=None, encoder=None, head_path=None, **kw):
        pipe = fake_pipeline(gt[0], gt[1], sample_image, head=head)
        built.append(pipe)
        return pipe

    monkeypatch.setattr(_widget, "make_pipeline", lambda detector=None, encoder=None, head=None: factory())
    return {"home": tmp_path / "home", "built": built, "tmp": tmp_path}


def open_widget(viewer, qtbot):
    """Plugins > DeNuC, as napari does it (the widget gets a PublicOnlyProxy viewer)."""
    _, w = viewer.window.add_plugin_dock_widget(*PLUGIN)
    qtbot.waitUntil(lambda: w.pipeline is not None and not w._loading, timeout=30000)
    return w


@pytest.fixture
def opened(make_napari_viewer, qtbot, env):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(*SAMPLE)
    w = open_widget(viewer, qtbot)
    return viewer, w


def detect(qtbot, w):
    qtbot.mouseClick(w.run_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=30000)
    lyr = w.points_layer()
    assert lyr is not None, w.status.text()
    return lyr


def classes(lyr):
    return lyr.features["class"].astype(str).to_numpy().copy()


def nearest(lyr, rc):
    return int(np.argmin(np.hypot(*(np.asarray(lyr.data) - np.asarray(rc)).T)))


def wait_saved(qtbot, w):
    qtbot.waitUntil(lambda: not w._dirty and not w._autosave_timer.isActive(), timeout=5000)


def saved_state(home):
    files = list((home / "corrections").glob("*.denuc.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


# ------------------------------------------------------------------------- the whole loop
def test_menu_path_end_to_end(make_napari_viewer, qtbot, env, gt):
    """detect -> add 2 -> delete 2 -> relabel 5 -> move 1 -> retrain -> export -> close -> reopen."""
    from napari_denuc.io.points import read_points
    from napari_fakes import User, empty_spots

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(*SAMPLE)
    w = open_widget(viewer, qtbot)
    user = User(viewer, qtbot)
    lyr = detect(qtbot, w)
    n0 = len(lyr.data)
    assert n0 > 200 and set(lyr.features["source"].astype(str)) == {"model"}

    # add 2 nuclei with the mouse (the current class: tumor)
    w.class_combo.setCurrentText("tumor")
    spots = empty_spots(gt[0], 2)
    for rc in spots:
        user.add_at(lyr, rc)
    assert len(lyr.data) == n0 + 2
    np.testing.assert_allclose(lyr.data[-2:], spots, atol=0.6)
    assert list(classes(lyr)[-2:]) == ["tumor", "tumor"]
    assert isinstance(lyr.features["class"].dtype, __import__("pandas").CategoricalDtype)

    # delete 2 model nuclei: click, Delete
    victims = [lyr.data[10].copy(), lyr.data[20].copy()]
    for rc in victims:
        user.select(lyr, rc)
        assert lyr.selected_data == {nearest(lyr, rc)}
        user.key(Qt.Key_Delete)
    assert len(lyr.data) == n0
    assert len(lyr.metadata["denuc"]["tombstones"]) == 2

    # relabel 5 with the number key 3 (stromal)
    targets = [lyr.data[i].copy() for i in (30, 40, 50, 60, 70)]
    for rc in targets:
        user.select(lyr, rc)
        user.key(Qt.Key_3)
    idx5 = [nearest(lyr, rc) for rc in targets]
    assert set(classes(lyr)[idx5]) == {"stromal"}
    assert set(lyr.features["source"].astype(str).to_numpy()[idx5]) == {"edited"}
    assert "stromal" in w.legend_checks and w.legend_checks["stromal"].text().startswith("3  stromal")

    # move 1 by dragging it 6 px right
    src = lyr.data[80].copy()
    user.select(lyr, src)
    user.drag(src, src + (0, 6))
    qtbot.wait(400)  # the move settles into one undo step
    moved = nearest(lyr, src + (0, 6))
    assert abs(lyr.data[moved][1] - (src[1] + 6)) < 1.0
    assert lyr.features["source"].iloc[moved] == "edited"

    # confirm 3 predicted nuclei of each class with the r key
    for name in ("lymphocyte", "tumor", "stromal"):
        f = lyr.features
        todo = np.flatnonzero((classes(lyr) == name) & ~f["reviewed"].to_numpy())[:3]
        for rc in [lyr.data[i].copy() for i in todo]:
            user.select(lyr, rc)
            user.key(Qt.Key_R)
    assert lyr.features["reviewed"].sum() == 8 + 9

    # retrain from the edited and reviewed nuclei, keep the new head
    head_before = w.pipeline.head
    qtbot.mouseClick(w.retrain_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=30000)
    assert w.pending_retrain is not None, w.status.text()
    assert "would change class" in w.retrain_report.text()
    assert w.keep_btn.isVisible()
    qtbot.mouseClick(w.keep_btn, Qt.LeftButton)
    assert w.pipeline.head is not head_before
    assert w.head_path.endswith("v001.safetensors")

    # export
    out = w.export_points(env["tmp"] / "nuclei.geojson")
    det = read_points(out)
    np.testing.assert_array_equal(np.array(det.class_names)[det.class_ids], classes(lyr))
    np.testing.assert_allclose(det.xy, lyr.data[:, ::-1], atol=1e-3)

    # autosave from the layer's own events; then close the viewer
    wait_saved(qtbot, w)
    state = saved_state(env["home"])
    expect_data = lyr.data.copy()
    expect_cls = classes(lyr)
    expect_src = lyr.features["source"].astype(str).to_numpy().copy()
    expect_rev = lyr.features["reviewed"].to_numpy().copy()
    assert state["class"] == list(expect_cls) and state["source"] == list(expect_src)
    assert len(state["tombstones"]) == 2 and state["head"] == w.head_path
    head_path = w.head_path
    viewer.close()

    # a new viewer: open the image, open the widget: everything is back
    viewer2 = make_napari_viewer(show=True)
    viewer2.open_sample(*SAMPLE)
    w2 = open_widget(viewer2, qtbot)
    lyr2 = w2.points_layer()
    assert lyr2 is not None, w2.status.text()
    np.testing.assert_allclose(lyr2.data, expect_data, atol=1e-3)
    np.testing.assert_array_equal(classes(lyr2), expect_cls)
    np.testing.assert_array_equal(lyr2.features["source"].astype(str).to_numpy(), expect_src)
    np.testing.assert_array_equal(lyr2.features["reviewed"].to_numpy(), expect_rev)
    assert len(lyr2.metadata["denuc"]["tombstones"]) == 2
    assert w2.head_path == head_path
    # and a new detection brings back neither the deleted nuclei nor loses the user's
    lyr2 = detect(qtbot, w2)
    for rc in victims:
        assert np.hypot(*(lyr2.data - rc).T).min() > 2.0
    edited = lyr2.features["source"].astype(str).to_numpy() == "edited"
    assert edited.sum() == (expect_src == "edited").sum()
