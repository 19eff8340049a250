"""Whole-slide batch prediction: tiling, seams, resume, failures, Dask (tiny synthetic slides, fake detector)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiffslide")
pytest.importorskip("pyarrow")

from napari_denuc.errors import DenucError  # noqa: E402
from napari_denuc.wsi import expand_inputs, open_slide, predict_slides  # noqa: E402
from napari_denuc.wsi.synthetic import BlobFactory, make_test_slide  # noqa: E402
from napari_denuc.wsi.tiling import Tile, TilePlan  # noqa: E402

from napari_denuc.wsi.tiling import MaskParams  # noqa: E402

# The test slides are tiny: mask them anyway (by default only inputs over 4096 px are masked).
TILE = dict(tile_size=128, overlap=16, progress=False, mask_params=MaskParams(min_side_px=0))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    gt_a = make_test_slide(d / "a.tif", 1024, seed=1)
    gt_b = make_test_slide(d / "b.tif", (768, 640), seed=2)
    make_test_slide(d / "nompp.tif", 512, mpp=None, seed=3)
    return d, {"a": gt_a, "b": gt_b}


def points(out: Path, stem: str) -> np.ndarray:
    import pandas as pd

    df = pd.read_parquet(out / f"{stem}.parquet")
    return np.array(sorted(map(tuple, df[["x", "y"]].to_numpy())))


def as_set(xy) -> set:
    return {(round(float(x), 3), round(float(y), 3)) for x, y in xy}


def test_synthetic_slide_reads_with_mpp(slides):
    import tiffslide

    d, _ = slides
    with tiffslide.TiffSlide(str(d / "a.tif")) as s:
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert s.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
    src = open_slide(d / "a.tif")
    assert src.reader == "tiffslide" and src.mpp == pytest.approx(0.5)
    tile = src.read_level(0, -10, -10, 40, 40)  # outside the slide: white
    assert tile.shape == (40, 40, 3) and (tile[:10, :10] == 255).all()
    assert open_slide(d / "nompp.tif").mpp is None


def test_folders_and_patterns_leave_out_our_overlays(tmp_path):
    """--out the input folder, --overlay, run twice: the second run must not detect nuclei in its own overlays."""
    for name in ("a.png", "a.overlay.png", "b.jpg", "b.overlay.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p, _ in expand_inputs([str(tmp_path)])] == ["a.png", "b.jpg"]
    assert [p.name for p, _ in expand_inputs([str(tmp_path / "*.png")])] == ["a.png"]
    assert [p.name for p, _ in expand_inputs([str(tmp_path / "a.overlay.png")])] == ["a.overlay.png"]  # named: taken


def test_a_file_of_the_same_name_does_not_replace_anothers_results(tmp_path):
    """hospA/1.tif, then in a later run into the same folder hospB/1.tif: both write 1.*; the second is refused
    with one line (the first's results stay) unless --overwrite."""
    for hosp, seed in (("hospA", 1), ("hospB", 2)):
        make_test_slide(tmp_path / hosp / "1.tif", size=384, seed=seed, min_level_size=384)
    out = tmp_path / "out"
    first = predict_slides([str(tmp_path / "hospA" / "1.tif")], out, BlobFactory(), progress=False)
    kept = (out / "1.csv").read_bytes()
    (res,) = predict_slides([str(tmp_path / "hospB" / "1.tif")], out, BlobFactory(), progress=False).slides
    assert first.ok and res.status == "failed" and "hospA" in res.error and "--overwrite" in res.error
    assert (out / "1.csv").read_bytes() == kept
    again = predict_slides([str(tmp_path / "hospA" / "1.tif")], out, BlobFactory(), progress=False)
    assert again.slides[0].status == "up-to-date"  # the same file: its own results, as before
    assert predict_slides([str(tmp_path / "hospB" / "1.tif")], out, BlobFactory(), progress=False, overwrite=True).ok
    assert (out / "1.csv").read_bytes() != kept


def test_factory_config_names_the_models_the_defaults_resolve_to(monkeypatch):
    """The default encoder turns into UNI2-h once its weights are cached, and an update replaces the bundled
    detector: the resume config must change with them, or old tiles and outputs pass for up to date."""
    import napari_denuc.pipeline as pipeline
    from napari_denuc.wsi.factory import PipelineFactory

    configs = {}
    for name in ("effnet-lite0", "lite"):
        monkeypatch.setattr(pipeline, "default_encoder_name", lambda name=name: name)
        configs[name] = PipelineFactory().config()
    a, b = configs["effnet-lite0"], configs["lite"]
    assert a["encoder"] == "effnet-lite0" and b["encoder"] == "lite"
    assert a["head"]["path"].endswith("effnet_lite0_head.safetensors") and b["head"]["path"].endswith("lite_head.safetensors")
    assert a["detector"]["path"].endswith("detector.safetensors") and a["detector"]["size"] > 0


def test_expand_inputs(slides, tmp_path):
    d, _ = slides
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,mpp\n{d / 'a.tif'},0.25\n{os.path.relpath(d / 'b.tif', tmp_path)},\n")
    items = expand_inputs([str(lst)], mpp=0.5)
    assert items == [(d / "a.tif", 0.25), (Path(tmp_path) / os.path.relpath(d / "b.tif", tmp_path), 0.5)]
    assert [p.name for p, _ in expand_inputs([str(d)])] == ["a.tif", "b.tif", "nompp.tif"]
    assert [p.name for p, _ in expand_inputs([str(d / "[ab].tif"), str(d / "a.tif")])] == ["a.tif", "b.tif"]
    with pytest.raises(DenucError, match="not found"):
        expand_inputs([str(d / "missing.svs")])
    with pytest.raises(DenucError, match="matches no"):
        expand_inputs([str(d / "*.ndpi")])


def test_ownership_partitions_points():
    plan = TilePlan(0, 1.0, (300, 200), 0.5, 128, 16)
    tiles = [Tile(0, 0, 0, 128, 128), Tile(1, 128, 0, 128, 128), Tile(2, 256, 0, 44, 128), Tile(3, 0, 128, 300, 72)]
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.uniform(-3, 303, (2000, 2)) * [1, 205 / 306], [[127.5, 10], [127.49, 10], [-0.6, -0.6], [299.9, 199.9]]])
    owners = np.stack([plan.owned(t, xy) for t in tiles]).sum(0)
    assert (owners == 1).all()


