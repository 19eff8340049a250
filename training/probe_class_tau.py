"""Probe: a detection threshold per predicted class (keep a candidate if its score > tau[its class])
instead of one tau, end to end under LOSO with the fold detectors (issue 9).

Candidates above 0.25 are classified (context among them) by the LOSO head (balanced, weight decay
0.3, 40 um); the per-class taus for a held-out site are the best mean over the *other two* held-out
sites (nested: the choice never sees the site it is scored on). Needs `loso_end_to_end.py
features` for the folds first.

    python training/probe_class_tau.py --folds runs/loso_long/shipped-travel
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loso_end_to_end import fold_candidates, load_fold_features  # noqa: E402
from loso_heads import fit_head, load_features, load_samples, site_of, training_set  # noqa: E402

from napari_denuc.context import with_context  # noqa: E402
from napari_denuc.metrics import PointScorer  # noqa: E402

CONFIG, CONTEXT_UM, FLOOR = "eff0@0.5|lite", 40.0, 0.25
GRID = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=Path, required=True)
    a = ap.parse_args()
    train, val = load_samples("../shared/data/brca_m2c")
    samples = train + val
    names = samples[0].class_names
    sites = ("A7", "A8", "AC")
    cands = fold_candidates(samples, a.folds, sites)
    det_feats = load_fold_features(CONFIG, samples, a.folds)
    gt_feats = load_features(CONFIG, samples)
    by_site = {site: [s for s in samples if site_of(s.name) == site] for site in sites}
    classified = {}  # (tile, tau or None) -> kept xy, scores, classes; None: the floor, for per-class taus

    for site in sites:
        fit_on = [s for s in samples if site_of(s.name) != site]
        feats = {s.name: {"gt": with_context(gt_feats[s.name]["gt"], s.points, s.mpp, CONTEXT_UM)} for s in fit_on}
        head = fit_head(*training_set(fit_on, feats, False), names, "balanced", 0.3)
        for s in by_site[site]:
            xy, sc = cands[s.name]
            for tau in (None, *GRID):
                keep = sc > (FLOOR if tau is None else tau)
                x = with_context(det_feats[s.name][keep], xy[keep], s.mpp, CONTEXT_UM)
                classified[(s.name, tau)] = xy[keep], sc[keep], head.predict(x) if keep.any() else np.zeros(0, int)

    def f_avg(tiles, taus):
        scorer = PointScorer(names)
        for s in tiles:
            if np.isscalar(taus):
                xy, p, c = classified[(s.name, taus)]
                m = np.ones(len(p), bool)
            else:
                xy, p, c = classified[(s.name, None)]
                m = p > np.asarray(taus)[c]
            scorer.add(xy[m], s.points, 3.0 / s.mpp, p[m], c[m], s.labels)
        return scorer.result()["f_avg"]

    combos = list(itertools.product(GRID, repeat=len(names)))
    per_class = {site: np.array([f_avg(by_site[site], t) for t in combos]) for site in sites}
    single = {site: np.array([f_avg(by_site[site], t) for t in GRID]) for site in sites}
    print("classes", names)
    print("one tau 0.45:", {s: round(float(single[s][GRID.index(0.45)]), 4) for s in sites},
          round(float(np.mean([single[s][GRID.index(0.45)] for s in sites])), 4))
    for what, table, options in (("per-class taus", per_class, combos), ("one tau", single, GRID)):
        chosen = {}
        for site in sites:
            i = int(np.argmax(sum(table[o] for o in sites if o != site)))
            chosen[site] = (options[i], round(float(table[site][i]), 4))
        print(f"nested, {what}:", chosen, round(float(np.mean([v[1] for v in chosen.values()])), 4))


if __name__ == "__main__":
    main()
