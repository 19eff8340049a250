"""GeoJSON / CSV point files and atomic writes."""

import gzip
import json
import os
import uuid

import numpy as np
import pytest

from napari_denuc.errors import DenucError
from napari_denuc.io import atomic
from napari_denuc.io.atomic import atomic_write
from napari_denuc.io.csv import read_csv, write_csv, write_csv_chunks
from napari_denuc.io.geojson import geojson_dict, read_geojson, write_geojson, write_geojson_chunks
from napari_denuc.io.points import read_points, write_points
from napari_denuc.results import Detections


@pytest.fixture
def det():
    return Detections(
        xy=[[10.0, 20.0], [30.25, 40.5], [0.0, 0.0]],
        scores=[0.9, 0.5, 0.25],
        class_ids=[0, 1, 1],
        class_names=("tumor", "lymphocyte"),
        class_colors=((200, 0, 0), (0, 0, 200)),
        probs=[[0.8, 0.2], [0.3, 0.7], [0.1, 0.9]],
    )


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def assert_same(a, b):
    np.testing.assert_allclose(a.xy, b.xy, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert a.class_ids.tolist() == b.class_ids.tolist()
    assert a.class_names == b.class_names
    if a.probs is None:
        assert b.probs is None
    else:
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5)


# ---------------------------------------------------------------- GeoJSON


def test_geojson_layout_is_what_qupath_reads(det):
    d = geojson_dict(det)
    assert d["type"] == "FeatureCollection" and len(d["features"]) == 3
    f = d["features"][1]
    uuid.UUID(f["id"])
    assert f["geometry"] == {"type": "Point", "coordinates": [30.75, 41.0]}  # QuPath pixel centres at +0.5
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["classification"] == {"name": "lymphocyte", "color": [0, 0, 200]}
    assert f["properties"]["measurements"] == pytest.approx(
        {"score": 0.5, "prob tumor": 0.3, "prob lymphocyte": 0.7, "reviewed": 0, "source": 0}
    )
    assert f["properties"]["metadata"] == {"source": "model"}
    assert len({g["id"] for g in d["features"]}) == 3


def test_geojson_round_trip(tmp_path, det):
    path = write_geojson(tmp_path / "out" / "a.geojson", det)
    back = read_geojson(path)
    assert_same(det, back)
    assert back.class_colors == det.class_colors
    # Fixed class order, including a class without points.
    back = read_geojson(path, class_names=("other", "lymphocyte", "tumor"))
    assert back.class_names == ("other", "lymphocyte", "tumor")
    assert back.class_ids.tolist() == [2, 1, 1]
    assert back.probs is None  # no "prob other" measurement


def test_geojson_keeps_the_models_probs_beside_nuclei_placed_by_hand(tmp_path, det):
    """A nucleus the user added has no probabilities (NaN, left out of the file): the others keep theirs.
    Before, one such nucleus dropped every nucleus's probabilities on reading."""
    det.probs[2] = np.nan
    back = read_geojson(write_geojson(tmp_path / "a.geojson", det))
    np.testing.assert_allclose(back.probs[:2], det.probs[:2], rtol=1e-5)
    assert np.isnan(back.probs[2]).all()


def test_geojson_without_probs(tmp_path, det):
    det.probs = None
    back = read_geojson(write_geojson(tmp_path / "a.geojson", det))
    assert_same(det, back)


def test_geojson_gz(tmp_path, det):
    path = write_geojson(tmp_path / "a.geojson.gz", det)
    assert json.loads(gzip.decompress(path.read_bytes()))["type"] == "FeatureCollection"
    assert_same(det, read_points(path))
    # gzip=True with a plain suffix: still readable (the reader sniffs the gzip header).
    path = write_geojson(tmp_path / "b.geojson", det, gzip=True)
    assert_same(det, read_geojson(path))


def test_qupath_points_annotations(tmp_path):
    # QuPath 0.4 "Points" tool export: one MultiPoint annotation per class.
    obj = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "0d4b3a3e-6a55-4c45-9d7d-8f7a3b0c1e11",
                "geometry": {"type": "MultiPoint", "coordinates": [[10.5, 20.5], [30.5, 40.5]]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
            },
            {
                "type": "Feature",
                "id": "6f1e2f53-1f7c-4c1e-8d0a-2b9e3d4c5a66",
                "geometry": {"type": "MultiPoint", "coordinates": [[5.5, 5.5]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Lymphocyte", "color": [160, 90, 160]},
                    "isLocked": False,
                },
            },
        ],
    }
    d = read_geojson(write_json(tmp_path / "points.geojson", obj))
    assert d.class_names == ("Tumor", "Lymphocyte")
    assert d.class_colors == ((200, 0, 0), (160, 90, 160))
    np.testing.assert_allclose(d.xy, [[10, 20], [30, 40], [5, 5]])
    assert d.class_ids.tolist() == [0, 0, 1]
    assert d.scores.tolist() == [1.0, 1.0, 1.0] and d.probs is None
    assert list(d.source) == ["user"] * 3  # a person placed and classified them in QuPath