def test_predict_exact_no_seam_duplicates(slides, tmp_path):
    d, gt = slides
    r = predict_slides([d / "a.tif", d / "b.tif"], tmp_path, BlobFactory(), **TILE)
    assert r.ok and r.exit_code == 0, [s.error for s in r.slides]
    for stem in "ab":
        got = points(tmp_path, stem)
        assert len(got) == len(gt[stem]) == len(as_set(got))  # no duplicates at seams
        assert as_set(got) == as_set(gt[stem])  # every nucleus, in level-0 pixels
        s = json.loads((tmp_path / f"{stem}.summary.json").read_text())
        assert s["n_nuclei"] == len(got) and sum(s["counts"].values()) == len(got)
        assert s["n_tiles_background"] > 0 and s["n_tiles_tissue"] + s["n_tiles_background"] == s["n_tiles"]
        assert s["mpp"] == pytest.approx(0.5) and s["level"] == 0 and set(s["timings_s"]) >= {"plan", "tiles", "total"}
        assert (tmp_path / f"{stem}.geojson").is_file() and (tmp_path / f"{stem}.csv").is_file()
        assert not (tmp_path / f".{stem}.tiles").exists()  # cleaned up after success
    import pandas as pd

    df = pd.read_parquet(tmp_path / "a.parquet")
    assert list(df.columns) == ["x", "y", "class", "score", "prob_tumour", "prob_other", "source", "reviewed"]
    assert set(df["source"]) == {"model"} and not df["reviewed"].any()
    from napari_denuc.io.csv import read_csv
    from napari_denuc.io.geojson import read_geojson

    assert as_set(read_geojson(tmp_path / "a.geojson").xy) == as_set(gt["a"])
    assert len(read_csv(tmp_path / "a.csv")) == len(gt["a"])
    # a second run finds everything up to date
    r2 = predict_slides([d / "a.tif"], tmp_path, BlobFactory(), **TILE)
    assert r2.ok and r2.slides[0].status == "up-to-date"


