"""npe2 whole-slide reader: lazy multiscale layer with its mpp; plain TIFFs as in-memory images with theirs."""

import numpy as np
import pytest

from napari_denuc import _slide_reader


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from napari_denuc.wsi.synthetic import make_test_slide

    p = tmp_path_factory.mktemp("slide") / "slide.tif"
    make_test_slide(p, 4096, mpp=0.25, seed=2)
    return p


def test_manifest_declares_slide_reader():
    import importlib.resources as r

    from npe2 import PluginManifest

    mf = PluginManifest.from_file(str(r.files("napari_denuc") / "napari.yaml"))
    pats = [set(rd.filename_patterns) for rd in mf.contributions.readers if rd.command == "napari-denuc.get_slide_reader"]
    assert pats == [{"*.svs", "*.ndpi", "*.mrxs", "*.scn", "*.tif", "*.tiff"}]


def test_plain_tiff_opens_in_memory_with_its_mpp_others_declined(tmp_path):
    """The user picked DeNuC in napari's reader choice for a plain tile: it opens (napari's own reader would too)."""
    import tifffile

    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "plain.tif", img, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "tiled.tif", np.zeros((512, 512, 3), np.uint8), tile=(256, 256))  # tiled, one level
    (tmp_path / "x.png").write_bytes(b"")
    for name in ("x.png", "missing.svs"):
        assert _slide_reader.get_reader(str(tmp_path / name)) is None, name
    (data, kw, kind), = _slide_reader.get_reader(str(tmp_path / "plain.tif"))(str(tmp_path / "plain.tif"))
    np.testing.assert_array_equal(data, img)
    assert kind == "image" and kw["rgb"] and not kw.get("multiscale")
    assert kw["metadata"] == {"path": str(tmp_path / "plain.tif"), "mpp": pytest.approx(0.25)}
    (data, kw, _), = _slide_reader.get_reader(str(tmp_path / "tiled.tif"))(str(tmp_path / "tiled.tif"))
    assert data.shape == (512, 512, 3) and "mpp" not in kw["metadata"]


def test_opens_lazily_with_mpp(slide):
    from napari_denuc.wsi.slides import open_slide

    reader = _slide_reader.get_reader(str(slide))
    assert reader is not None
    (data, kw, kind), = reader(str(slide))
    assert kind == "image" and kw["multiscale"] and kw["rgb"]
    assert kw["metadata"]["mpp"] == pytest.approx(0.25) and kw["metadata"]["path"] == str(slide)
    assert kw["metadata"]["slide"]["level_downsamples"][:3] == [1.0, 2.0, 4.0]
    assert [d.shape for d in data][:3] == [(4096, 4096, 3), (2048, 2048, 3), (1024, 1024, 3)]
    # a block of level 1 equals the slide reader's pixels
    block = np.asarray(data[1][300:700, 100:612])
    with open_slide(slide) as src:
        np.testing.assert_array_equal(block, src.read_level(1, 100, 300, 512, 400))


def test_reads_only_requested_chunks(slide):
    lazy, src = _slide_reader.slide_levels(slide)
    assert sum(lv.reads for lv in lazy) == 0  # opening reads no pixels
    block = np.asarray(lazy[0][1100:1200, 2100:2250])
    assert block.shape == (100, 150, 3) and lazy[0].reads == 1 and lazy[0].pixels_read == 100 * 150
    assert sum(lv.reads for lv in lazy[1:]) == 0
    # integer, strided and Ellipsis keys, as numpy would answer them
    np.testing.assert_array_equal(lazy[2][5], src.read_level(2, 0, 5, 1024, 1)[0])
    np.testing.assert_array_equal(lazy[2][..., 1][3:9:2, 7], src.read_level(2, 0, 0, 1024, 9)[3:9:2, 7, 1])
    w, h = src.level_dimensions[-1]
    np.testing.assert_array_equal(np.asarray(lazy[-1]), src.read_level(src.level_count - 1, 0, 0, w, h))


@pytest.mark.napari
def test_viewer_opening_reads_only_displayed_tiles(slide, make_napari_viewer, monkeypatch):
    """Opened in a real viewer (as drag-and-drop does): only the displayed level is read."""
    from qtpy.QtWidgets import QApplication

    read = {}  # level -> pixels read
    real = _slide_reader.LazyLevel.__getitem__

    def counting(self, key):
        out = real(self, key)
        read[self.level] = read.get(self.level, 0) + out.shape[0] * out.shape[1]
        return out

    monkeypatch.setattr(_slide_reader.LazyLevel, "__getitem__", counting)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(slide), plugin="napari-denuc")
    assert layer.multiscale and layer.metadata["mpp"] == pytest.approx(0.25)
    for _ in range(20):
        QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True)
    assert shot.std() > 1  # something was drawn
    # Fitted to the canvas, napari shows level 2 (1024 x 1024) and takes its thumbnail from the
    # smallest level: those are the displayed tiles; the full-resolution levels stay unread.
    assert read.get(0, 0) == 0 and read.get(1, 0) == 0, read
    assert 0 < sum(read.values()) <= 1024**2 + 512**2, read
