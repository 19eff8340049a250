"""Where the shared BRCA-M2C train/val data lives: ``shared/`` sits beside the repository
(CI copies it next to its clone); ``$DENUC_BRCA_ROOT`` overrides."""

import os
from pathlib import Path

_CANDIDATES = [
    os.environ.get("DENUC_BRCA_ROOT", ""),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "brca_m2c",
    "/work/shared/data/brca_m2c",
]
BRCA = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "brca_ds_train.txt").is_file()), Path(_CANDIDATES[1]))
HAVE_BRCA = (BRCA / "brca_ds_train.txt").is_file()