def test_coarser_level_and_gzip(slides, tmp_path):
    d, gt = slides
    r = predict_slides([(d / "a.tif", None)], tmp_path, BlobFactory(target_mpp=1.0, threshold=150), gzip=True, formats=("geojson", "parquet"), **TILE)
    assert r.ok, r.slides[0].error
    s = r.slides[0].summary
    assert s["level"] == 1 and s["level_mpp"] == pytest.approx(1.0)
    assert (tmp_path / "a.geojson.gz").is_file() and not (tmp_path / "a.csv").exists()
    got = points(tmp_path, "a")
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(got).query(gt["a"])
    assert len(got) == len(gt["a"]) and dist.max() < 1.5  # level-1 positions mapped back to level 0


def test_missing_mpp_and_bad_slides_are_reported(slides, tmp_path):
    d, _ = slides
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + os.urandom(2000))
    r = predict_slides([d / "nompp.tif", bad, d / "b.tif"], tmp_path / "out", BlobFactory(), **TILE)
    status = {s.stem: s for s in r.slides}
    assert not r.ok and r.exit_code == 1 and len(r.failed) == 2
    assert status["nompp"].status == "failed" and "--mpp" in status["nompp"].error
    assert status["broken"].status == "failed" and "broken.svs" in status["broken"].error
    assert status["b"].status == "done" and (tmp_path / "out" / "b.parquet").is_file()
    # the mpp given (e.g. --mpp) makes the resolution-less slide work
    r = predict_slides([d / "nompp.tif"], tmp_path / "out", BlobFactory(), mpp=0.5, **TILE)
    assert r.ok and r.slides[0].summary["mpp_source"] == "--mpp"
    # --mpp doesn't override a file's own resolution; a per-input mpp (CSV column) does
    r = predict_slides([d / "b.tif", (d / "a.tif", 0.25)], tmp_path / "out2", BlobFactory(), mpp=1.0, **TILE)
    assert [(s.summary["mpp_source"], s.summary["mpp"]) for s in r.slides] == [("metadata", 0.5), ("input", 0.25)]


def test_corrupt_tile_fails_that_slide_only(slides, tmp_path):
    import tifffile

    d, _ = slides
    path = tmp_path / "torn.tif"
    make_test_slide(path, 1024, seed=1)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        k = len(page.dataoffsets) // 2 + 1  # a level-0 tile in the tissue
        off, n = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * n)
    r = predict_slides([path, d / "b.tif"], tmp_path, BlobFactory(), tile_size=256, overlap=16, progress=False)
    assert [s.status for s in r.slides] == ["failed", "done"]
    assert "tile" in r.slides[0].error and not (tmp_path / "torn.parquet").exists()


def test_resume_after_interrupt(slides, tmp_path):
    d, _ = slides
    ref = tmp_path / "ref"
    assert predict_slides([d / "a.tif"], ref, BlobFactory(), **TILE).ok

    class Stop(KeyboardInterrupt):
        pass

    def stop_after(n):
        def hook(stem, index, count):
            if count >= n:
                raise Stop

        return hook

    out = tmp_path / "out"
    with pytest.raises(Stop):
        predict_slides([d / "a.tif"], out, BlobFactory(), on_tile=stop_after(10), **TILE)
    assert len(list((out / ".a.tiles").glob("tile_*.npz"))) == 10 and not (out / "a.parquet").exists()
    # a different config doesn't reuse the stale tiles
    with pytest.raises(Stop):
        predict_slides([d / "a.tif"], out, BlobFactory(threshold=141), on_tile=stop_after(3), **TILE)
    assert len(list((out / ".a.tiles").glob("tile_*.npz"))) == 3
    with pytest.raises(Stop):
        predict_slides([d / "a.tif"], out, BlobFactory(), on_tile=stop_after(7), **TILE)
    r = predict_slides([d / "a.tif"], out, BlobFactory(), **TILE)
    s = r.slides[0].summary
    assert r.ok and s["n_tiles_reused"] == 7 and s["n_tiles_computed"] == s["n_tiles_tissue"] - 7
    assert np.array_equal(points(out, "a"), points(ref, "a"))


