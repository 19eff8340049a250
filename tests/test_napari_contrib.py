"""npe2 contributions: manifest, reader, writer, sample data, lazy imports."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from napari_denuc import _reader, _writer
from napari_denuc.results import Detections
from napari_denuc.widget import layer as L


def _det():
    return Detections(
        [[10.5, 20.0], [30.0, 5.25], [7.0, 7.0]],
        [0.9, 0.8, 1.0],
        [0, 2, 1],
        ("lymphocyte", "tumor", "stromal"),
        probs=[[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.6, 0.2]],
    )


def test_manifest_is_valid():
    from npe2 import PluginManifest

    from napari_denuc import __name__ as pkg  # noqa: F401

    import importlib.resources as r

    mf = PluginManifest.from_file(str(r.files("napari_denuc") / "napari.yaml"))
    c = mf.contributions
    assert [w.display_name for w in c.widgets] == ["DeNuC"]
    assert c.sample_data[0].key == "brca_m2c_tile"
    assert {tuple(w.filename_extensions) for w in c.writers} == {(".geojson",), (".csv",)}
    assert "*.geojson.gz" in c.readers[0].filename_patterns
    for cmd in c.commands:  # every python_name resolves
        mod, attr = cmd.python_name.split(":")
        assert callable(getattr(__import__(mod, fromlist=[attr]), attr))


def test_contributions_import_lazily():
    code = (
        "import sys\n"
        "import napari_denuc._reader, napari_denuc._writer, napari_denuc._sample_data, napari_denuc.widget\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'PyQt5', 'PySide2', 'PySide6', 'PyQt6', 'qtpy', 'napari')]\n"
        "assert not bad, bad\n"
        "from napari_denuc._sample_data import make_sample_data\n"
        "make_sample_data()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'PyQt5', 'qtpy')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_sample_data():
    from napari_denuc._sample_data import SAMPLE_DIR, make_sample_data

    (data, kwargs, kind), = make_sample_data()
    assert kind == "image" and kwargs["rgb"] and data.shape == (465, 465, 3) and data.dtype == np.uint8
    assert kwargs["metadata"]["mpp"] == 0.5
    assert (SAMPLE_DIR / "LICENSE").is_file()
    text = (SAMPLE_DIR / "ATTRIBUTION.md").read_text()
    assert "Abousamra" in text and "TopoXLab/Dataset-BRCA-M2C" in text


def test_reader_declines_other_files(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "table.csv").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.1}))
    (tmp_path / "notes.txt").write_text("x,y\n")
    for name in ("image.png", "table.csv", "config.json", "notes.txt", "missing.geojson"):
        assert _reader.get_reader(str(tmp_path / name)) is None, name
    assert _reader.get_reader(str(tmp_path)) is None


@pytest.mark.parametrize("name", ["pts.geojson", "pts.geojson.gz", "pts.csv"])
def test_writer_reader_round_trip(tmp_path, name):
    det = _det()
    data, kwargs, kind = L.layer_data_tuple(det, "nuclei")
    assert kind == "points"
    np.testing.assert_allclose(data, det.xy[:, ::-1])  # napari (row, col)
    kwargs["features"].loc[0, "source"] = "edited"  # a user's flags travel through the file
    kwargs["features"].loc[2, "reviewed"] = True
    suffix = ".csv" if name.endswith(".csv") else ".geojson"
    writer = _writer.write_csv if suffix == ".csv" else _writer.write_geojson
    out = writer(str(tmp_path / name), data, {"features": kwargs["features"], "metadata": kwargs["metadata"]})
    assert out == [str(tmp_path / name)]
    reader = _reader.get_reader(out[0])
    assert reader is not None
    (data2, kw2, kind2), = reader(out[0])
    assert kind2 == "points"
    np.testing.assert_allclose(data2, data, atol=1e-3)
    assert list(kw2["features"]["class"].astype(str)) == ["lymphocyte", "stromal", "tumor"]
    assert list(kw2["features"]["source"].astype(str)) == ["edited", "model", "model"]
    assert list(kw2["features"]["reviewed"]) == [False, False, True]
    assert kw2["name"] == "pts"


def test_writer_adds_suffix_and_handles_plain_points(tmp_path):
    out = _writer.write_geojson(str(tmp_path / "plain"), np.array([[1.0, 2.0]]), {"features": None, "metadata": {}})
    assert out[0].endswith("plain.geojson")
    obj = json.loads((tmp_path / "plain.geojson").read_text())
    feats = obj["features"] if isinstance(obj, dict) else obj
    assert feats[0]["geometry"]["coordinates"][:2] == [2.5, 1.5]  # GeoJSON is (x, y), QuPath pixel centres at +0.5


def test_reader_reads_qupath_export(tmp_path):
    # a QuPath "Export objects as GeoJSON" of detections: a bare list, polygons, classification objects
    qp = [
        {
            "type": "Feature",
            "id": "a",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]},
            "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "id": "b",
            "geometry": {"type": "Point", "coordinates": [10, 20]},
            "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "colorRGB": -16711936}},
        },
    ]
    p = tmp_path / "qupath.geojson.gz"
    with gzip.open(p, "wt") as f:
        json.dump(qp, f)
    reader = _reader.get_reader(str(p))
    (data, kw, _), = reader(str(p))
    np.testing.assert_allclose(data, [[1.5, 1.5], [19.5, 9.5]], atol=1e-6)  # QuPath centres at +0.5
    assert list(kw["features"]["class"].astype(str)) == ["Tumor", "Stroma"]


@pytest.mark.napari
def test_open_sample_and_points_file_in_viewer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-denuc", "brca_m2c_tile")
    assert layers[0].rgb and layers[0].metadata["mpp"] == 0.5
    det = _det()
    data, kwargs, _ = L.layer_data_tuple(det, "nuclei")
    p = _writer.write_geojson(str(tmp_path / "n.geojson"), data, {"features": kwargs["features"], "metadata": kwargs["metadata"]})[0]
    (lyr,) = viewer.open(p, plugin="napari-denuc")
    assert lyr.__class__.__name__ == "Points" and len(lyr.data) == 3
    # napari's own save goes through our writer
    viewer.layers.selection = {lyr}
    out = viewer.layers.save(str(tmp_path / "saved.csv"), selected=True, plugin="napari-denuc")
    assert out and (tmp_path / "saved.csv").read_text().startswith("x,y,class")
