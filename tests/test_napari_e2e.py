"""End to end with the real pipeline, opened from the Plugins menu: detect -> correct -> retrain -> keep -> export -> import."""

from __future__ import annotations

from pathlib import Path

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

    # back to the bundled head in one click: it reclassifies the unedited, unreviewed nuclei only
    from napari_denuc.head import LinearHead
    from napari_denuc.pipeline import bundled_head_path

    assert w.bundled_btn.isVisible()
    qtbot.mouseClick(w.bundled_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    assert w.head_path is None, w.status.text()
    shipped = LinearHead.load(bundled_head_path("lite"), encoder=w.pipeline.encoder)
    np.testing.assert_array_equal(w.pipeline.head.state_tensors()["weight"], shipped.state_tensors()["weight"])
    f = lyr.features
    mine = (f["source"].astype(str) == "edited").to_numpy() | f["reviewed"].to_numpy()
    xy = lyr.data[:, ::-1]
    expect = shipped.predict(shipped.inputs(w.pipeline.features_at(image, xy, 0.5), xy, 0.5))
    np.testing.assert_array_equal(f["class"].cat.codes.to_numpy()[~mine], expect[~mine])
    np.testing.assert_array_equal(f["class"].astype(str).to_numpy()[mine], classes[mine])


MONUSEG_TIF = "/work/shared/data/monuseg_subset/TCGA-21-5784-01Z-00-DX1.tif"


def _tiff_like_monuseg(folder):
    """A MoNuSeg tile (0.2527 µm/px in its TIFF tags) copied to a writable folder, else the sample
    upsampled to 0.25 µm/px and written with the same kind of tags (resolution unit centimetre)."""
    import shutil
    from pathlib import Path

    import tifffile

    out = folder / "monuseg tile.tif"
    if Path(MONUSEG_TIF).is_file():
        shutil.copy(MONUSEG_TIF, out)
        return out, 0.2527
    from napari_denuc._sample_data import make_sample_data

    up = np.repeat(np.repeat(make_sample_data()[0][0], 2, 0), 2, 1)
    tifffile.imwrite(out, up, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    return out, 0.25


def test_first_hour_with_own_files(qtbot, make_napari_viewer, env, monkeypatch):
    """A pathologist's own files through Plugins > DeNuC with the real models: a PNG (no mpp), a
    TIFF with mpp tags, a pyramidal slide; threshold keys, Fit to view, undo/redo keys, retrain
    and keep, Export… to QuPath GeoJSON, close napari, next day: everything back, run on the view."""
    reason = _bundled_models_missing()
    if reason:
        pytest.skip(reason)
    import json

    from napari_fakes import User
    from PIL import Image
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFileDialog, QPushButton

    from napari_denuc._sample_data import make_sample_data
    from napari_denuc.widget import layer as L

    png = env / "case 7.png"
    Image.fromarray(make_sample_data()[0][0]).save(png)  # a BRCA-M2C tile as the user's PNG: no resolution
    viewer = make_napari_viewer(show=True)
    viewer.open(str(png))
    _, w = viewer.window.add_plugin_dock_widget("napari-denuc", "DeNuC")
    qtbot.waitUntil(lambda: w.pipeline is not None and not w._loading, timeout=120000)
    if w.pipeline.head is None:
        pytest.skip("the bundled head is not in the package yet")
    assert "assumed" in w.mpp_note.text() and w.mpp_spin.value() == pytest.approx(0.5)
    user = User(viewer, qtbot)
    qtbot.mouseClick(w.run_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    lyr = w.points_layer()
    assert lyr is not None and lyr.name == "case 7 nuclei", w.status.text()
    token = L.token_of(lyr)
    cands = w._candidates[token]

    # τ with the arrow keys: the nuclei follow at once, the box shows the τ they are at
    tau0 = round(w.tau_spin.value(), 2)
    w.tau_spin.setFocus()
    qtbot.keyClick(w.tau_spin, Qt.Key_Down)
    qtbot.keyClick(w.tau_spin, Qt.Key_Down)
    assert w.tau_spin.value() == pytest.approx(tau0 - 0.1)
    assert len(lyr.data) == cands.count(round(tau0 - 0.1, 2))

    # correct with the mouse and keys: relabel (key 2), add (current class), delete (Delete key)
    names = L.class_names(lyr)
    relabel = lyr.data[3].copy()
    user.select(lyr, relabel)
    user.key(Qt.Key_2)
    w.class_combo.setCurrentText(names[0])
    user.add_at(lyr, (6.0, 6.0))
    user.select(lyr, lyr.data[10].copy())
    user.key(Qt.Key_Delete)
    n_edit = int((lyr.features["source"].astype(str) == "edited").sum())
    assert n_edit == 2 and len(lyr.metadata["denuc"]["tombstones"]) == 1
    # undo / redo with the keys: the delete comes and goes
    n = len(lyr.data)
    user.key(Qt.Key_Z, Qt.ControlModifier)
    assert len(lyr.data) == n + 1
    user.key(Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    assert len(lyr.data) == n

    # Fit to view over the whole tile (corrected above): τ moves to the best fit or stays, with a reason
    viewer.reset_view()
    qtbot.wait(50)
    qtbot.mouseClick(w.fit_tau_btn, Qt.LeftButton)
    assert w.status.text().startswith("τ "), w.status.text()
    tau_fit = round(w.tau_spin.value(), 2)
    assert w.tau_count.text().startswith(f"{cands.count(tau_fit)} kept")
    model = (lyr.features["source"].astype(str) == "model").to_numpy()
    assert (lyr.features["score"].to_numpy()[model] > tau_fit).all()  # re-thresholded at the fitted τ

    # retrain, see before/after, keep
    qtbot.mouseClick(w.retrain_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    assert w.pending_retrain is not None and "would change class" in w.retrain_report.text(), w.status.text()
    qtbot.mouseClick(w.keep_btn, Qt.LeftButton)
    head_path = w.head_path
    assert head_path and Path(head_path).is_file()
    # named by the encoder's registry name, which its card records (denuc-predict --head finds the encoder)
    from napari_denuc.cli.common import encoder_for

    assert Path(head_path).name == f"head-{w.pipeline.encoder.name}-v001.safetensors" and w.pipeline.encoder.name
    assert encoder_for(None, head_path) == w.pipeline.encoder.name

    # Export… (the button and its file dialog) to QuPath GeoJSON; check it as QuPath reads it
    out = env / "case 7.geojson"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(env / "case 7"), "QuPath GeoJSON (*.geojson)")))
    export = next(b for b in w.findChildren(QPushButton) if b.text() == "Export…")
    qtbot.mouseClick(export, Qt.LeftButton)
    gj = json.loads(out.read_text())  # the name typed without a suffix got the chosen format's
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(lyr.data)
    assert {f["geometry"]["type"] for f in gj["features"]} == {"Point"}
    assert {f["properties"]["classification"]["name"] for f in gj["features"]} <= set(names)
    xy = np.array([f["geometry"]["coordinates"] for f in gj["features"]])
    np.testing.assert_allclose(np.sort(xy, 0), np.sort(lyr.data[:, ::-1] + 0.5, 0), atol=1e-3)  # QuPath: pixel centres at +0.5

    # the last edit, then napari closes at once (no time for the debounced autosave)
    user.select(lyr, lyr.data[20].copy())
    user.key(Qt.Key_1)
    data, cls = lyr.data.copy(), lyr.features["class"].astype(str).to_numpy().copy()
    viewer.close()
    assert (env / "case 7.png.denuc.json").is_file()  # next to the user's image

    # the next day: same file, the widget from the menu: nuclei, classes, τ and head are back
    viewer = make_napari_viewer(show=True)
    viewer.open(str(png))
    _, w = viewer.window.add_plugin_dock_widget("napari-denuc", "DeNuC")
    qtbot.waitUntil(lambda: w.pipeline is not None and not w._loading, timeout=120000)
    lyr = w.points_layer()
    assert lyr is not None and w.status.text().startswith("Restored"), w.status.text()
    np.testing.assert_allclose(lyr.data, data, atol=1e-3)
    np.testing.assert_array_equal(lyr.features["class"].astype(str).to_numpy(), cls)
    assert w.tau_spin.value() == pytest.approx(tau_fit) and w.head_path == head_path
    # run on the field of view only: the view's model nuclei are re-detected, the user's stay
    user = User(viewer, qtbot)
    user.look_at((500.0, 500.0), zoom=3.0)
    w.scope_combo.setCurrentText("Current field of view")
    qtbot.mouseClick(w.run_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    assert "Kept your" in w.status.text() and "1 deleted nuclei stay deleted" in w.status.text(), w.status.text()
    region = w._candidates[L.token_of(lyr)].region
    assert region is not None and region[2] - region[0] < 1000
    assert (lyr.features["source"].astype(str) == "edited").sum() == n_edit + 1

    # a second image in the same session: a TIFF whose tags give the resolution
    n_first = len(lyr.data)
    tif, mpp = _tiff_like_monuseg(env)
    viewer.open(str(tif))
    assert w.image_combo.currentText() == "monuseg tile" and w.mpp_spin.value() == pytest.approx(mpp, abs=1e-4)
    assert w.mpp_note.text() == "from the image"
    w.scope_combo.setCurrentText("Whole image")
    qtbot.mouseClick(w.run_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    lyr2 = w.points_layer()
    assert lyr2 is not None and lyr2.name == "monuseg tile nuclei" and len(lyr2.data) > 50, w.status.text()
    assert L.token_of(lyr2) != L.token_of(lyr) and len(lyr.data) == n_first  # the first image's nuclei untouched

    # and a pyramidal slide, opened with the plugin's reader (napari asks which reader; the user picks DeNuC)
    from napari_denuc.wsi.synthetic import make_test_slide

    slide = env / "slide.tif"
    make_test_slide(slide, 1024, mpp=0.25, seed=2)
    viewer.open(str(slide), plugin="napari-denuc")
    assert w.image_combo.currentText() == viewer.layers[-1].name and viewer.layers[-1].multiscale
    assert w.mpp_spin.value() == pytest.approx(0.25)
    qtbot.mouseClick(w.run_btn, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120000)
    lyr3 = w.points_layer()
    assert lyr3 is not None and len(lyr3.data) > 10, w.status.text()
    assert (lyr3.data >= -0.5).all() and (lyr3.data <= 1023.5).all()  # level-0 pixels
