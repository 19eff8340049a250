"""npe2 sample data: one H&E tile of BRCA-M2C (see sample/ATTRIBUTION.md)."""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_NAME = "TCGA-A8-A07P-01Z-00-DX1_13001_35001_1000_1000_0.93"
SAMPLE_IMAGE = SAMPLE_DIR / f"{SAMPLE_NAME}.png"
SAMPLE_LABELS = SAMPLE_DIR / f"{SAMPLE_NAME}_gt_class_coords.txt"
SAMPLE_MPP = 0.5  # BRCA-M2C tiles are 20x


def make_sample_data():
    """Return the tile as an RGB image layer; its mpp and file path travel in the layer metadata."""
    from .io.images import read_image

    image, _ = read_image(SAMPLE_IMAGE)
    meta = {"mpp": SAMPLE_MPP, "sample": True, "path": str(SAMPLE_IMAGE), "source": "BRCA-M2C (Abousamra et al., ICCV 2021), BSD-3"}
    return [(image, {"name": "BRCA-M2C sample", "rgb": True, "metadata": meta}, "image")]
