"""Training the head from QuPath exports on whole slides (issue 12): slides=LIST.csv, --class-map, bad input.

The round trip runs on a generated 8192 x 8192 tiled pyramidal TIFF at 0.5 mpp with a QuPath-style
GeoJSON of 2,000 points; the encoder is ``lite`` without a detector (filter bank only), the fastest.
"""

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from napari_denuc.data.slides import (
    UNCLASSIFIED,
    load_slides,
    map_classes,
    parse_class_map,
    read_slide_list,
)
from napari_denuc.errors import DenucError

SIZE = 8192
WINDOW, STEP = 2048, 1664  # lite's window grid at 0.5 mpp (window 2048, overlap 384)
CLASS_MAP = "Tumor=tumour,Stroma=stromal,Necrosis="


# ----------------------------------------------------------------------------- helpers
def _feature(geometry, name=None, kind="detection"):
    props = {"objectType": kind}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def _point(x, y):
    # QuPath puts the centre of pixel (0, 0) at (0.5, 0.5)
    return {"type": "Point", "coordinates": [float(x) + 0.5, float(y) + 0.5]}


def _square(x, y, r=4.0):
    x, y = x + 0.5, y + 0.5
    ring = [[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]
    return {"type": "Polygon", "coordinates": [ring]}


def _write_geojson(path, features):
    data = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _small_slide(tmp_path, name="s.tif", size=1024, mpp=0.5):
    from napari_denuc.wsi.synthetic import make_test_slide

    return tmp_path / name, make_test_slide(tmp_path / name, size, mpp=mpp, seed=3)


def _list_csv(tmp_path, rows, header="slide,points,mpp"):
    p = tmp_path / "LIST.csv"
    p.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return p


# ----------------------------------------------------------------------------- class mapping
def test_class_map_every_branch():
    cmap = parse_class_map("Tumor=tumour, Immune cells=lymphocyte ,Necrosis=,Tumor: Negative=stromal")
    assert cmap == {"Tumor": "tumour", "Immune cells": "lymphocyte", "Necrosis": None, "Tumor: Negative": "stromal"}
    names = ["Tumor", "Tumor: Positive", "Tumor: Negative", "Immune cells", "Necrosis", UNCLASSIFIED]
    mapping, classes = map_classes(names, cmap)
    assert mapping == {
        "Tumor": "tumour",
        "Tumor: Positive": "tumour",  # derived: by its base name
        "Tumor: Negative": "stromal",  # derived but mapped explicitly: the explicit entry wins
        "Immune cells": "lymphocyte",
        "Necrosis": None,  # mapped to nothing: ignored
        UNCLASSIFIED: None,  # no classification: ignored
    }
    assert classes == ("tumour", "lymphocyte", "stromal")
    # unmapped names: all listed in one line
    with pytest.raises(DenucError, match=r"2 class name\(s\).*'Other'.*'Stroma'.*--class-map") as e:
        map_classes(["Tumor", "Other", "Stroma"], {"Tumor": "tumour"})
    assert "\n" not in str(e.value)
    # with the head's classes fixed: names that already are head classes pass, derived ones by base
    mapping, classes = map_classes(["tumor", "tumor: Positive", "Immune cells"], {"Immune cells": "lymphocyte"},
                                   targets=("lymphocyte", "tumor", "stromal"))
    assert mapping == {"tumor": "tumor", "tumor: Positive": "tumor", "Immune cells": "lymphocyte"}
    assert classes == ("lymphocyte", "tumor", "stromal")
    with pytest.raises(DenucError, match="'Necrosis'"):
        map_classes(["Necrosis"], None, targets=("tumor", "stromal"))
    with pytest.raises(DenucError, match="'neutrophil', which the head does not know"):
        map_classes(["Neutrophil"], {"Neutrophil": "neutrophil"}, targets=("tumor", "stromal"))
    # retraining may grow a class the map names explicitly, after the head's own
    assert map_classes(["Neutrophil", "tumor"], {"Neutrophil": "neutrophil"}, targets=("tumor", "stromal"), extend=True)[1] == (
        "tumor", "stromal", "neutrophil")
    # no map, no head: QuPath names as they are, derived classes folded into their base
    assert map_classes(["B", "A: Positive", "A"])[1] == ("A", "B")
    with pytest.raises(DenucError, match="--class-map expects"):
        parse_class_map("Tumor")


# ----------------------------------------------------------------------------- bad input
def test_list_csv_missing_column_named(tmp_path):
    p = _list_csv(tmp_path, [["a.tif", "0.5"]], header="slide,mpp")
    with pytest.raises(DenucError, match="no 'points' column") as e:
        read_slide_list(p)
    assert "\n" not in str(e.value)
    p = _list_csv(tmp_path, [["a.geojson"]], header="points")
    with pytest.raises(DenucError, match="no 'slide' column"):
        read_slide_list(p)
    p = _list_csv(tmp_path, [["a.tif", "a.geojson", "fast"]])
    with pytest.raises(DenucError, match="row 2: the mpp 'fast'"):
        read_slide_list(p)


def test_cli_bad_list_is_one_line(tmp_path, capsys):
    from napari_denuc.cli.train import main

    p = _list_csv(tmp_path, [["a.tif", "0.5"]], header="slide,mpp")
    assert main(["head", "--encoder", "lite", "--data", f"slides={p}", "--out", str(tmp_path / "h.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no 'points' column" in err and err.startswith("denuc-train: error:")


def test_unreadable_slide_names_file_and_reader(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a slide" * 100)
    _write_geojson(tmp_path / "broken.geojson", [_feature(_point(10, 10), "Tumor")])
    p = _list_csv(tmp_path, [["broken.svs", "broken.geojson", ""]])
    with pytest.raises(DenucError) as e:
        load_slides(p)
    msg = str(e.value)
    assert "\n" not in msg and "broken.svs" in msg and "tiffslide" in msg


def test_points_outside_skipped_unclassified_counted_qupath_shapes(tmp_path, recwarn):
    _, nuclei = _small_slide(tmp_path)
    a, b = nuclei[:6], nuclei[6:12]
    feats = [_feature(_point(x, y), "Tumor") for x, y in a[:3]]
    feats += [_feature(_square(x, y), "Tumor: Positive") for x, y in a[3:]]  # cell polygons -> centroids
    feats.append(_feature({"type": "MultiPoint", "coordinates": [[x + 0.5, y + 0.5] for x, y in b]}, "Stroma", "annotation"))
    feats += [_feature(_point(x, y)) for x, y in nuclei[12:16]]  # unclassified
    feats += [_feature(_point(1024 + 5, 7), "Tumor"), _feature(_point(-40, 3), "Stroma")]  # outside the slide
    feats.append(_feature(_point(*nuclei[16]), "Necrosis"))
    _write_geojson(tmp_path / "s.geojson.gz", feats)
    lst = _list_csv(tmp_path, [["s.tif", "s.geojson.gz", ""]])
    (s,) = load_slides(lst, parse_class_map(CLASS_MAP), log=lambda m: None)
    assert s.class_names == ("tumour", "stromal")
    assert s.skipped == {"unclassified": 4, "ignored": 1, "outside": 2}
    assert any("skipped 2 point(s) outside" in str(w.message) for w in recwarn)
    np.testing.assert_allclose(s.points, np.concatenate([a, b]), atol=1e-9)
    assert s.labels.tolist() == [0] * 6 + [1] * 6
    assert s.mpp == 0.5 and s.reader == "tiffslide"


def test_from_head_retrains_through_retrain_head(tmp_path, monkeypatch):
    """--from-head: the CLI hands slide features and the head's classes to retrain.retrain_head."""
    from napari_denuc import retrain
    from napari_denuc.cli.train import main
    from napari_denuc.head import LinearHead

    _, nuclei = _small_slide(tmp_path)
    names = ["lymphocyte", "tumor", "stromal", "neutrophil"]  # the bundled head's, plus a new one
    feats = [_feature(_point(x, y), ["Immune cells", "Tumor: Positive", "stromal"][i % 3]) for i, (x, y) in enumerate(nuclei[:30])]
    feats += [_feature(_point(x, y), "Neutrophil") for x, y in nuclei[30:35]]
    _write_geojson(tmp_path / "s.geojson", feats)
    lst = _list_csv(tmp_path, [["s.tif", "s.geojson", ""]])
    seen = {}
    real = retrain.retrain_head

    def spy(old_head, features, labels, class_names, class_colors, save_path, metadata=None, **kw):
        seen.update(old=old_head, features=np.asarray(features), labels=np.asarray(labels), names=class_names)
        return real(old_head, features, labels, class_names, class_colors, save_path, metadata=metadata, **kw)

    monkeypatch.setattr(retrain, "retrain_head", spy)
    out = tmp_path / "new.safetensors"
    cmap = "Immune cells=lymphocyte,Tumor=tumor,Neutrophil=neutrophil"
    rc = main(["head", "--encoder", "lite", "--data", f"slides={lst}", "--class-map", cmap, "--from-head", "bundled", "--out", str(out)])
    assert rc == 0
    assert tuple(seen["names"]) == tuple(names) and isinstance(seen["old"], LinearHead)
    # the head reads context: each nucleus with the mean of its neighbours within 40 um and their count
    assert seen["features"].shape == (35, 2 * 272 + 1) and np.bincount(seen["labels"]).tolist() == [10, 10, 10, 5]
    head = LinearHead.load(out)
    assert head.class_names == tuple(names)
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert "lite_head.safetensors" in json.dumps(meta)
    # the output is never overwritten
    assert main(["head", "--encoder", "lite", "--data", f"slides={lst}", "--from-head", "bundled", "--out", str(out),
                 "--class-map", cmap]) == 2


# ----------------------------------------------------------------------------- the round trip
@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    from napari_denuc.wsi.synthetic import make_test_slide

    d = tmp_path_factory.mktemp("wsi")
    nuclei = make_test_slide(d / "big.tif", SIZE, mpp=0.5, seed=1)
    return d / "big.tif", nuclei


def _core(nuclei_or_pts, wx, wy):
    """Points whose nearest window centre (the query's assignment) is window (wx, wy)."""
    c = np.array([wx * STEP + (WINDOW - 1) / 2, wy * STEP + (WINDOW - 1) / 2])
    return (np.abs(nuclei_or_pts - c) < STEP / 2).all(1)


def _round_trip_points(slide_path, nuclei, rng):
    """2000 classified points in the two interior windows richest in nuclei: 'Tumor' on nuclei, 'Stroma' on tissue."""
    from napari_denuc.wsi.slides import open_slide

    interior = [(wx, wy) for wx in (1, 2, 3) for wy in (1, 2, 3)]
    best = sorted(interior, key=lambda w: -_core(nuclei, *w).sum())[:2]
    pts, labels, where = [], [], []
    with open_slide(slide_path) as src:
        for i, (wx, wy) in enumerate(best):
            x0, y0 = wx * STEP, wy * STEP
            crop = src.read_level(0, x0, y0, WINDOW, WINDOW)
            nuc = nuclei[_core(nuclei, wx, wy)]
            nuc = nuc[rng.permutation(len(nuc))[:700]]
            cand = rng.uniform([x0 + 200, y0 + 200], [x0 + WINDOW - 200, y0 + WINDOW - 200], (6000, 2)).round()
            cand = cand[_core(cand, wx, wy)]
            ix = (cand - (x0, y0)).astype(int)
            tissue = crop[ix[:, 1], ix[:, 0], 1] < 205  # pink tissue, not the white background
            cand = cand[tissue]
            d2 = ((cand[:, None, :] - nuc[None, :, :]) ** 2).sum(-1).min(1)
            cand = cand[d2 > 12**2][:300]
            pts += [nuc, cand]
            labels += [np.zeros(len(nuc), int), np.ones(len(cand), int)]
            where += [np.full(len(nuc) + len(cand), i)]
    return np.concatenate(pts), np.concatenate(labels), np.concatenate(where), best


def test_round_trip_slide_equals_png_path(big_slide, tmp_path):
    from PIL import Image

    from napari_denuc.data import load_dataset
    from napari_denuc.encoders.lite import LiteEncoder
    from napari_denuc.encoders.query import query_features
    from napari_denuc.head_training import train_head
    from napari_denuc.io.images import read_image
    from napari_denuc.io.points import write_points
    from napari_denuc.pipeline import Pipeline
    from napari_denuc.results import Detections
    from napari_denuc.wsi import slides as wsi_slides
    from napari_denuc.wsi.slide_features import slide_features

    path, nuclei = big_slide
    rng = np.random.default_rng(0)
    xy, y, win, windows = _round_trip_points(path, nuclei, rng)
    assert len(xy) == 2000
    train = rng.random(len(xy)) < 0.5  # the other half is held back
    # QuPath-style export of the training half: reclassified derived names, polygons, unclassified, outside
    names = np.where(y == 0, "Tumor", "Stroma").astype(object)
    names[(y == 0) & (rng.random(len(y)) < 0.3)] = "Tumor: Positive"
    feats = [_feature(_square(*p) if k % 5 == 0 else _point(*p), n) for k, (p, n) in enumerate(zip(xy[train], names[train]))]
    feats += [_feature(_point(*p)) for p in xy[~train][:100]]  # unclassified: ignored
    feats += [_feature(_point(SIZE + 3, 50 + k), "Tumor") for k in range(25)]  # outside: skipped
    _write_geojson(tmp_path / "big.geojson.gz", feats)
    lst = _list_csv(tmp_path, [[path, "big.geojson.gz", ""]])

    # slide path, counting what is read from the file
    area = {"px": 0}
    real_read = wsi_slides.TiffSlideSource._read

    def counting(self, x, y_, level, w, h):
        area["px"] += w * h * (4**level)
        return real_read(self, x, y_, level, w, h)

    enc = LiteEncoder()
    pipe = Pipeline(None, enc)
    wsi_slides.TiffSlideSource._read = counting
    try:
        samples = load_slides(lst, parse_class_map(CLASS_MAP), log=lambda m: None)
        assert samples[0].skipped == {"unclassified": 100, "ignored": 0, "outside": 25}
        # warm up on two points of a window that holds no training point: imports read shared
        # libraries, which /proc/self/io counts too
        warm = dataclasses.replace(samples[0], points=np.array([[100.0, 100.0], [140.0, 100.0]]), labels=np.array([0, 1]))
        train_head(pipe, [warm], epochs=1)
        area["px"] = 0
        io0 = _rchar()
        head_s, _ = train_head(pipe, samples, epochs=60)
    finally:
        wsi_slides.TiffSlideSource._read = real_read
    io_read = _rchar() - io0
    # only the two windows around the points were read (in level-0 pixels), and far less than the file
    probes = 4**5  # open_slide reads one pixel of the coarsest level (5) to check the file
    assert area["px"] <= 2 * WINDOW * WINDOW + probes, area
    if io_read is not None:
        assert io_read < 0.35 * os.path.getsize(path), (io_read, os.path.getsize(path))

    # PNG path: the same regions as PNG files with their points, through the folder data set
    folder = tmp_path / "png"
    folder.mkdir()
    with wsi_slides.open_slide(path) as src:
        for i, (wx, wy) in enumerate(windows):
            x0, y0 = wx * STEP, wy * STEP
            Image.fromarray(src.read_level(0, x0, y0, WINDOW, WINDOW)).save(folder / f"w{i}.png", compress_level=1)
            m = train & (win == i)
            det = Detections(xy[m] - (x0, y0), np.ones(m.sum(), np.float32), y[m], ("tumour", "stromal"))
            write_points(folder / f"w{i}.geojson", det)
    png = load_dataset("folder", folder, "all", class_names=("tumour", "stromal"), mpp=0.5)
    head_p, _ = train_head(pipe, png, epochs=60)

    # features of the held-back half: slide path vs the PNG of the same region
    test = ~train
    f_slide = slide_features(enc, path, xy[test], 0.5)
    f_png = np.zeros_like(f_slide)
    for i, (wx, wy) in enumerate(windows):
        img, _ = read_image(folder / f"w{i}.png")
        m = win[test] == i
        f_png[m] = query_features(enc, img, xy[test][m] - (wx * STEP, wy * STEP), 0.5)
    np.testing.assert_allclose(f_slide, f_png, rtol=2**-10, atol=2**-10)  # float16 precision (they are equal)

    acc_s = float((head_s.predict(f_png) == y[test]).mean())
    acc_p = float((head_p.predict(f_png) == y[test]).mean())
    assert acc_s > 0.9 and abs(acc_s - acc_p) <= 0.01, (acc_s, acc_p)


def _rchar():
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        return None


# The baseline is taken once the libraries and models are loaded (a warm-up on a 64 px crop loads
# torch, scipy, scikit-image, tiffslide and the bundled detector): the growth is what the slide costs.
RSS_SCRIPT = """
import sys
import numpy as np
from napari_denuc.cli.train import main
from napari_denuc.encoders.lite import LiteEncoder, bundled_neck
from napari_denuc.wsi.slides import open_slide
with open_slide(sys.argv[-1]) as src:
    crop = src.read_level(0, 0, 0, 64, 64)
LiteEncoder(bundled_neck()).window_features(crop, np.array([[30.0, 30.0]]))
import scipy.sparse, scipy.spatial  # noqa: E401,F401  loaded by the context head: libraries, not data read from the slide
def status(key):  # VmHWM is this process's own peak; ru_maxrss would inherit the parent's at exec
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
base = status("VmRSS")
rc = main(sys.argv[1:-1])
print("RC", rc, "GROWTH_MB", status("VmHWM") - base)
"""


def test_cli_on_big_slide_bounded_memory(big_slide, tmp_path):
    """denuc-train head --data slides=LIST.csv on the 8192 x 8192 slide: peak RSS growth < 350 MB.

    Measured 222 MB in 3 of 3 runs (docs/benchmarks.md, "Slide training memory"): one 2048 x 2048
    ``lite`` window's live arrays (~190 MB) plus the head's fit. It was 385-550 MB, varying run
    to run, before large blocks were mapped while windows are encoded (glibc's heap holes) and
    before the detector's full-resolution layers ran in strips; the bound was 500 MB then.
    """
    from napari_denuc.head import LinearHead

    path, nuclei = big_slide
    rng = np.random.default_rng(1)
    xy, y, _, _ = _round_trip_points(path, nuclei, rng)
    feats = [_feature(_point(*p), "Tumor" if k == 0 else "Stroma") for p, k in zip(xy, y)]
    _write_geojson(tmp_path / "big.geojson", feats)
    lst = _list_csv(tmp_path, [[path, "big.geojson", ""]])
    out = tmp_path / "head.safetensors"
    args = ["head", "--encoder", "lite", "--data", f"slides={lst}", "--class-map", CLASS_MAP, "--out", str(out), "--epochs", "30"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args, str(path)], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(s for s in r.stdout.splitlines() if s.startswith("RC"))
    rc, growth = int(line.split()[1]), float(line.split()[3])
    assert rc == 0 and growth < 350, line
    head = LinearHead.load(out)
    assert head.class_names == ("tumour", "stromal")
    assert "big.tif: 2000 nuclei" in r.stderr


# ----------------------------------------------------------------------------- slide geometry and cache
def _position_slide(path, size=256, mpp=0.25):
    """A 2-level pyramidal TIFF whose red channel is x and green channel is y (level-0 pixels)."""
    import tifffile

    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    half = img.reshape(size // 2, 2, size // 2, 2, 3).mean(axis=(1, 3))
    with tifffile.TiffWriter(path) as tif:
        res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tif.write(img, tile=(64, 64), photometric="rgb", subifds=1, metadata=None, **res)
        tif.write(np.round(half).astype(np.uint8), tile=(64, 64), photometric="rgb", subfiletype=1, metadata=None)
    return path


@pytest.mark.parametrize("mpp, level", [(0.25, 1), (0.5, 0), (0.4, 0)])
def test_slide_features_geometry_and_cache(tmp_path, mpp, level):
    """Features of a position encoder equal the level-0 points: right level, pixel-centre rule, resampling."""
    from _encoder_helpers import PositionEncoder

    from napari_denuc.wsi.slide_features import slide_features

    slide = _position_slide(tmp_path / "pos.tif")
    enc = PositionEncoder(stride=8, window=64, overlap=32, mpp=0.5, cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(0)
    xy = rng.uniform(24, 232, (200, 2))
    stats = {}
    f = slide_features(enc, slide, xy, mpp=mpp, stats=stats)
    assert stats["level"] == level
    # the map is the R/G value, i.e. the level-0 coordinate; uint8 rounding of the level-1 means
    # and of the resampled pixels costs up to 0.5 px, plus the resampling's blur near a ramp end
    np.testing.assert_allclose(f, xy, atol=0.75)
    n = enc.windows_encoded
    f2 = slide_features(enc, slide, xy, mpp=mpp)
    assert enc.windows_encoded == n and np.array_equal(f, f2)  # the second query came from the slide's cache
    assert any("slide-" in p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir())
