"""Probe (issue 9): does normalising each tile's point features by that tile's own statistics
(unsupervised test-time adaptation: nothing but the image is needed) classify better at an
unseen site?

A new hospital's stain and scanner move every feature by a tile-wide offset; a linear head
trained at other sites reads that offset as a class change (most errors at a held-out site go
to "stromal": docs/benchmarks.md). Here every tile's features (its ground-truth points' and its
detections') are centred on the mean of the features at *that tile's detections* (what a user's
slide gives without labels), optionally scaled by their standard deviation, before the context
features and the head. The head is fitted on normalised features of two sites and scored on the
third (leave-one-site-out, ``training/loso_heads.py``'s caches and scorer), as shipped: 40 um
context, no class weights, weight decay 0.1.

    python training/probe_tile_norm.py --config 'eff0ft-{site}|lite' [--json docs/results/probes/tile_norm.json]

Modes: ``none``; ``tile-mean`` (subtract the tile's mean); ``tile-z`` (and divide by its
standard deviation); ``site-mean`` (subtract the mean over all tiles of the tile's site: a
slide-level statistic); ``tile-mean+raw`` (the centred features beside the raw ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import loso_heads as L  # noqa: E402

SITES = ("A7", "A8", "AC")
MODES = ("none", "tile-mean", "tile-z", "site-mean", "tile-mean+raw")


def normalise(feats, samples, mode):
    """{tile: {key: array}} with every tile's features centred (and scaled) by ``mode``."""
    if mode == "none":
        return feats
    stats = {}
    for s in samples:
        d = feats[s.name]["det"]
        stats[s.name] = (d.mean(0), d.std(0) + 1e-3, len(d))
    if mode == "site-mean":
        for site in SITES:
            tiles = [s.name for s in samples if L.site_of(s.name) == site]
            n = sum(stats[t][2] for t in tiles)
            mean = sum(stats[t][0] * stats[t][2] for t in tiles) / n
            for t in tiles:
                stats[t] = (mean, stats[t][1], n)
    out = {}
    for s in samples:
        mean, std, _ = stats[s.name]
        out[s.name] = {}
        for k, v in feats[s.name].items():
            z = v - mean
            if mode == "tile-z":
                z = z / std
            out[s.name][k] = np.concatenate([z, v], axis=1) if mode.endswith("+raw") else z
    return out


def run(config, root, modes, context_um, class_weight, weight_decay):
    from napari_denuc.detection.checkpoint import load_detector

    train_s, val_s = L.load_samples(root)
    samples = train_s + val_s
    names = train_s[0].class_names
    dets = L.detections(load_detector(None), samples)
    rows = []
    for mode in modes:
        per_site = {}
        for site in SITES:
            raw = L.load_features(config.format(site=site), samples)
            feats = L.add_context(normalise(raw, samples, mode), samples, dets, context_um)
            fit_on = [s for s in samples if L.site_of(s.name) != site]
            head = L.fit_head(*L.training_set(fit_on, feats, False), names, class_weight, weight_decay)
            gt, e2e = L.score(head, [s for s in samples if L.site_of(s.name) == site], feats, dets, names)
            per_site[site] = {"gt_points_f_avg": round(gt, 4), "end_to_end_f_avg": round(e2e, 4)}
        gt, e2e = (round(float(np.mean([v[k] for v in per_site.values()])), 4) for k in ("gt_points_f_avg", "end_to_end_f_avg"))
        rows.append({"config": config, "mode": mode, "sites": per_site, "loso_gt_points": gt, "loso_end_to_end": e2e})
        print(f"{config} {mode:14} LOSO gt {gt:.4f} e2e {e2e:.4f} | "
              + "  ".join(f"{k} {v['gt_points_f_avg']:.3f}/{v['end_to_end_f_avg']:.3f}" for k, v in per_site.items()), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True, help="loso_heads cache configuration; {site} = the held-out site")
    ap.add_argument("--mode", action="append", choices=MODES)
    ap.add_argument("--context-um", type=float, default=40.0)
    ap.add_argument("--class-weight", default="none")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--json")
    a = ap.parse_args()
    cw = None if a.class_weight == "none" else a.class_weight
    rows = [r for c in a.config for r in run(c, a.root, a.mode or MODES, a.context_um, cw, a.weight_decay)]
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"protocol": __doc__.split("\n\n")[0], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
