"""denuc-train detector under torchrun (2 CPU processes, gloo) matches one process with 2 micro-batches."""

import os
import subprocess
import sys

import pytest

from paths import BRCA as DATA

TINY = ["--backbone", "shufflenet_v2_x0_5", "--crop", "64", "--batch-size", "4", "--crops-per-image", "4",
        "--max-images", "2", "--epochs", "2", "--eval-every", "100", "--threads", "1"]


def _params(path):
    from safetensors.torch import load_file

    # Trainable weights only: BatchNorm running statistics are per process under DDP (no SyncBN on CPU).
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.") and "running_" not in k and "num_batches" not in k}


@pytest.mark.skipif(not DATA.is_dir(), reason="BRCA-M2C data not found")
def test_torchrun_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = ["--data", f"brca_m2c={DATA}"]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "napari_denuc.cli.train", "detector", *data, "--out", str(single), "--micro-batches", "2", *TINY],
                   check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "napari_denuc.cli.train", "detector", *data, "--out", str(multi), *TINY],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _params(single / "last.safetensors"), _params(multi / "last.safetensors")
    assert a.keys() == b.keys() and len(a) > 50
    import torch

    start = _params_untrained()
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
        moved += int(not torch.equal(a[k], start[k]))
    assert moved > len(a) // 2  # training really changed the weights


def _params_untrained():
    import torch

    from napari_denuc.detection.model import PointDetector

    torch.manual_seed(0)
    m = PointDetector("shufflenet_v2_x0_5")
    return {f"model.{k}": v for k, v in m.state_dict().items()}