def test_bare_array_string_classification_and_unclassified(tmp_path):
    obj = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.5, 2.5]}, "properties": {"classification": "Tumor"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3.5, 4.5]}, "properties": {}},
        # QuPath 0.2: packed colour and a measurement list
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [5.5, 6.5]},
            "properties": {
                "classification": {"name": "Stroma", "colorRGB": -3670016},
                "measurements": [{"name": "score", "value": 0.25}],
            },
        },
    ]
    d = read_geojson(write_json(tmp_path / "a.json", obj))
    assert d.class_names == ("Tumor", "Unclassified", "Stroma")
    assert d.class_colors[2] == (200, 0, 0)
    np.testing.assert_allclose(d.xy, [[1, 2], [3, 4], [5, 6]])
    assert d.scores.tolist() == [1.0, 1.0, 0.25]


def test_single_unclassified_feature(tmp_path):
    obj = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.5, 1.5]}, "properties": None}
    d = read_geojson(write_json(tmp_path / "a.geojson", obj))
    assert d.class_names == ("nucleus",) and len(d) == 1


def test_polygons_become_centroids(tmp_path):
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    triangle = [[0, 0], [6, 0], [0, 6], [0, 0]]
    hole = [[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]  # removes the lower-left quarter of an 4x4 square
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [triangle[::-1]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square], [[[p[0] + 8, p[1]] for p in square]]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "properties": {}},
    ]
    with pytest.warns(UserWarning, match="skipped 1"):
        d = read_geojson(write_json(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": feats}))
    # (12*2 - 4*1) / 12 = 5/3 for the square with a hole
    expected = np.array([[2, 2], [2, 2], [7 / 3, 7 / 3], [6, 2]]) - 0.5
    np.testing.assert_allclose(d.xy, expected, atol=1e-9)


def test_unknown_classes_are_named(tmp_path, det):
    path = write_geojson(tmp_path / "a.geojson", det)
    with pytest.raises(DenucError, match="'lymphocyte'"):
        read_geojson(path, class_names=("tumor", "stroma"))


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"a": 1}',
        '{"type": "FeatureCollection", "features": [1, 2]}',
        '{"type": "Feature", "geometry": {"type": "Point", "coordinates": "x"}}',
        '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {"measurements": {"score": "high"}}}',
        '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 2]}}',
    ],
)
def test_malformed_geojson(tmp_path, content):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(DenucError) as e:
        read_geojson(path)
    assert "\n" not in str(e.value) and "bad.geojson" in str(e.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DenucError, match="not found"):
        read_points(tmp_path / "nope.geojson")
    (tmp_path / "bad.geojson.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DenucError):
        read_points(tmp_path / "bad.geojson.gz")
    with pytest.raises(DenucError, match="unknown point file type"):
        read_points(tmp_path / "points.xlsx")


# ---------------------------------------------------------------- CSV


def test_csv_round_trip(tmp_path, det):
    path = write_points(tmp_path / "a.csv", det)
    lines = path.read_text().splitlines()
    assert lines[0] == "x,y,class,score,prob_tumor,prob_lymphocyte,source,reviewed"
    assert lines[1].startswith("10.000,20.000,tumor,0.9,")
    assert_same(det, read_points(path))
    det.probs = None
    assert read_csv(write_csv(tmp_path / "b.csv", det)).probs is None


def test_csv_class_ids_are_one_based(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("x,y,class\n1,2,2\n3,4,1\n")
    d = read_csv(path, class_names=("tumor", "lymphocyte"))
    assert d.class_names == ("tumor", "lymphocyte") and d.class_ids.tolist() == [1, 0]
    d = read_csv(path)
    assert d.class_names == ("1", "2") and d.class_ids.tolist() == [1, 0]
    path.write_text("x,y,class\n1,2,3\n")
    with pytest.raises(DenucError, match="out of range"):
        read_csv(path, class_names=("tumor", "lymphocyte"))


def test_csv_variants(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("X,Y\n1.5,2\n\n3,4\n")  # only coordinates, blank line
    d = read_csv(path)
    assert d.class_names == ("nucleus",) and d.scores.tolist() == [1.0, 1.0]
    np.testing.assert_allclose(d.xy, [[1.5, 2], [3, 4]])
    path.write_text("10,20,2\n30,40,1\n")  # no header (OCELOT style)
    d = read_csv(path, class_names=("background", "tumor"))
    assert d.class_ids.tolist() == [1, 0]
    path.write_text("x,y,label\n1,2,b\n3,4,a\n")
    assert read_csv(path).class_names == ("b", "a")
    with pytest.raises(DenucError, match="'b'"):
        read_csv(path, class_names=("a", "c2"))


@pytest.mark.parametrize(
    "content, line",
    [("x,y\n1,2\n3\n", 3), ("x,y,class\n1,2,a\nfoo,2,a\n", 3), ("x,y,score\n1,2,high\n", 2), ("x,y\n1,inf\n", 2)],
)
def test_csv_malformed_row_names_line(tmp_path, content, line):
    path = tmp_path / "a.csv"
    path.write_text(content)
    with pytest.raises(DenucError, match=f"line {line}"):
        read_csv(path)


def test_csv_from_a_european_spreadsheet(tmp_path):
    """';' between fields and ',' as the decimal mark (Excel in many European locales) were one
    column named 'x;y;class', refused as having no x and y."""
    p = tmp_path / "punkte.csv"
    p.write_text("x;y;class\n12,5;30,25;tumor\n40;7,75;\"Immune, cells\"\n", encoding="utf-8")
    det = read_csv(p)
    assert det.xy.tolist() == [[12.5, 30.25], [40.0, 7.75]]
    assert [det.class_names[i] for i in det.class_ids] == ["tumor", "Immune, cells"]
    headerless = tmp_path / "ocelot.csv"
    headerless.write_text("12,5;30;1\n", encoding="utf-8")
    assert read_csv(headerless).xy.tolist() == [[12.5, 30.0]]


def test_csv_bad_header_and_empty(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("row,col\n1,2\n")
    with pytest.raises(DenucError, match="x and y"):
        read_csv(path)
    path.write_text("")
    with pytest.raises(DenucError, match="empty"):
        read_csv(path)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "dir" / "f.txt"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["f.txt"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new content")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
    monkeypatch.undo()
    with pytest.raises(TypeError):
        atomic_write(path, 123)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_write_geojson_is_atomic(tmp_path, det, monkeypatch):
    path = write_geojson(tmp_path / "a.geojson", det)
    before = path.read_bytes()
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        write_geojson(path, Detections(np.zeros((0, 2)), [], []))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.geojson"]


# ---------------------------------------------------------------- source / reviewed


def flagged(det):
    det.source = np.array(["model", "user", "my tool, v2"], dtype=object)
    det.reviewed = np.array([False, True, True])
    return det


def test_source_and_reviewed_default_and_broadcast(det):
    assert det.source.tolist() == ["model"] * 3 and det.reviewed.tolist() == [False] * 3
    d = Detections(det.xy, det.scores, det.class_ids, det.class_names, source="imported", reviewed=True)
    assert d.source.tolist() == ["imported"] * 3 and d.reviewed.tolist() == [True] * 3
    d.source[0] = "a longer source name"  # object dtype: no silent truncation
    assert d.source[0] == "a longer source name"
    sub = flagged(det).take([2, 0])
    assert sub.source.tolist() == ["my tool, v2", "model"] and sub.reviewed.tolist() == [True, False]
    assert sub.xy.tolist() == [[0.0, 0.0], [10.0, 20.0]] and sub.class_ids.tolist() == [1, 0]
    np.testing.assert_allclose(sub.probs, [[0.1, 0.9], [0.8, 0.2]])


def test_geojson_source_reviewed_as_qupath_keeps_them(tmp_path, det):
    d = geojson_dict(flagged(det))
    props = [f["properties"] for f in d["features"]]
    # QuPath keeps numeric measurements and string metadata: reviewed 0/1, source as both
    assert [p["measurements"]["reviewed"] for p in props] == [0, 1, 1]
    assert [p["measurements"].get("source") for p in props] == [0, 1, None]  # unknown name: no code
    assert [p["metadata"]["source"] for p in props] == ["model", "user", "my tool, v2"]
    back = read_geojson(write_geojson(tmp_path / "a.geojson", det))
    assert back.source.tolist() == ["model", "user", "my tool, v2"]
    assert back.reviewed.tolist() == [False, True, True]
    assert_same(det, back)


def test_geojson_source_from_qupath_05_export(tmp_path):
    # QuPath 0.5 drops metadata of detections: only the numeric code survives its export.
    def feat(measurements, **props):
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1.5, 2.5]},
            "properties": {"objectType": "detection", "measurements": measurements, **props},
        }

    path = write_json(
        tmp_path / "q.geojson",
        [
            feat({"score": 0.5, "source": 2, "reviewed": 1.0}),
            feat({"score": 0.5, "source": 1}, source="plain property"),
            feat({"score": 0.5}),  # drawn in QuPath: no measurements of ours
            feat([{"name": "reviewed", "value": 1}, {"name": "source", "value": 3}]),  # QuPath 0.2 list
            feat({"reviewed": float("nan"), "source": 7}),  # out-of-range code, NaN flag
        ],
    )
    back = read_geojson(path)
    assert back.source.tolist() == ["imported", "plain property", "model", "edited", "model"]
    assert back.reviewed.tolist() == [True, False, False, True, False]


def test_csv_source_reviewed_round_trip(tmp_path, det):
    path = write_csv(tmp_path / "a.csv", flagged(det))
    lines = path.read_text().splitlines()
    assert lines[3].endswith(',"my tool, v2",1') and lines[1].endswith(",model,0")
    back = read_csv(path)
    assert back.source.tolist() == ["model", "user", "my tool, v2"]
    assert back.reviewed.tolist() == [False, True, True]
    assert_same(det, back)
    # hand-written files: true/false flags, missing columns fall back to the defaults
    (tmp_path / "b.csv").write_text("x,y,reviewed,source\n1,2,true,user\n3,4,,\n")
    b = read_csv(tmp_path / "b.csv")
    assert b.reviewed.tolist() == [True, False] and b.source.tolist() == ["user", "model"]
    assert read_csv(tmp_path / "b.csv").class_names == ("nucleus",)
    (tmp_path / "c.csv").write_text("x,y,reviewed\n1,2,maybe\n")
    with pytest.raises(DenucError, match="line 2"):
        read_csv(tmp_path / "c.csv")


def test_point_files_round_trip_flags_by_suffix(tmp_path, det):
    flagged(det)
    for name in ("a.csv", "a.geojson", "a.geojson.gz"):
        back = read_points(write_points(tmp_path / name, det))
        assert back.source.tolist() == det.source.tolist(), name
        assert back.reviewed.tolist() == det.reviewed.tolist(), name


# ---------------------------------------------------------------- streaming writers


def _chunks(det):
    return [det.take([0]), det.take([]), det.take([1, 2])]


@pytest.mark.parametrize("name", ["s.geojson", "s.geojson.gz"])
def test_geojson_chunks_equal_one_piece(tmp_path, det, name):
    flagged(det)
    back = read_geojson(write_geojson_chunks(tmp_path / name, _chunks(det)))
    assert_same(det, back)
    assert back.source.tolist() == det.source.tolist() and back.reviewed.tolist() == det.reviewed.tolist()
    empty = write_geojson_chunks(tmp_path / ("e" + name), [])
    raw = gzip.decompress(empty.read_bytes()) if name.endswith(".gz") else empty.read_bytes()
    assert json.loads(raw) == {"type": "FeatureCollection", "features": []}


def test_csv_chunks_equal_one_piece(tmp_path, det):
    flagged(det)
    a = write_csv_chunks(tmp_path / "a.csv", _chunks(det)).read_text()
    assert a == write_csv(tmp_path / "b.csv", det).read_text()
    assert write_csv_chunks(tmp_path / "e.csv", []).read_text() == "x,y,class,score,source,reviewed\n"
    other = Detections(det.xy, det.scores, det.class_ids, ("x", "y"), probs=det.probs)
    with pytest.raises(ValueError, match="disagree"):
        write_csv_chunks(tmp_path / "c.csv", [det, other])
    assert not (tmp_path / "c.csv").exists() and not list(tmp_path.glob(".c.csv.*"))  # no torn file


def test_streamed_geojson_failure_leaves_old_file(tmp_path, det):
    path = write_geojson(tmp_path / "a.geojson", det)
    before = path.read_bytes()

    def broken():
        yield det
        raise RuntimeError("tile store vanished")

    with pytest.raises(RuntimeError):
        write_geojson_chunks(path, broken())
    assert path.read_bytes() == before and not list(tmp_path.glob(".a.geojson.*"))


def test_overlay_has_a_key_of_the_class_colours(tmp_path, det):
    """The PNG a new user opens first says which colour is which class, and how many; the key is
    below the image, so the image keeps its pixels."""
    from PIL import Image

    from napari_denuc.io.overlay import draw_overlay, write_overlay

    image = np.full((120, 160, 3), 128, np.uint8)
    write_overlay(tmp_path / "o.png", image, det)
    png = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    np.testing.assert_array_equal(png[:120], draw_overlay(image, det))
    key = png[120:]
    for color in det.class_colors:
        assert (key == color).all(axis=-1).sum() >= 100  # a swatch of at least 10 x 10 px
    assert (key.max(axis=-1) < 100).sum() > 20  # dark text beside the swatches
