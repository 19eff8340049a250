"""Probe (issue 9): can a new site's corrections carry to its *other* slides if they adapt the
encoder, not only the linear head?

``bench_adapt.py`` showed that no update of the linear head from two tiles of a site lifts
``f_avg`` on the site's other tiles by more than a few thousandths, even a full refit on every
nucleus of the two tiles (the "refit ceiling"). This is the same ceiling with the encoder
adapted too: for each site S, the fold's fine-tuned Lite0 (``probe_finetune_effnet.py train
--holdout S``: it never saw S) is fine-tuned further on 2 tiles of S (all their nuclei labelled)
mixed half and half with crops of the other two sites, with the recipe's augmentation; every
tile is re-encoded, the shipped head recipe (+ ``lite``, 40 um context, no class weights, weight
decay 0.1) is fitted on the other sites plus the 2 tiles, and end-to-end ``f_avg`` (bundled
detector's points) is scored on S's other tiles. Compared with the starting head and with the
linear refit on the same nuclei. The 2 tiles are bench_adapt's draws (``default_rng(rep)``).

    python training/probe_encoder_adapt.py [--steps 150] [--reps 1] [--json docs/results/probes/encoder_adapt.json]
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
import probe_finetune_effnet as F  # noqa: E402

SITES = ("A7", "A8", "AC")


def adapt(state, user, others, steps, lr, seed):
    """The fold's network and linear layer trained ``steps`` more batches: half crops of the user's tiles."""
    import torch

    from napari_denuc.detection.augment import Augment

    torch.manual_seed(seed)
    model = F._model()
    model.load_state_dict(state["model"])
    strides = tuple(int(r) for r in model.feature_info.reduction())
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(512, affine=False), torch.nn.Linear(512, 3))
    head.load_state_dict(state["head"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": 10 * lr}], weight_decay=1e-4)
    counts = np.bincount(np.concatenate([s.labels for s in user + others]), minlength=3)
    weight = torch.tensor(counts.sum() / (3 * np.maximum(counts, 1)), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    aug = Augment.preset("travel")
    for step in range(steps):
        pool = [user if i % 2 == 0 else others for i in range(F.BATCH)]
        batch = [F._crop(p[int(rng.integers(len(p)))], rng, aug) for p in pool]
        loss = F.batch_loss(model, head, batch, strides, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def encode(model, samples, dets, lite):
    """{tile: {"gt", "det"}}: the adapted network's 512 features beside the cached ``lite`` ones."""
    from napari_denuc.encoders.effnet import EffNetEncoder

    enc = EffNetEncoder("lite0", mpp=0.5)
    enc.model.load_state_dict(model.state_dict())
    enc.model.eval().requires_grad_(False)
    out = {}
    for s in samples:
        f = enc.features_at(s.image, np.concatenate([s.points, dets[s.name][0]]), s.mpp)
        n = len(s.points)
        out[s.name] = {"gt": np.concatenate([f[:n], lite[s.name]["gt"]], 1), "det": np.concatenate([f[n:], lite[s.name]["det"]], 1)}
    return out


def main():
    import torch

    from napari_denuc.detection.checkpoint import load_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--site", action="append", choices=SITES, help="held-out site(s) (default: all three)")
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    train_s, val_s = L.load_samples(a.root)
    samples = train_s + val_s
    names = train_s[0].class_names
    dets = L.detections(load_detector(None), samples)
    lite = L.load_features("lite", samples)
    rows = []
    for site in a.site or SITES:
        state = torch.load(F.OUT / site / "last.pt", weights_only=True)
        others = [s for s in samples if L.site_of(s.name) != site]
        tiles = sorted((s for s in samples if L.site_of(s.name) == site), key=lambda s: s.name)
        base = L.add_context(L.load_features(f"eff0ft-{site}|lite", samples), samples, dets, 40.0)
        for rep in range(a.reps):
            pick = np.random.default_rng(rep).choice(len(tiles), size=2, replace=False)
            user = [tiles[i] for i in pick]
            test = [t for i, t in enumerate(tiles) if i not in pick]

            def e2e(feats, fit_on):
                head = L.fit_head(*L.training_set(fit_on, feats, False), names, None, 0.1)
                return L.score(head, test, feats, dets, names)[1]

            t0 = time.time()
            start, refit = e2e(base, others), e2e(base, others + user)
            model = adapt(state, user, others, a.steps, a.lr, seed=rep)
            feats = L.add_context(encode(model, samples, dets, lite), samples, dets, 40.0)
            adapted, adapted_start = e2e(feats, others + user), e2e(feats, others)
            row = {"site": site, "rep": rep, "user_tiles": [u.name for u in user], "user_nuclei": int(sum(len(u.points) for u in user)),
                   "start": round(start, 4), "d_linear_refit": round(refit - start, 4), "d_encoder_and_head": round(adapted - start, 4),
                   "d_encoder_only": round(adapted_start - start, 4), "seconds": round(time.time() - t0)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for k in ("d_linear_refit", "d_encoder_and_head", "d_encoder_only"):
        print(f"{k}: mean {np.mean([r[k] for r in rows]):+.4f}, worst {np.min([r[k] for r in rows]):+.4f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"protocol": __doc__.split("\n\n")[0], "steps": a.steps, "lr": a.lr, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
