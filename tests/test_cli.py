"""The command-line tools: --help, the denuc-eval JSON, denuc-predict outputs, one-line errors."""

import json
import subprocess
import sys

import pytest
from paths import BRCA, HAVE_BRCA

from napari_denuc.cli import evaluate, predict, train


def run(module, *args):
    return subprocess.run([sys.executable, "-m", f"napari_denuc.cli.{module}", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("main", [evaluate.main, predict.main, train.main])
def test_help(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_BRCA, reason="BRCA-M2C data not found")
def test_eval_detection_only_json(tmp_path):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--dataset", "brca_m2c", "--root", str(BRCA), "--split", "val", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"dataset", "split", "n_images", "radius_px", "detection", "classes", "f_avg", "seconds"}
    assert res["n_images"] == 10 and res["radius_px"] == 6.0
    assert res["classes"] is None and res["f_avg"] is None
    assert 0.75 < res["detection"]["f1"] <= 1 and set(res["detection"]) == {"precision", "recall", "f1"}


def test_eval_missing_split_is_one_line_error(tmp_path):
    (tmp_path / "images").mkdir()
    r = run("evaluate", "--dataset", "brca_m2c", "--root", tmp_path, "--split", "test")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "held back" in lines[0] and "Traceback" not in r.stderr


def test_predict_sample_and_bad_input(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    r = run("predict", "--sample", bad, "--out", out, "--quiet", "--overlay", "--encoder", "lite", "--geojson-per-class")
    assert r.returncode == 1, r.stderr  # one input failed, the other finished
    assert "broken.png: FAILED" in r.stderr
    stem = "TCGA-A8-A07P-01Z-00-DX1_13001_35001_1000_1000_0.93"
    gj = json.loads((out / f"{stem}.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) > 100
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Point" and f["properties"]["objectType"] == "detection"
    assert {"name", "color"} <= set(f["properties"]["classification"]) and "score" in f["properties"]["measurements"]
    # what QuPath users filter on: score, one probability per class, source and reviewed
    classes = json.loads((out / f"{stem}.summary.json").read_text())["classes"]
    for feat in gj["features"]:
        m = feat["properties"]["measurements"]
        assert set(m) == {"score", "reviewed", "source"} | {f"prob {c}" for c in classes}
        assert abs(sum(m[f"prob {c}"] for c in classes) - 1) < 1e-4 and 0 < m["score"] <= 1
        assert m["reviewed"] == 0 and m["source"] == 0 and feat["properties"]["metadata"] == {"source": "model"}
        best = max(classes, key=lambda c: m[f"prob {c}"])
        assert feat["properties"]["classification"]["name"] == best
    # --geojson-per-class: one file per class, together the whole set
    per_class = {c: json.loads((out / f"{stem}.{c}.geojson").read_text())["features"] for c in classes}
    assert sum(len(v) for v in per_class.values()) == len(gj["features"])
    assert all(ft["properties"]["classification"]["name"] == c for c, v in per_class.items() for ft in v)
    header = (out / f"{stem}.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["x", "y", "class", "score"]
    assert (out / f"{stem}.overlay.png").stat().st_size > 1000


def test_predict_without_inputs_fails_cleanly(tmp_path):
    r = run("predict", "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no inputs" in r.stderr
