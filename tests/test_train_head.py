"""denuc-train head: one process, and under torchrun (features sharded over 2 ranks) with the same result."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from paths import BRCA, HAVE_BRCA

pytestmark = pytest.mark.skipif(not HAVE_BRCA, reason="BRCA-M2C data not found")
ARGS = ["head", "--encoder", "lite", "--data", f"brca_m2c={BRCA}", "--max-images", "3"]


def _train(out, torchrun=False):
    cmd = [sys.executable, "-m", "napari_denuc.cli.train", *ARGS, "--out", str(out)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_head_training_single_and_torchrun_agree(tmp_path):
    from safetensors.numpy import load_file

    from napari_denuc.head import LinearHead

    r = _train(tmp_path / "one.safetensors")
    assert "val f_avg" in r.stdout + r.stderr and "stromal" in r.stdout
    _train(tmp_path / "two.safetensors", torchrun=True)
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
    head = LinearHead.load(tmp_path / "one.safetensors")
    assert head.class_names == ("lymphocyte", "tumor", "stromal")
    assert head.context_um == 40.0 and head.input_dim == 2 * head.feature_dim + 1  # the CLI's default: neighbourhood context
    side = next(p for p in tmp_path.iterdir() if p.name.startswith("one") and p.suffix == ".json")
    meta = json.loads(side.read_text())
    assert meta["training"]["n_train_points"] > 300
