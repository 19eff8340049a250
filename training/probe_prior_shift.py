"""Probe (issue 9): does re-estimating the class mix of each new slide help on unseen sites?

Saerens, Latinne and Decaestecker (2002): the head's posteriors assume the class mix it was
trained for; EM re-estimates a slide's own mix from the head's posteriors on that slide alone
(no labels) and re-weights them by new mix / training mix. Scored under leave-one-site-out on the
cached features of training/loso_heads.py (shipped options: eff0@0.5|lite, 40 um context,
balanced, weight decay 0.3), per tile and per site, with the training mix taken as uniform
(balanced weights train for it) or as the training sites' frequencies, and shrunk toward it by
``--shrink`` pseudo-counts.

    python training/probe_prior_shift.py [--json docs/results/probes/prior_shift.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import loso_heads as L  # noqa: E402


def em_prior(p, train_prior, shrink=0.0, iters=100):
    """A slide's class mix by EM on its posteriors ``p`` (N, K) made under ``train_prior``; the
    estimate is shrunk toward ``train_prior`` by ``shrink`` pseudo-nuclei."""
    prior = train_prior.copy()
    for _ in range(iters):
        q = p * (prior / train_prior)
        q /= q.sum(axis=1, keepdims=True)
        new = (q.sum(axis=0) + shrink * train_prior) / (len(p) + shrink)
        if np.abs(new - prior).max() < 1e-6:
            break
        prior = new
    return prior


def adjust(p, train_prior, prior):
    q = p * (prior / train_prior)
    return q / q.sum(axis=1, keepdims=True)


def main():
    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.metrics import PointScorer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--config", default="eff0@0.5|lite")
    ap.add_argument("--json")
    a = ap.parse_args()
    train, val = L.load_samples(a.root)
    samples = train + val
    dets = L.detections(load_detector(None), samples)
    feats = L.add_context(L.load_features(a.config, samples), samples, dets, 40.0)
    names = train[0].class_names
    k = len(names)
    variants = [("none", None, None, 0)] + [(f"{unit} mix, {prior} training mix, shrink {s}", unit, prior, s)
                                            for unit in ("tile", "site") for prior in ("uniform", "empirical") for s in (0, 100, 1000)]
    rows = {v[0]: {} for v in variants}
    for site in sorted({L.site_of(s.name) for s in samples}):
        fit_on = [s for s in samples if L.site_of(s.name) != site]
        held = [s for s in samples if L.site_of(s.name) == site]
        x, y = L.training_set(fit_on, feats, False)
        head = L.fit_head(x, y, names, "balanced", 0.3)
        freq = np.bincount(y, minlength=k) / len(y)
        probs = {s.name: {key: head.predict_proba(feats[s.name][key]) for key in ("gt", "det")} for s in held}
        for label, unit, prior_kind, shrink in variants:
            gt_sc, e2e_sc = PointScorer(names), PointScorer(names)
            tp = np.full(k, 1.0 / k) if prior_kind != "empirical" else freq
            site_prior = {key: em_prior(np.concatenate([probs[s.name][key] for s in held]), tp, shrink) for key in ("gt", "det")} \
                if unit == "site" else None
            for s in held:
                r = L.RADIUS_UM / s.mpp
                pred = {}
                for key in ("gt", "det"):
                    p = probs[s.name][key]
                    if unit is not None and len(p):
                        p = adjust(p, tp, site_prior[key] if unit == "site" else em_prior(p, tp, shrink))
                    pred[key] = p.argmax(axis=1) if len(p) else np.zeros(0, int)
                gt_sc.add(s.points, s.points, r, None, pred["gt"], s.labels)
                xy, sc = dets[s.name]
                e2e_sc.add(xy, s.points, r, sc, pred["det"], s.labels)
            rows[label][site] = (round(gt_sc.result()["f_avg"], 4), round(e2e_sc.result()["f_avg"], 4))
    out = []
    for label, per_site in rows.items():
        gt = float(np.mean([v[0] for v in per_site.values()]))
        e2e = float(np.mean([v[1] for v in per_site.values()]))
        out.append({"variant": label, "sites": per_site, "loso_gt_points": round(gt, 4), "loso_end_to_end": round(e2e, 4)})
        print(f"{label:48} LOSO gt {gt:.4f} e2e {e2e:.4f} | " + "  ".join(f"{s} {v[0]:.3f}/{v[1]:.3f}" for s, v in per_site.items()))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"protocol": __doc__.split("\n\n")[0], "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
