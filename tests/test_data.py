"""Data set loaders: real BRCA-M2C when present, tiny fixtures in the official layouts otherwise."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_denuc.data import brca_m2c, folder, load_dataset, ocelot, puma
from napari_denuc.errors import DenucError

from paths import BRCA  # noqa: E402


def save_png(path, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(path)  # size is (w, h)


# ---------------------------------------------------------------- BRCA-M2C


@pytest.mark.skipif(not (BRCA / "brca_ds_train.txt").is_file(), reason="BRCA-M2C not available")
def test_brca_m2c_real_data():
    train = load_dataset("brca_m2c", BRCA, "train")
    val = brca_m2c.load(BRCA, "val")
    assert len(train) == 80 and len(val) == 10
    assert sum(len(s.points) for s in train) == 18647
    assert sum(len(s.points) for s in val) == 3133
    s = train[0]
    assert s.class_names == ("lymphocyte", "tumor", "stromal") and s.mpp == 0.5
    assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
    assert set(np.concatenate([t.labels for t in train]).tolist()) == {0, 1, 2}
    assert not {t.name for t in train} & {t.name for t in val}
    # Nuclei are darker than the average pixel: checks the Y X -> x, y swap.
    on_nuclei = [t.image[t.points[:, 1].astype(int), t.points[:, 0].astype(int)].mean() for t in train[:5]]
    assert np.mean(on_nuclei) < np.mean([t.image.mean() for t in train[:5]]) - 20


def test_brca_m2c_test_split_is_held_back(tmp_path):
    with pytest.raises(DenucError, match="held back"):
        brca_m2c.load(BRCA if BRCA.is_dir() else tmp_path, "test")
    with pytest.raises(DenucError, match="unknown BRCA-M2C split"):
        brca_m2c.load(tmp_path, "training")


def test_brca_m2c_malformed_rows_and_outside_points(tmp_path):
    save_png(tmp_path / "images" / "a.png", (20, 10))
    (tmp_path / "labels").mkdir()
    rows = ["2 5 1", "", "3 4", "x 4 1", "1 1 7", "1 1 inf", "1 1 2.5", "8 15 3", "30 5 2", "4 50 2"]
    (tmp_path / "labels" / "a_gt_class_coords.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "brca_ds_train.txt").write_text("a.png\n")
    with pytest.warns(UserWarning) as record:
        (s,) = brca_m2c.load(tmp_path, "train")
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 5 malformed row(s), first at line 3" in messages
    assert "dropped 2 point(s) outside the 20x10 image" in messages
    np.testing.assert_array_equal(s.points, [[5, 2], [15, 8]])  # rows are Y X
    assert s.labels.tolist() == [0, 2] and s.name == "a"


# ---------------------------------------------------------------- OCELOT


def make_ocelot(root, split="train"):
    for sid, rows in (("001", "10,5,1\n20,12,2\n"), ("002", "3,3,2\n40,3,1\n1,2,5\n"), ("003", "")):
        save_png(root / "images" / split / "cell" / f"{sid}.jpg", (32, 24))
        (root / "annotations" / split / "cell").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split / "cell" / f"{sid}.csv").write_text(rows)
    meta = {
        "sample_pairs": {
            "001": {"slide_name": "s1", "cell": {"resized_mpp_x": 0.2, "resized_mpp_y": 0.22}, "tissue": {}},
            "002": {"slide_name": "s2", "cell": {"resized_mpp_x": 0.25, "resized_mpp_y": 0.25}},
            "003": {"slide_name": "s3", "cell": {"resized_mpp_x": 0.19, "resized_mpp_y": 0.19}},
        }
    }
    (root / "metadata.json").write_text(json.dumps(meta))


def test_ocelot(tmp_path):
    make_ocelot(tmp_path)
    with pytest.warns(UserWarning) as record:
        samples = load_dataset("ocelot", tmp_path, "train")
    messages = " ".join(str(w.message) for w in record)
    assert "malformed" in messages and "outside" in messages
    assert [s.name for s in samples] == ["001", "002", "003"]
    a, b, c = samples
    assert a.class_names == ("background", "tumor")
    assert a.mpp == pytest.approx(0.21) and b.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(a.points, [[10, 5], [20, 12]])
    assert a.labels.tolist() == [0, 1] and b.labels.tolist() == [1] and len(c.points) == 0
    assert a.image.shape == (24, 32, 3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the fixture's bad rows, checked in test_ocelot
def test_ocelot_missing_split_and_metadata(tmp_path):
    make_ocelot(tmp_path)
    with pytest.raises(DenucError, match="'val' not found"):
        ocelot.load(tmp_path, "val")
    (tmp_path / "metadata.json").unlink()
    with pytest.warns(UserWarning, match="assumed 0.2 mpp"):
        samples = ocelot.load(tmp_path, "train")
    assert samples[0].mpp == 0.2


# ---------------------------------------------------------------- PUMA


def square(cx, cy, r=2):
    return [[[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r], [cx - r, cy - r]]]


def puma_feature(cx, cy, name):
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": square(cx, cy)},
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}},
    }


def make_puma(root):
    (root / "images").mkdir(parents=True)
    (root / "geojson").mkdir()
    tifffile.imwrite(root / "images" / "roi_001.tif", np.full((24, 32, 3), 180, np.uint8))
    save_png(root / "images" / "roi_002.png", (32, 24))
    nuclei = {
        "roi_001": [(5.5, 5.5, "nuclei_tumor"), (10.5, 5.5, "nuclei_plasma_cell"), (20.5, 10.5, "nuclei_apoptosis")],
        "roi_002": [(3.5, 3.5, "nuclei_lymphocyte"), (8.5, 8.5, "nuclei_stroma"), (60.5, 8.5, "nuclei_tumor")],
    }
    for sid, feats in nuclei.items():
        fc = {"type": "FeatureCollection", "features": [puma_feature(*f) for f in feats]}
        (root / "geojson" / f"{sid}_nuclei.geojson").write_text(json.dumps(fc))


def test_puma_default_mapping(tmp_path):
    make_puma(tmp_path)
    with pytest.warns(UserWarning, match="outside"):
        a, b = load_dataset("puma", tmp_path, "all")
    assert a.class_names == ("tumor", "lymphocyte", "other") and a.mpp == 0.25
    np.testing.assert_allclose(a.points, [[5, 5], [10, 5], [20, 10]])  # QuPath centroids -> pixel centres
    assert a.labels.tolist() == [0, 1, 2]
    assert b.labels.tolist() == [1, 2]  # the tumor at x=60 is outside the 32 px wide image


def test_puma_custom_mapping_and_split(tmp_path):
    make_puma(tmp_path)
    (tmp_path / "train.txt").write_text("roi_001\n")
    mapping = {"nuclei_tumor": "tumor", "plasma_cell": "immune", "apoptosis": None}
    (a,) = puma.load(tmp_path, "train", mapping=mapping, mpp=0.5)
    assert a.class_names == ("tumor", "immune") and a.mpp == 0.5
    assert a.labels.tolist() == [0, 1] and len(a.points) == 2
    with pytest.raises(DenucError, match="lymphocyte"):  # roi_002 has classes the mapping lacks
        puma.load(tmp_path, "all", mapping=mapping)
    with pytest.raises(DenucError, match="'val' not found"):
        puma.load(tmp_path, "val")


# ---------------------------------------------------------------- folder


def test_folder(tmp_path):
    d = tmp_path / "train"
    save_png(d / "a.png", (32, 24))
    (d / "a.csv").write_text("x,y,class\n1,2,tumor\n5,6,lymphocyte\n100,6,tumor\n")
    tifffile.imwrite(d / "b.tif", np.zeros((24, 32, 3), np.uint8), resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    fc = {"type": "FeatureCollection", "features": [puma_feature(4.5, 4.5, "stroma")]}
    (d / "b.geojson").write_text(json.dumps(fc))
    save_png(d / "c.jpg")  # no point file
    with pytest.warns(UserWarning) as record:
        samples = load_dataset("folder", tmp_path, "train")
    messages = " ".join(str(w.message) for w in record)
    assert "without a point file" in messages and "outside" in messages and "assumed 0.5 mpp" in messages
    a, b = samples
    assert a.class_names == ("lymphocyte", "stroma", "tumor")
    assert a.labels.tolist() == [2, 0] and b.labels.tolist() == [1]
    np.testing.assert_allclose(b.points, [[4, 4]])
    assert a.mpp == 0.5 and b.mpp == pytest.approx(0.25)

    with pytest.warns(UserWarning):
        samples = folder.load(tmp_path, "train", class_names=("tumor", "lymphocyte", "stroma", "other"), mpp=0.3)
    assert samples[0].labels.tolist() == [0, 1] and {s.mpp for s in samples} == {0.3}
    with pytest.raises(DenucError, match="'stroma'"), pytest.warns(UserWarning):
        folder.load(tmp_path, "train", class_names=("tumor", "lymphocyte"))


def test_folder_root_and_missing(tmp_path):
    save_png(tmp_path / "a.png")
    (tmp_path / "a.csv").write_text("x,y,class\n1,2,2\n3,4,10\n")  # integer ids, sorted as numbers
    (s,) = folder.load(tmp_path, "all", mpp=0.5)
    assert s.class_names == ("2", "10") and s.labels.tolist() == [0, 1]
    assert folder.load(tmp_path, None, mpp=0.5)[0].name == "a"
    with pytest.raises(DenucError, match="split 'all'"):
        folder.load(tmp_path, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DenucError, match="no images with point files"):
        folder.load(tmp_path / "empty", "all")


def test_unknown_dataset():
    with pytest.raises(DenucError, match="unknown data set"):
        load_dataset("kaggle", ".", "train")


def test_folder_matches_a_heads_classes(tmp_path):
    """Given a head's classes: names by name whatever their order, 1-based ids by position, a file without a
    class column as a one-class head's class; an unclassified region outline among classified points is left out."""
    save_png(tmp_path / "a.png", (32, 24))
    (tmp_path / "a.csv").write_text("x,y,class\n1,2,stromal\n5,6,tumor\n")
    with pytest.warns(UserWarning, match="assumed 0.5 mpp"):
        (a,) = folder.load(tmp_path, "all", class_names=("tumor", "stromal"))
    assert a.labels.tolist() == [1, 0]
    (tmp_path / "a.csv").write_text("x,y,class\n1,2,2\n5,6,1\n")
    assert folder.load(tmp_path, "all", class_names=("tumor", "stromal"), mpp=0.5)[0].labels.tolist() == [1, 0]
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    assert folder.load(tmp_path, "all", class_names=("tumor",), mpp=0.5)[0].labels.tolist() == [0]
    (tmp_path / "a.csv").unlink()
    region = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [20, 0], [20, 20], [0, 0]]]},
              "properties": {"objectType": "annotation"}}
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [puma_feature(4.5, 4.5, "Tumor"), region]}))
    with pytest.warns(UserWarning, match="left out 1 unclassified"):
        (a,) = folder.load(tmp_path, "all", mpp=0.5)
    assert a.class_names == ("Tumor",) and len(a.points) == 1
    (a,) = folder.load(tmp_path, "all", class_names=("tumor", "stromal"), class_map={"Tumor": "tumor"}, mpp=0.5)
    assert a.labels.tolist() == [0]
    with pytest.raises(DenucError, match="'Tumor'.*--class-map"):
        folder.load(tmp_path, "all", class_names=("tumor", "stromal"), mpp=0.5)


def test_points_mostly_outside_the_image_hint_at_slide_coordinates(tmp_path):
    """A tile exported from QuPath with its objects' GeoJSON: the points are in whole-slide pixels."""
    save_png(tmp_path / "tile.png", (32, 24))
    (tmp_path / "tile.csv").write_text("x,y,class\n5,5,tumor\n20500,13002,tumor\n20510,13020,tumor\n")
    with pytest.warns(UserWarning, match="dropped 2 point.*whole-slide coordinates"):
        folder.load(tmp_path, "all", mpp=0.5)
