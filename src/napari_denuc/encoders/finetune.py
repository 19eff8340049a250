"""LoRA fine-tuning of a ViT encoder together with the linear head (paper Table 3, "Lora").

Low-rank adapters (peft) go on the attention ``qkv`` projections; the encoder reads 224-px
windows centred on annotated nuclei, features are sampled at the nuclei with the same
patch-centre geometry as the frozen query (``grid_sample``, bilinear), and the adapters and
the head learn by cross-entropy. The adapters are then merged into the weights, which are
saved as a plain state dict: use them with ``--encoder NAME --encoder-weights FILE`` and the
head written beside them. Meant for a GPU; on a CPU only tiny models are practical.
"""

from __future__ import annotations

import numpy as np

from ..errors import DenucError
from ..geometry import rescale_points


def _windows(samples, window: int, n: int, rng):
    """``n`` (crop, local points, labels) triples: windows centred on random nuclei."""
    out = []
    pool = [s for s in samples if len(s.points)]
    for _ in range(n):
        s = pool[int(rng.integers(len(pool)))]
        cx, cy = s.points[int(rng.integers(len(s.points)))]
        x0, y0 = int(round(cx)) - window // 2, int(round(cy)) - window // 2
        crop = np.full((window, window, 3), 255, np.uint8)
        h, w = s.image.shape[:2]
        ys, xs, ye, xe = max(0, y0), max(0, x0), min(h, y0 + window), min(w, x0 + window)
        crop[ys - y0 : ye - y0, xs - x0 : xe - x0] = s.image[ys:ye, xs:xe]
        local = s.points - (x0, y0)
        inside = (local >= 0).all(1) & (local <= window - 1).all(1)
        out.append((crop, local[inside], s.labels[inside]))
    return out


def lora_finetune(encoder, samples, class_names, rank: int = 8, epochs: int = 10, windows_per_epoch: int = 64,
                  batch_size: int = 4, lr: float = 1e-4, head_lr: float = 1e-2, seed: int = 0, log=print):
    """Fine-tune ``encoder`` (a TimmEncoder) with LoRA and a linear head on ``samples`` at the encoder's mpp.

    Returns ``(merged_state_dict, head_weight, head_bias, history)``.
    """
    import torch
    import torch.nn.functional as F

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DenucError("LoRA fine-tuning needs peft: pip install 'napari-denuc[finetune]'") from None
    if not hasattr(encoder, "model") or not hasattr(encoder.model, "forward_intermediates"):
        raise DenucError(f"LoRA fine-tuning needs a ViT foundation model encoder, not {encoder.id!r}")
    if any(abs(s.mpp - encoder.mpp) > 1e-3 for s in samples):
        raise DenucError(f"resample the training images to the encoder's {encoder.mpp} mpp first")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = get_peft_model(encoder.model.train(), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["qkv"]))
    head = torch.nn.Linear(encoder.feature_dim, len(class_names)).to(encoder.device)
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
        {"params": head.parameters(), "lr": head_lr},
    ])
    window, p = 224, encoder.stride
    history = []
    for epoch in range(epochs):
        losses = []
        batch = _windows(samples, window, windows_per_epoch, rng)
        for b in range(0, len(batch), batch_size):
            chunk = [c for c in batch[b : b + batch_size] if len(c[1])]
            if not chunk:
                continue
            x = torch.from_numpy(np.stack([c[0] for c in chunk])).to(encoder.device).permute(0, 3, 1, 2).float()
            x = (x - encoder._mean) / encoder._std
            fmap = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[0]
            feats, labels = [], []
            for i, (_, pts, lab) in enumerate(chunk):
                # Token (i, j) covers pixels [j*p, (j+1)*p): its centre, (j + 0.5) * p - 0.5 in pixel
                # coordinates, is the centre of grid_sample's cell j when align_corners=False.
                g = torch.as_tensor((pts + 0.5) / (fmap.shape[-1] * p) * 2 - 1, dtype=fmap.dtype, device=fmap.device)
                feats.append(F.grid_sample(fmap[i : i + 1], g.view(1, 1, -1, 2), align_corners=False)[0, :, 0].T)
                labels.append(torch.as_tensor(lab, device=fmap.device))
            loss = F.cross_entropy(head(torch.cat(feats)), torch.cat(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None})
        log(f"LoRA epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']}")
    merged = model.merge_and_unload().eval().requires_grad_(False)
    encoder.model = merged
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    return state, head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy(), history


def lora_finetune_to_files(encoder_name: str, samples, out, rank: int = 8, epochs: int = 10, lr: float = 0.01,
                           encoder_weights=None, device=None):
    """LoRA-adapt ``encoder_name`` with a head on ``samples`` (any mpp; resampled to the encoder's).

    Writes the merged encoder weights to ``<out stem>.encoder.safetensors`` and the head to
    ``out``; returns ``(weights_path, head_path)``. ``lr`` is the head's learning rate; the
    adapters learn at ``lr / 100``.
    """
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from ..detection.infer import resample
    from ..head import LinearHead
    from . import get_encoder

    if encoder_name == "lite":
        raise DenucError("--finetune lora adapts a ViT foundation model; the lite encoder has no weights to adapt")
    if not samples:
        raise DenucError("LoRA fine-tuning needs training images")
    enc = get_encoder(encoder_name, weights=encoder_weights, device=device, cache=False)
    for s in samples:  # to the encoder's resolution
        k = s.mpp / enc.mpp
        s.image, s.points, s.mpp = resample(s.image, k), rescale_points(s.points, k), enc.mpp
    names = tuple(samples[0].class_names)
    state, w, b, history = lora_finetune(enc, samples, names, rank=rank, epochs=epochs, lr=lr * 1e-2, head_lr=lr)
    out = Path(out)
    weights_path = out.with_name(out.stem + ".encoder.safetensors")
    save_file(state, str(weights_path))
    tuned = get_encoder(encoder_name, weights=str(weights_path), device=device)
    head = LinearHead(tuned.feature_dim, names, encoder_id=tuned.id, mpp=tuned.mpp)  # mean 0, std 1: raw features
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(w))
        head.linear.bias.copy_(torch.from_numpy(b))
    head.save(out, metadata={"training": {"finetune": "lora", "rank": rank, "history": history,
                                          "encoder_weights": weights_path.name}})
    return weights_path, out