def test_resume_after_kill(slides, tmp_path):
    """SIGKILL a real run part-way, start it again: same points as an uninterrupted run."""
    d, _ = slides
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        from napari_denuc.wsi import predict_slides
        from napari_denuc.wsi.tiling import MaskParams
        from napari_denuc.wsi.synthetic import BlobFactory
        predict_slides([{str(d / 'a.tif')!r}], {str(out)!r}, BlobFactory(delay=0.1), tile_size=128, overlap=16, progress=False,
                       mask_params=MaskParams(min_side_px=0))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    tiles = out / ".a.tiles"
    t0 = time.time()
    try:
        while len(list(tiles.glob("tile_*.npz"))) < 8:
            assert proc.poll() is None and time.time() - t0 < 30, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_done = len(list(tiles.glob("tile_*.npz")))
    assert not (out / "a.parquet").exists()
    r = predict_slides([d / "a.tif"], out, BlobFactory(), **TILE)
    assert r.ok and r.slides[0].summary["n_tiles_reused"] == n_done >= 8
    ref = predict_slides([d / "a.tif"], tmp_path / "ref", BlobFactory(), **TILE)
    assert ref.ok and np.array_equal(points(out, "a"), points(tmp_path / "ref", "a"))


def test_plain_image_input(slides, tmp_path):
    from PIL import Image

    d, gt = slides
    src = open_slide(d / "b.tif")
    w, h = src.dimensions
    Image.fromarray(src.read_level(0, 0, 0, w, h)).save(tmp_path / "plain.png")
    r = predict_slides([tmp_path / "plain.png"], tmp_path / "out", BlobFactory(), mpp=0.5, **TILE)
    assert r.ok and r.slides[0].summary["reader"] == "image"
    assert as_set(points(tmp_path / "out", "plain")) == as_set(gt["b"])


def test_dask_local_cluster_matches_single_process(slides, tmp_path):
    pytest.importorskip("distributed")
    from napari_denuc.wsi import make_client

    d, _ = slides
    inputs = [d / "a.tif", d / "nompp.tif", d / "b.tif"]
    local = predict_slides(inputs, tmp_path / "local", BlobFactory(), **TILE)
    client, cluster = make_client(None, n_workers=2)
    try:
        assert len(client.nthreads()) == 2 and set(client.nthreads().values()) == {1}
        dist = predict_slides(inputs, tmp_path / "dask", BlobFactory(), client=client, tiles_in_flight=3, **TILE)
    finally:
        client.close()
        cluster.close()
    assert [s.status for s in dist.slides] == [s.status for s in local.slides] == ["done", "failed", "done"]
    assert "--mpp" in dist.slides[1].error
    for stem in "ab":
        assert np.array_equal(points(tmp_path / "dask", stem), points(tmp_path / "local", stem))
        sd = json.loads((tmp_path / "dask" / f"{stem}.summary.json").read_text())
        sl = json.loads((tmp_path / "local" / f"{stem}.summary.json").read_text())
        assert sd["counts"] == sl["counts"] and sd["config_hash"] == sl["config_hash"]


def test_openslide_reader_matches_tiffslide(slides, tmp_path):
    """Formats only OpenSlide reads (NDPI, MRXS...) go through OpenSlideSource; here a generic
    tiled TIFF under an .ndpi name, read by OpenSlide, must give tiffslide's pixels and points."""
    pytest.importorskip("openslide")
    import shutil

    from napari_denuc.wsi.slides import OpenSlideSource, TiffSlideSource

    d, gt = slides
    a, b = TiffSlideSource(d / "a.tif"), OpenSlideSource(d / "a.tif")
    assert b.mpp == pytest.approx(a.mpp) and b.level_dimensions[0] == a.level_dimensions[0]
    assert np.array_equal(a.read_level(0, -5, 30, 120, 90), b.read_level(0, -5, 30, 120, 90))
    ndpi = tmp_path / "a.ndpi"
    shutil.copy(d / "a.tif", ndpi)
    assert open_slide(ndpi).reader == "openslide"
    r = predict_slides([ndpi], tmp_path / "out", BlobFactory(), **TILE)
    assert r.ok, [s.error for s in r.slides]
    assert as_set(points(tmp_path / "out", "a")) == as_set(gt["a"])


