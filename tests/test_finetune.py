"""LoRA fine-tuning (peft) on a tiny random ViT: adapters train, merge into plain weights, head predicts."""

import numpy as np
import pytest

pytest.importorskip("peft")

from napari_denuc.data import Sample  # noqa: E402
from napari_denuc.encoders import get_encoder  # noqa: E402
from napari_denuc.encoders.finetune import lora_finetune  # noqa: E402
from napari_denuc.errors import DenucError  # noqa: E402


def _samples():
    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        img = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        pts = rng.uniform(10, 245, (20, 2))
        out.append(Sample(f"s{i}", img, pts, rng.integers(0, 2, 20), ("a", "b"), 0.5))
    return out


def test_lora_trains_and_merges():
    import torch

    enc = get_encoder("timm:vit_tiny_patch16_224", pretrained=False, cache=False, device="cpu")
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    state, w, b, history = lora_finetune(enc, _samples(), ("a", "b"), rank=2, epochs=2, windows_per_epoch=4, lr=1e-2, log=lambda m: None)
    assert set(state) == set(before)  # merged: a plain state dict of the original architecture
    assert not any("lora" in k for k in state)
    qkv = [k for k in state if k.endswith("attn.qkv.weight")]
    assert qkv and any(not torch.allclose(state[k], before[k]) for k in qkv)
    assert w.shape == (2, enc.feature_dim) and len(history) == 2 and history[-1]["loss"] > 0
    feats = enc.features_at(_samples()[0].image, _samples()[0].points, 0.5)
    assert feats.shape == (20, enc.feature_dim) and np.isfinite(feats).all()


def test_lora_refuses_lite():
    with pytest.raises(DenucError, match="ViT"):
        lora_finetune(get_encoder("lite"), _samples(), ("a", "b"))


def test_lora_cli_writes_weights_and_head(tmp_path):
    import torch
    from paths import BRCA, HAVE_BRCA
    from safetensors.torch import save_file

    from napari_denuc.cli.train import main
    from napari_denuc.head import LinearHead

    if not HAVE_BRCA:
        pytest.skip("BRCA-M2C data not found")
    enc = get_encoder("timm:vit_tiny_patch16_224", pretrained=False, cache=False, device="cpu")
    base = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(base))
    out = tmp_path / "lora_head.safetensors"
    torch.manual_seed(0)
    assert main(["head", "--finetune", "lora", "--lora-rank", "2", "--encoder", "timm:vit_tiny_patch16_224",
                 "--encoder-weights", str(base), "--data", f"brca_m2c={BRCA}", "--max-images", "1", "--epochs", "1",
                 "--out", str(out), "--device", "cpu"]) == 0
    tuned = get_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "lora_head.encoder.safetensors"), cache=False)
    head = LinearHead.load(out, encoder=tuned)
    assert head.class_names == ("lymphocyte", "tumor", "stromal")
