"""Leave-one-site-out (LOSO) selection of the encoder and head options on BRCA-M2C train+val.

Users' slides come from hospitals that training never saw. BRCA-M2C train+val hold three TCGA
tissue-source sites (A7, A8, AC: the second field of each image name), so every option is
judged by fitting on two sites and scoring on the third; the mean over the three held-out
sites is the headline, the 10-tile val split (same sites as train) is secondary.

    # 1. features once per encoder configuration (resumable: one file per tile)
    python training/loso_heads.py features --config eff0@0.25 [--root ../shared/data/brca_m2c]
    # 2. the option grid on the cached features -> docs/results/loso_heads.json
    python training/loso_heads.py select --config eff0@0.25 --config lite ... [--json OUT]
    # 3. with neighbourhood context (napari_denuc.context) at one or more radii, in um
    python training/loso_heads.py select --config 'eff0@0.5|lite' --context-um 40 --context-um 60

Configurations: ``lite`` (filter bank + bundled detector neck), ``litefb`` (filter bank only),
``eff<v>@<mpp>`` (ImageNet EfficientNet-Lite<v> at working resolution mpp), optionally with a
suffix ``+reinhard`` or ``+macenko`` (inference-time stain normalisation of every tile) or
``+hed`` (training features also from 2 HED-jittered copies of every training tile).
Both scores use the bundled detector's points for end to end (it saw all three sites in
training, so detection is optimistic here; the head options are what this selects).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np



def _cache_dir() -> Path:
    """runs/loso/det-<bundled detector>-neck-<lite's neck> (fingerprints): the caches here hold the
    bundled detector's points (end to end) and features read from the neck, so a new detector or
    neck starts a new folder instead of silently reusing features of the one it replaced."""
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.encoders.lite import bundled_neck, detector_fingerprint

    return Path("runs/loso") / f"det-{detector_fingerprint(load_detector(None).model)}-neck-{detector_fingerprint(bundled_neck().model)}"


RUNS = _cache_dir()
RADIUS_UM = 3.0


def site_of(name: str) -> str:
    return Path(name).name.split("-")[1]


def load_samples(root):
    from napari_denuc.data import load_dataset

    train = load_dataset("brca_m2c", root, "train")
    val = load_dataset("brca_m2c", root, "val")
    return train, val


def build_encoder(config: str, neck):
    from napari_denuc.encoders.effnet import EffNetEncoder
    from napari_denuc.encoders.lite import LiteEncoder

    base = config.split("+")[0]
    if base.startswith("eff0ft-"):  # Lite0 fine-tuned without one site (training/probe_finetune_effnet.py train --holdout SITE)
        import torch

        enc = EffNetEncoder("lite0", mpp=0.5)
        enc.model.load_state_dict(torch.load(Path("runs/finetune_effnet") / base.split("-")[1] / "last.pt", weights_only=True)["model"])
        enc.model.eval().requires_grad_(False)
        return enc
    if base == "lite":
        return LiteEncoder(detector=neck)
    if base == "litefb":
        return LiteEncoder(detector=None)
    if base.startswith("eff"):
        v, mpp = base[3:].split("@")
        stages = (0, 1, 2, 3, 4)
        if ":" in mpp:
            mpp, s = mpp.split(":")
            stages = tuple(int(c) for c in s)
        return EffNetEncoder(f"lite{v}", mpp=float(mpp), stages=stages)
    raise SystemExit(f"unknown configuration {config!r}")


def transform_for(config: str):
    from napari_denuc import stain

    for name in ("reinhard", "macenko"):
        if f"+{name}" in config:
            return getattr(stain, f"{name}_normalize")
    return None


def detections(det, samples):
    """Bundled-detector points per tile (cached)."""
    path = RUNS / "detections.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return {s.name: (z[s.name + "/xy"], z[s.name + "/scores"]) for s in samples}
    out = {}
    for s in samples:
        out[s.name] = det.detect(s.image, s.mpp)
    RUNS.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{k}/xy": v[0] for k, v in out.items()}, **{f"{k}/scores": v[1] for k, v in out.items()})
    return out


def features(config: str, root):
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.detection.augment import hed_jitter
    from napari_denuc.encoders.lite import bundled_neck

    det = load_detector(None)
    train, val = load_samples(root)
    samples = train + val
    dets = detections(det, samples)
    enc = build_encoder(config, bundled_neck())
    tf = transform_for(config)
    out_dir = RUNS / config
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for i, s in enumerate(samples):
        path = out_dir / f"{Path(s.name).stem}.npz"
        if path.is_file():
            continue
        image = tf(s.image) if tf else s.image
        xy_det = dets[s.name][0]
        pts = np.concatenate([s.points, xy_det])
        f = enc.features_at(image, pts, s.mpp)
        extra = {}
        if "+hed" in config:
            rng = np.random.default_rng(i)
            extra = {f"hed{j}": enc.features_at(hed_jitter(s.image, rng), s.points, s.mpp).astype(np.float16) for j in range(2)}
        np.savez(path, gt=f[: len(s.points)].astype(np.float16), det=f[len(s.points):].astype(np.float16), **extra)
        print(f"{config}: {i + 1}/{len(samples)} {s.name} {len(pts)} points, {time.time() - t0:.0f} s", flush=True)
    print(f"{config}: features done in {time.time() - t0:.0f} s ({enc.id}, {enc.feature_dim}-d)")


def load_features(config, samples):
    """Cached features of ``config``; ``a|b`` concatenates two configurations, ``a[i:j]`` keeps
    columns i..j-1 (e.g. to drop a stage without re-encoding)."""
    if "|" in config:
        parts = [load_features(c, samples) for c in config.split("|")]
        return {n: {k: np.concatenate([p[n][k] for p in parts], axis=1) for k in parts[0][n] if all(k in p[n] for p in parts)}
                for n in parts[0]}
    cols = slice(None)
    if config.endswith("]"):
        config, rng = config[:-1].split("[")
        a, b = rng.split(":")
        cols = slice(int(a) if a else None, int(b) if b else None)
    out = {}
    for s in samples:
        z = np.load(RUNS / config / f"{Path(s.name).stem}.npz", allow_pickle=False)
        out[s.name] = {k: z[k][:, cols].astype(np.float32) for k in z.files}
    return out


def add_context(feats, samples, dets, radius_um):
    """Each point's features plus its neighbours' (napari_denuc.context); the neighbours are the
    other points of the same set: ground-truth points for ``gt`` (and its HED copies), detections for ``det``."""
    from napari_denuc.context import with_context

    out = {}
    for s in samples:
        f = feats[s.name]
        out[s.name] = {k: with_context(v, dets[s.name][0] if k == "det" else s.points, s.mpp, radius_um) for k, v in f.items()}
    return out


def fit_head(x, y, names, class_weight, weight_decay):
    from napari_denuc.head import LinearHead

    head = LinearHead(x.shape[1], names)
    head.fit(x, y, class_weight=class_weight, weight_decay=weight_decay)
    return head


def score(head, samples, feats, dets, names):
    from napari_denuc.metrics import PointScorer

    gt_sc, e2e_sc = PointScorer(names), PointScorer(names)
    for s in samples:
        r = RADIUS_UM / s.mpp
        f = feats[s.name]
        gt_sc.add(s.points, s.points, r, None, head.predict(f["gt"]), s.labels)
        xy, sc = dets[s.name]
        e2e_sc.add(xy, s.points, r, sc, head.predict(f["det"]) if len(xy) else np.zeros(0, int), s.labels)
    return gt_sc.result()["f_avg"], e2e_sc.result()["f_avg"]


def training_set(samples, feats, augmented: bool):
    xs, ys = [], []
    for s in samples:
        f = feats[s.name]
        for key in ["gt"] + ([k for k in f if k.startswith("hed")] if augmented else []):
            xs.append(f[key])
            ys.append(s.labels)
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(config, train, val, dets, class_weight, weight_decay, feats, context_um=0.0):
    names = train[0].class_names
    samples = train + val
    sites = sorted({site_of(s.name) for s in samples})
    aug = "+hed" in config
    row = {"config": config, "class_weight": class_weight, "weight_decay": weight_decay, "context_um": context_um, "sites": {}}
    for site in sites:
        fit_on = [s for s in samples if site_of(s.name) != site]
        held = [s for s in samples if site_of(s.name) == site]
        head = fit_head(*training_set(fit_on, feats, aug), names, class_weight, weight_decay)
        gt, e2e = score(head, held, feats, dets, names)
        row["sites"][site] = {"gt_points_f_avg": round(gt, 4), "end_to_end_f_avg": round(e2e, 4), "tiles": len(held)}
    row["loso_gt_points"] = round(float(np.mean([v["gt_points_f_avg"] for v in row["sites"].values()])), 4)
    row["loso_end_to_end"] = round(float(np.mean([v["end_to_end_f_avg"] for v in row["sites"].values()])), 4)
    head = fit_head(*training_set(train, feats, aug), names, class_weight, weight_decay)
    gt, e2e = score(head, val, feats, dets, names)
    row["val_gt_points"], row["val_end_to_end"] = round(gt, 4), round(e2e, 4)
    return row


def select(configs, root, json_out, weight_decays, class_weights, context_ums=(0.0,)):
    from napari_denuc.detection.checkpoint import load_detector

    train, val = load_samples(root)
    dets = detections(load_detector(None), train + val)
    rows = []
    if json_out and Path(json_out).is_file():
        rows = json.loads(Path(json_out).read_text())["rows"]
    done = {(r["config"], r["class_weight"], r["weight_decay"], r.get("context_um", 0.0)) for r in rows}
    for config, ctx in itertools.product(configs, context_ums):
        feats = load_features(config, train + val)
        if ctx:
            feats = add_context(feats, train + val, dets, ctx)
        for cw, wd in itertools.product(class_weights, weight_decays):
            cw = None if cw == "none" else cw
            if (config, cw, wd, ctx) in done:
                continue
            row = evaluate(config, train, val, dets, cw, wd, feats, ctx)
            rows.append(row)
            per_site = "  ".join(f"{k} {v['gt_points_f_avg']:.3f}/{v['end_to_end_f_avg']:.3f}" for k, v in row["sites"].items())
            print(f"{config:>18} ctx={ctx:g} cw={str(cw):8} wd={wd:<6} LOSO gt {row['loso_gt_points']:.4f} e2e {row['loso_end_to_end']:.4f}"
                  f" | {per_site} | val gt {row['val_gt_points']:.4f} e2e {row['val_end_to_end']:.4f}", flush=True)
            if json_out:
                Path(json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(json_out).write_text(json.dumps({"protocol": __doc__.split("\n\n")[0], "rows": rows}, indent=1) + "\n")
    best = max(rows, key=lambda r: r["loso_end_to_end"])
    print("best by LOSO end-to-end f_avg:", json.dumps({k: best[k] for k in best if k != "sites"}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["features", "select"])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--json", default="docs/results/loso_heads.json")
    ap.add_argument("--weight-decay", type=float, action="append")
    ap.add_argument("--class-weight", action="append")
    ap.add_argument("--context-um", type=float, action="append", help="neighbourhood context radius (0 = none)")
    a = ap.parse_args()
    if a.what == "features":
        for c in a.config:
            features(c, a.root)
    else:
        select(a.config, a.root, a.json, a.weight_decay or [0.003, 0.01, 0.03, 0.1], a.class_weight or ["none", "balanced"],
               a.context_um or [0.0])


if __name__ == "__main__":
    main()