def test_geojson_per_class_files(slides, tmp_path):
    from napari_denuc.io.geojson import read_geojson

    d, gt = slides
    r = predict_slides([d / "a.tif"], tmp_path, BlobFactory(), formats=("geojson",), geojson_per_class=True, **TILE)
    assert r.ok, r.slides[0].error
    whole = read_geojson(tmp_path / "a.geojson")
    counts = r.slides[0].summary["counts"]
    assert sum(counts.values()) == len(whole) == len(gt["a"])
    for k, name in enumerate(whole.class_names):
        one = read_geojson(tmp_path / f"a.{name}.geojson")
        assert set(one.class_names) <= {name} and len(one) == counts[name]
        assert as_set(one.xy) == as_set(whole.xy[whole.class_ids == k])
    assert set(r.slides[0].outputs) == {"geojson"} | {f"geojson:{n}" for n in whole.class_names}
    # up to date only while the per-class files are there
    (tmp_path / f"a.{whole.class_names[0]}.geojson").unlink()
    r2 = predict_slides([d / "a.tif"], tmp_path, BlobFactory(), formats=("geojson",), geojson_per_class=True, **TILE)
    assert r2.slides[0].status == "done" and (tmp_path / f"a.{whole.class_names[0]}.geojson").is_file()
    with pytest.raises(DenucError, match="geojson"):
        predict_slides([d / "a.tif"], tmp_path, BlobFactory(), formats=("csv",), geojson_per_class=True, **TILE)


def test_per_class_names_are_file_safe(tmp_path):
    from napari_denuc.wsi.outputs import per_class_path

    assert per_class_path(tmp_path / "s.geojson.gz", "Tumor: Positive").name == "s.Tumor_Positive.geojson.gz"
    assert per_class_path(tmp_path / "s.geojson", "../x").name == "s._x.geojson"


def _synthetic_chunks(n_chunks, per_chunk=1000):
    from napari_denuc.results import Detections

    def chunks():
        rng = np.random.default_rng(0)
        for _ in range(n_chunks):
            p = rng.random((per_chunk, 3)).astype(np.float32)
            yield Detections(rng.random((per_chunk, 2)) * 1e5, rng.random(per_chunk), p.argmax(1), ("a", "b", "c"), probs=p / p.sum(1, keepdims=True))

    return chunks


def test_outputs_stream_in_memory_independent_of_nucleus_count(tmp_path, monkeypatch):
    """Peak traced memory of writing all formats is the same for 5 and 20 chunks (one tile at a time)."""
    import tracemalloc

    import pandas as pd

    from napari_denuc.io.csv import read_csv
    from napari_denuc.io.geojson import read_geojson
    from napari_denuc.wsi import outputs
    from napari_denuc.wsi.outputs import output_paths, write_outputs

    monkeypatch.setattr(outputs, "PARQUET_ROW_GROUP", 2000)  # so 20 chunks span several row groups
    peaks = {}
    for n in (5, 20):
        paths = output_paths(tmp_path / str(n), "s", gzip=True)
        tracemalloc.start()
        write_outputs(paths, _synthetic_chunks(n), gzip=True)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(pd.read_parquet(paths["parquet"])) == n * 1000
        assert len(read_csv(paths["csv"])) == n * 1000
        assert len(read_geojson(paths["geojson"])) == n * 1000
    # holding 20000 features' text alone would take > 6 MB; the writers stay at one chunk's worth
    assert peaks[20] < 1.25 * peaks[5], peaks


def test_set_threads_limits_loaded_pools():
    """After numpy and torch are loaded, env vars no longer matter: the limits must still hold."""
    code = textwrap.dedent(
        """
        import json, numpy, torch
        from threadpoolctl import threadpool_info
        from napari_denuc.wsi.worker import set_threads
        before = torch.get_num_threads()
        set_threads(1)
        print(json.dumps({"before": before, "torch": torch.get_num_threads(),
                          "pools": [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["torch"] == 1
    assert info["pools"] and all(n == 1 for _, n in info["pools"]), info
    if os.cpu_count() > 1:
        assert info["before"] > 1  # the limit did something


def test_batch_size_reaches_the_detector_without_patching():
    from napari_denuc.pipeline import Pipeline
    from napari_denuc.wsi.factory import PipelineFactory

    calls = []

    class Recorder:
        tau, nms_um = 0.5, 2.0

        def detect(self, image, mpp, **kw):
            calls.append(kw)
            return np.zeros((0, 2)), np.zeros(0, np.float32)

    Pipeline(Recorder(), detect_options={"batch_size": 3}).run(np.zeros((8, 8, 3), np.uint8), 0.5)
    assert calls[0]["batch_size"] == 3
    pipe = PipelineFactory(encoder="lite", batch_size=5).pipeline()
    assert pipe.detect_options == {"batch_size": 5} and "detect" not in vars(pipe.detector)
