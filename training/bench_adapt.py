"""How retraining from a new site's corrections changes the head there (issue: never forget).

Protocol (leave one site out, on the cached features of ``training/loso_heads.py``):
for each BRCA-M2C site S (A7, A8, AC), the starting head is trained on the other two sites
(with its prior sample, as shipped heads are). From S, ``--reps`` times, 2 tiles are the
"user's" tiles and the rest of S is the test set. K of the user's ground-truth nuclei
(K = 1, 10, 30, 100, 300; in random order, or least-confident first by the starting head's
top-two margin) are the corrections; ``napari_denuc.retrain.retrain_head`` updates the head,
and end-to-end f_avg (bundled detector's points) and ground-truth-point f_avg are scored on
the test tiles. Reported: the change against the starting head, mean and worst over sites x
reps; and for comparison the old behaviour (a fresh head on the corrections alone). Also the
change of macro F1 on the *rest of the user's own two tiles* (their uncorrected ground-truth
nuclei): what the user sees when the widget reclassifies the image they are correcting.

    python training/bench_adapt.py --config eff0@0.25 [--context-um 40] [--weight 20] [--anchor 0.03] [--refit 1] [--json OUT]

``{site}`` in ``--config`` is replaced by the held-out site, for encoders made per fold
(``eff0ft-{site}|lite``: Lite0 fine-tuned without that site, training/probe_finetune_effnet.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loso_heads import add_context, detections, fit_head, load_features, load_samples, score, site_of  # noqa: E402

KS = (1, 10, 30, 100, 300)


def macro_f1(pred, truth, k: int) -> float:
    """Mean over the classes present of the per-class F1 (every point is classified: no matching)."""
    f1 = []
    for c in range(k):
        tp, fp, fn = np.sum((pred == c) & (truth == c)), np.sum((pred == c) & (truth != c)), np.sum((pred != c) & (truth == c))
        if tp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="eff0@0.25")
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weight", type=float, default=None, help="correction weight (default: the library's)")
    ap.add_argument("--anchor", type=float, default=None)
    ap.add_argument("--class-weight", default="none")
    ap.add_argument("--weight-decay", type=float, default=0.03)
    ap.add_argument("--context-um", type=float, default=0.0, help="neighbourhood context radius (0: none)")
    ap.add_argument("--scratch", action="store_true", help="also score a fresh head on the corrections alone")
    ap.add_argument("--refit", type=float, action="append", default=[], metavar="W",
                    help="also score a ceiling: a head refitted on the other sites plus *all* nuclei of the user's 2 tiles, each W times")
    ap.add_argument("--json")
    a = ap.parse_args()

    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.retrain import prior_sample, retrain_head

    opts = {}
    if a.weight is not None:
        opts["correction_weight"] = a.weight
    if a.anchor is not None:
        opts["anchor"] = a.anchor
    train, val = load_samples(a.root)
    samples = train + val
    names = samples[0].class_names
    dets = detections(load_detector(None), samples)
    cw = None if a.class_weight == "none" else a.class_weight
    rows, refits = [], []
    for site in sorted({site_of(s.name) for s in samples}):
        # "{site}" in --config: an encoder of each fold's own (e.g. fine-tuned without that site)
        feats = load_features(a.config.format(site=site), samples)
        if a.context_um:  # the user's corrections are nuclei of fully detected tiles: their context is complete
            feats = add_context(feats, samples, dets, a.context_um)
        fit_on = [s for s in samples if site_of(s.name) != site]
        tiles = sorted((s for s in samples if site_of(s.name) == site), key=lambda s: s.name)
        x = np.concatenate([feats[s.name]["gt"] for s in fit_on])
        y = np.concatenate([s.labels for s in fit_on])
        start = fit_head(x, y, names, cw, a.weight_decay)
        start.prior = prior_sample(x, y, names)
        for rep in range(a.reps):
            rng = np.random.default_rng(rep)
            pick = rng.choice(len(tiles), size=2, replace=False)
            user = [tiles[i] for i in pick]
            test = [t for i, t in enumerate(tiles) if i not in pick]
            ux = np.concatenate([feats[s.name]["gt"] for s in user])
            uy = np.concatenate([s.labels for s in user])
            gt0, e2e0 = score(start, test, feats, dets, names)
            for w in a.refit:  # what the 2 tiles could teach at most: every nucleus labelled, a full refit
                ref = fit_head(np.concatenate([x, np.tile(ux, (int(w), 1))]), np.concatenate([y, np.tile(uy, int(w))]),
                               names, cw, a.weight_decay)
                refits.append({"site": site, "rep": rep, "w": w, "nuclei": len(uy), "d_e2e": score(ref, test, feats, dets, names)[1] - e2e0})
            p = np.sort(start.predict_proba(ux), axis=1)
            orders = {"random": rng.permutation(len(uy)), "least-confident": np.argsort(p[:, -1] - p[:, -2], kind="stable")}
            for order, idx in orders.items():
                for k in KS:
                    if k > len(uy):
                        continue
                    sel = idx[:k]
                    res = retrain_head(start, ux[sel], uy[sel], names, None, None, cv=False, **opts)
                    gt, e2e = score(res.head, test, feats, dets, names)
                    rest = np.setdiff1d(np.arange(len(uy)), sel)
                    own0 = macro_f1(start.predict(ux[rest]), uy[rest], len(names))
                    own = macro_f1(res.head.predict(ux[rest]), uy[rest], len(names))
                    row = {"site": site, "rep": rep, "order": order, "k": k, "start_e2e": e2e0, "start_gt": gt0,
                           "d_e2e": e2e - e2e0, "d_gt": gt - gt0, "start_own": own0, "d_own": own - own0}
                    if a.scratch and len(np.unique(uy[sel])) == len(names):
                        fresh = fit_head(ux[sel], uy[sel], names, cw, a.weight_decay)
                        row["scratch_d_e2e"] = score(fresh, test, feats, dets, names)[1] - e2e0
                    rows.append(row)
                    print(f"{site} rep{rep} {order:>15} K={k:<4} f_avg {e2e0:.3f} -> {e2e:.3f} ({e2e - e2e0:+.3f})"
                          f"  gt {gt0:.3f} -> {gt:.3f}  own tiles {own0:.3f} -> {own:.3f}" + (f"  scratch {row['scratch_d_e2e']:+.3f}" if "scratch_d_e2e" in row else ""),
                          flush=True)
    print("\nK      order            mean d_f_avg  worst d_f_avg  mean d_gt   mean d_own_tiles  (over sites x reps)")
    summary = []
    for order in ("random", "least-confident"):
        for k in KS:
            r = [row for row in rows if row["order"] == order and row["k"] == k]
            if not r:
                continue
            s = {"order": order, "k": k, "mean_d_e2e": float(np.mean([v["d_e2e"] for v in r])),
                 "worst_d_e2e": float(np.min([v["d_e2e"] for v in r])), "mean_d_gt": float(np.mean([v["d_gt"] for v in r])),
                 "mean_d_own": float(np.mean([v["d_own"] for v in r])), "worst_d_own": float(np.min([v["d_own"] for v in r])),
                 "n": len(r)}
            sc = [v["scratch_d_e2e"] for v in r if "scratch_d_e2e" in v]
            if sc:
                s["scratch_mean_d_e2e"] = float(np.mean(sc))
            summary.append(s)
            print(f"{k:<6} {order:>15}  {s['mean_d_e2e']:+.4f}       {s['worst_d_e2e']:+.4f}        {s['mean_d_gt']:+.4f}"
                  f"     {s['mean_d_own']:+.4f}"
                  + (f"   scratch {s['scratch_mean_d_e2e']:+.4f}" if sc else ""))
    for w in a.refit:
        r = [v["d_e2e"] for v in refits if v["w"] == w]
        print(f"ceiling: refit with all nuclei of the 2 tiles x{w:g}: mean d_f_avg {np.mean(r):+.4f}, worst {np.min(r):+.4f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"config": a.config, "context_um": a.context_um, "options": opts, "summary": summary, "rows": rows,
                                             "refit_ceiling": refits}, indent=1) + "\n")


if __name__ == "__main__":
    main()
