"""io/images.py: array conversion and reading files with their resolution."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_denuc.errors import DenucError
from napari_denuc.io.images import as_rgb_uint8, read_image


def test_grayscale():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = as_rgb_uint8(g)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out == g[..., None]).all()
    assert (as_rgb_uint8(g[..., None]) == out).all()


def test_rgba_composited_on_white():
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (10, 20, 30, 255)  # opaque
    a[0, 1] = (10, 20, 30, 0)  # transparent -> white
    a[0, 2] = (0, 0, 0, 128)  # half -> mid grey
    out = as_rgb_uint8(a)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_channels_first():
    a = np.zeros((3, 5, 6), np.uint8)
    a[1] = 7
    out = as_rgb_uint8(a)
    assert out.shape == (5, 6, 3) and (out[..., 1] == 7).all()


def test_16_bit():
    a = np.array([[0, 257, 65535]], np.uint16)
    assert as_rgb_uint8(a)[0, :, 0].tolist() == [0, 1, 255]


def test_float_ranges():
    assert as_rgb_uint8(np.array([[0.0, 0.5, 1.0]]))[0, :, 0].tolist() == [0, 128, 255]
    assert as_rgb_uint8(np.array([[0.0, 2.4, 254.6]], np.float32))[0, :, 0].tolist() == [0, 2, 255]
    for bad in ([[-0.1, 0.5]], [[0.0, 300.0]], [[np.nan, 0.5]], [[np.inf, 0.5]]):
        with pytest.raises(DenucError):
            as_rgb_uint8(np.array(bad))


def test_other_integer_types():
    assert as_rgb_uint8(np.array([[0, 255]], np.int32))[0, :, 0].tolist() == [0, 255]
    with pytest.raises(DenucError, match="8-bit"):
        as_rgb_uint8(np.array([[0, 1000]], np.int32))
    assert as_rgb_uint8(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]


@pytest.mark.parametrize("shape", [(0, 0), (0, 5, 3), (5, 0, 3), (0,), (5, 5, 2), (2, 3, 4, 5)])
def test_empty_or_wrong_shape(shape):
    with pytest.raises(DenucError):
        as_rgb_uint8(np.zeros(shape, np.uint8))


def test_png_and_jpeg_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img, mpp = read_image(tmp_path / "a.png")
    assert (img == rgb).all() and mpp is None
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "g16.png")  # 16-bit grey PNG
    img, _ = read_image(tmp_path / "g16.png")
    assert img.shape == (4, 4, 3) and (img == 4).all()
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # CMYK is not RGBA
    img, _ = read_image(tmp_path / "cmyk.jpg")
    assert img.shape == (4, 5, 3) and img.min() > 240
    Image.new("P", (3, 3)).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[0].shape == (3, 3, 3)


def test_non_image_and_missing_files(tmp_path):
    (tmp_path / "a.png").write_text("this is not a PNG")
    with pytest.raises(DenucError, match="cannot read"):
        read_image(tmp_path / "a.png")
    (tmp_path / "b.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DenucError):
        read_image(tmp_path / "b.tif")
    with pytest.raises(DenucError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_tiff_resolution(tmp_path):
    a = np.zeros((8, 8, 3), np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", a, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", a, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "screen.tif", a, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", a)
    tifffile.imwrite(tmp_path / "svs.tif", a, description="Aperio Image Library v12\n100x100 | AppMag = 40 | MPP = 0.2520")
    tifffile.imwrite(tmp_path / "ij.tif", a[..., 0], imagej=True, resolution=(4.0, 4.0), metadata={"unit": "micron"})
    assert read_image(tmp_path / "cm.tif")[1] == pytest.approx(0.25)
    assert read_image(tmp_path / "inch.tif")[1] == pytest.approx(0.5)
    assert read_image(tmp_path / "screen.tif")[1] is None  # a screen default, not a scan resolution
    assert read_image(tmp_path / "none.tif")[1] is None
    assert read_image(tmp_path / "svs.tif")[1] == pytest.approx(0.252)
    img, mpp = read_image(tmp_path / "ij.tif")
    assert mpp == pytest.approx(0.25) and img.shape == (8, 8, 3)
    tifffile.imwrite(tmp_path / "u16.tif", np.full((4, 4, 3), 65535, np.uint16))
    assert (read_image(tmp_path / "u16.tif")[0] == 255).all()


def test_ome_tiff_resolution(tmp_path):
    """QuPath's and bfconvert's OME-TIFF state the pixel size in the OME-XML (PhysicalSizeX), not in resolution tags."""
    from napari_denuc.wsi.slides import open_slide

    a = np.zeros((512, 768, 3), np.uint8)
    for name, size, unit, expected in (("um", 0.2527, "µm", 0.2527), ("nm", 505.4, "nm", 0.5054), ("default", 0.5, None, 0.5)):
        meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
        if unit:
            meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
        path = tmp_path / f"{name}.ome.tif"
        with tifffile.TiffWriter(path) as tif:  # pyramidal, as QuPath exports it
            tif.write(a, subifds=1, tile=(256, 256), photometric="rgb", metadata=meta)
            tif.write(a[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb")
        assert read_image(path)[1] == pytest.approx(expected)
        with open_slide(path) as slide:
            assert slide.level_count == 2 and slide.mpp == pytest.approx(expected)
