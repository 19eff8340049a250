"""End to end with the real pipeline: sample -> detect & classify -> correct -> retrain -> export -> import."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.napari


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
    reason = _bundled_models_missing()
    if reason:
        pytest.skip(reason)
    from napari_denuc._reader import get_reader
    from napari_denuc.widget import layer as L
    from napari_denuc.widget._widget import DenucWidget

    viewer = make_napari_viewer()
    viewer.open_sample("napari-denuc", "brca_m2c_tile")
    w = DenucWidget(viewer)
    viewer.window.add_dock_widget(w)
    qtbot.waitUntil(lambda: w.pipeline is not None, timeout=60000)
    if w.pipeline.head is None:
        pytest.skip("the bundled lite head is not in the package yet")

    # detect & classify
    w.run_detection()
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=60000)
    lyr = w.points_layer()
    assert lyr is not None, w.status.text()
    n = len(lyr.data)
    assert n > 50, f"only {n} nuclei on the sample"
    names = L.class_names(lyr)
    assert len(names) >= 2
    assert all(f"prob_{c}" in lyr.features for c in names)

    # correct: relabel (dropdown button and number keys), add, delete
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    for k, name in enumerate(names):
        lyr.selected_data = set(order[k * 6 : (k + 1) * 6].tolist())
        if k < 9:
            w._key_handler(k)(lyr)
        else:
            w.set_class_of_selected(name)
    w.class_combo.setCurrentText(names[0])
    lyr.add([[5.0, 5.0], [6.0, 450.0]])
    lyr.selected_data = {int(order[-1])}
    lyr.remove_selected()
    f = lyr.features
    edited = f["source"].astype(str).to_numpy() == "edited"
    assert edited.sum() == 6 * len(names) + 2
    user_classes = f["class"].astype(str).to_numpy()[edited].copy()
    edited_xy = lyr.data[edited].copy()
    head_before = w.pipeline.head

    # retrain
    w.retrain()
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=60000)
    assert w.pipeline.head is not head_before, w.status.text()
    assert "cross-validated" in w.last_summary
    f = lyr.features
    now_edited = f["source"].astype(str).to_numpy() == "edited"
    np.testing.assert_array_equal(now_edited, edited)
    np.testing.assert_array_equal(f["class"].astype(str).to_numpy()[edited], user_classes)
    np.testing.assert_allclose(lyr.data[edited], edited_xy)
    image = viewer.layers["BRCA-M2C sample"].data
    xy = lyr.data[~edited][:, ::-1]
    expect = w.pipeline.head.predict(w.pipeline.features_at(image, xy, 0.5))
    np.testing.assert_array_equal(f["class"].cat.codes.to_numpy()[~edited], expect)

    # export GeoJSON, import it back (widget and napari reader), compare
    out = w.export_points(env / "nuclei.geojson")
    classes = f["class"].astype(str).to_numpy().copy()
    data = lyr.data.copy()
    reader = get_reader(str(out))
    (data2, kw2, _), = reader(str(out))
    np.testing.assert_allclose(data2, data, atol=1e-3)
    np.testing.assert_array_equal(kw2["features"]["class"].astype(str).to_numpy(), classes)
    lyr2 = w.import_points(out)
    np.testing.assert_allclose(lyr2.data, data, atol=1e-3)
    np.testing.assert_array_equal(lyr2.features["class"].astype(str).to_numpy(), classes)
