"""End to end with the real pipeline, opened from the Plugins menu: detect -> correct -> retrain -> keep -> export -> import."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.napari, pytest.mark.filterwarnings("error:Private attribute access:FutureWarning")]


def _bundled_models_missing() -> str | None:
    from napari_denuc.detection.checkpoint import bundled_detector_path

    if not bundled_detector_path().is_file():
        return f"the bundled detector {bundled_detector_path().name} is not in the package yet"
    return None


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DENUC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DENUC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DENUC_ENCODER", "lite")  # offline and fast; uni2-h is tested by its own module
    return tmp_path


def test_end_to_end(qtbot, make_napari_viewer, env):
    """Plugins > DeNuC with the real models: detect, correct with keys and the mouse, retrain, keep, export, import."""
    reason = _bundled_models_missing()
    if reason:
        pytest.skip(reason)
    from napari_fakes import User
    from qtpy.QtCore import Qt

    from napari_denuc._reader import get_reader
    from napari_denuc.widget import layer as L

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-denuc", "brca_m2c_tile")
    _, w = viewer.window.add_plugin_dock_widget("napari-denuc", "DeNuC")
    qtbot.waitUntil(lambda: w.pipeline is not None and not w._loading, timeout=120000)
    if w.pipeline.head is None:
        pytest.skip("the bundled lite head is not in the package yet")
    user = User(viewer, qtbot)

    # detect & classify
    qtbot.mouseClick(w.run_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    lyr = w.points_layer()
    assert lyr is not None, w.status.text()
    n = len(lyr.data)
    assert n > 50, f"only {n} nuclei on the sample"
    names = L.class_names(lyr)
    assert len(names) >= 2 and all(f"prob_{c}" in lyr.features for c in names)

    # correct: number keys on clicked nuclei, one added with the mouse, one deleted with Delete
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    for k, name in enumerate(names[:9]):
        for i in order[k * 4 : (k + 1) * 4]:
            user.select(lyr, lyr.data[i].copy())
            user.key(getattr(Qt, f"Key_{k + 1}"))
    w.class_combo.setCurrentText(names[0])
    user.add_at(lyr, (5.0, 5.0))
    user.select(lyr, lyr.data[order[-1]].copy())
    user.key(Qt.Key_Delete)
    f = lyr.features
    edited = f["source"].astype(str).to_numpy() == "edited"
    assert edited.sum() == 4 * min(len(names), 9) + 1
    user_classes = f["class"].astype(str).to_numpy()[edited].copy()
    head_before = w.pipeline.head

    # retrain, see the report, keep
    qtbot.mouseClick(w.retrain_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    assert w.pending_retrain is not None, w.status.text()
    assert "would change class" in w.retrain_report.text()
    qtbot.mouseClick(w.keep_btn, Qt.LeftButton)
    assert w.pipeline.head is not head_before
    f = lyr.features
    np.testing.assert_array_equal(f["source"].astype(str).to_numpy() == "edited", edited)
    np.testing.assert_array_equal(f["class"].astype(str).to_numpy()[edited], user_classes)
    open_rows = ~(edited | f["reviewed"].to_numpy())
    image = viewer.layers["BRCA-M2C sample"].data
    head, xy = w.pipeline.head, lyr.data[:, ::-1]
    expect = head.predict(head.inputs(w.pipeline.features_at(image, xy, 0.5), xy, 0.5))  # all nuclei are each other's context
    np.testing.assert_array_equal(f["class"].cat.codes.to_numpy()[open_rows], expect[open_rows])

    # export GeoJSON, read it back (napari reader and the widget's merge import), compare
    out = w.export_points(env / "nuclei.geojson")
    classes = f["class"].astype(str).to_numpy().copy()
    data = lyr.data.copy()
    (data2, kw2, _), = get_reader(str(out))(str(out))
    np.testing.assert_allclose(data2, data, atol=1e-3)
    np.testing.assert_array_equal(kw2["features"]["class"].astype(str).to_numpy(), classes)
    w.import_points(out, mode="replace")
    np.testing.assert_allclose(lyr.data, data, atol=1e-3)
    np.testing.assert_array_equal(lyr.features["class"].astype(str).to_numpy(), classes)
