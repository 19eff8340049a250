"""End to end under leave-one-site-out with *site-held-out detectors* (issues 9 and 10).

``loso_heads.py`` scores end to end with the bundled detector, which trained on all three sites,
so its end-to-end figure is optimistic. Here each held-out site's points come from the detector
of the same fold (``loso_detector.py train --recipe shipped-travel --holdout SITE``: trained on the other
two sites only), and the head is trained on the other two sites as in ``loso_heads.py``. Nothing
in the figure saw the held-out site except the ``lite`` encoder's neck (``encoders.lite.bundled_neck``).

    # 1. candidates (score >= 0.1) of each fold's detector on its held-out tiles, and the encoder
    #    features there (resumable: one file per tile)
    python training/loso_end_to_end.py features --config eff0@0.5 --config lite [--folds runs/loso_long/shipped-travel]
    # 2. f_avg and detection F1 across thresholds; a threshold per tile (oracle, rules); tau fitted to corrected tiles
    python training/loso_end_to_end.py score --config 'eff0@0.5|lite' --context-um 40 [--shipped-tau T] [--json OUT]
    # the default encoder: each site's fold of effnet-lite0-nuclei (probe_finetune_effnet.py train --holdout SITE) and its head options
    python training/loso_end_to_end.py features --config 'eff0ft-{site}' --config lite --folds runs/loso_long/shipped-travel-200
    python training/loso_end_to_end.py score --config 'eff0ft-{site}|lite' --class-weight none --weight-decay 0.1 --folds runs/loso_long/shipped-travel-200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loso_heads import RADIUS_UM, RUNS, build_encoder, fit_head, load_features, load_samples, site_of, training_set  # noqa: E402

from napari_denuc.retrain import prior_sample  # noqa: E402

TAUS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6)


def cache_dir(folds: Path) -> Path:
    """Candidates and features of one recipe's fold detectors (``runs/loso/det-<detector>-neck-<neck>/fold_detections/<recipe>``;
    under the loso_heads cache folder, keyed by the `lite` neck the features hold)."""
    return RUNS / "fold_detections" / folds.name


def fold_candidates(samples, folds: Path, sites):
    """{tile: (xy, scores)} of each held-out tile of ``sites`` from its fold detector, at the candidate
    floor (cached per site: a fold that is still training does not hold up the others)."""
    from napari_denuc.detection.checkpoint import load_detector

    out = {}
    for site in sites:
        path = cache_dir(folds) / f"candidates-{site}.npz"
        tiles = [s for s in samples if site_of(s.name) == site]
        if not path.is_file():
            # best.safetensors is the fold's last epoch; its sidecar's tau was chosen on the held-out
            # site, so only the candidates are used, thresholded at TAUS here.
            det = load_detector(folds / site / "best.safetensors")
            c = {s.name: det.candidates(s.image, s.mpp, nms_um=4.0) for s in tiles}
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{f"{k}/xy": v[0] for k, v in c.items()}, **{f"{k}/scores": v[1] for k, v in c.items()})
            print(f"{site}: candidates of the fold detector", flush=True)
        z = np.load(path)
        out.update({s.name: (z[s.name + "/xy"], z[s.name + "/scores"]) for s in tiles})
    return out


def features(config: str, root, folds: Path, sites):
    """Features at the fold detectors' candidates; ``{site}`` in ``config``: each site's tiles encoded
    by its own fold's encoder (e.g. ``eff0ft-{site}``, Lite0 fine-tuned without that site)."""
    from napari_denuc.encoders.lite import bundled_neck

    train, val = load_samples(root)
    samples = [s for s in train + val if site_of(s.name) in sites]
    cands = fold_candidates(samples, folds, sites)
    for site in sites if "{site}" in config else [None]:
        name = config.format(site=site) if site else config
        enc = build_encoder(name, bundled_neck())
        out_dir = cache_dir(folds) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(samples):
            path = out_dir / f"{Path(s.name).stem}.npz"
            if (site is None or site_of(s.name) == site) and not path.is_file():
                np.savez(path, det=enc.features_at(s.image, cands[s.name][0], s.mpp).astype(np.float16))
                print(f"{name}: {i + 1}/{len(samples)}", flush=True)


def load_fold_features(config: str, samples, folds: Path):
    if "|" in config:
        parts = [load_fold_features(c, samples, folds) for c in config.split("|")]
        return {n: np.concatenate([p[n] for p in parts], axis=1) for n in parts[0]}
    return {s.name: np.load(cache_dir(folds) / config.format(site=site_of(s.name)) / f"{Path(s.name).stem}.npz")["det"].astype(np.float32)
            for s in samples}


def count_rule(scores) -> float:
    """The threshold that keeps as many points as the candidates' scores add up to (if the scores
    were calibrated probabilities, the expected number of nuclei)."""
    s = np.sort(scores)[::-1]
    return float(s[min(int(round(s.sum())), len(s) - 1)]) if len(s) else 0.5


def per_tile_thresholds(tiles, cands) -> dict:
    """Pooled detection F1 with a threshold chosen per tile: the best of tau_fit.TAUS (an oracle:
    the ceiling of any per-image rule) and two rules from the tile's own scores, clipped to 0.2-0.7."""
    from skimage.filters import threshold_otsu

    from napari_denuc.detection.tau_fit import f1, threshold_counts

    total = {k: np.zeros(3) for k in ("oracle", "count", "otsu")}
    for s in tiles:
        xy, sc = cands[s.name]
        r = RADIUS_UM / s.mpp
        counts = threshold_counts(xy, sc, s.points, r)
        total["oracle"] += counts[int(np.argmax(f1(counts)))]
        for k, rule in (("count", count_rule), ("otsu", threshold_otsu)):
            total[k] += threshold_counts(xy, sc, s.points, r, taus=(float(np.clip(rule(sc), 0.2, 0.7)),))[0]
    return {k: round(float(f1(v)[0]), 4) for k, v in total.items()}


def fitted_tau(tiles, cands, kept, head, user_inputs, names, n_user: int, draws: int = 20, shipped: float = 0.55,
               k_corrections: int = 300) -> dict:
    """A new site corrected in the widget: ``n_user`` tiles of the site fully corrected (their ground
    truth). Scored on the site's other tiles against the starting point (shipped tau, LOSO head):
    tau fitted to the corrected tiles ("Fit τ to view": ``tau_fit.best_tau`` from the shipped tau);
    the head updated from ``k_corrections`` of their nuclei (``retrain.retrain_head``, as the widget's
    Retrain); and both. ``kept[(tile, tau)]`` = (xy, scores, classes, head inputs);
    ``user_inputs[tile]`` = head inputs at the tile's ground-truth nuclei."""
    from napari_denuc.detection.tau_fit import best_tau, threshold_counts
    from napari_denuc.metrics import PointScorer
    from napari_denuc.retrain import retrain_head

    def on(rest, tau, new_head=None):
        sc = PointScorer(names)
        for s in rest:
            xy, scores, pred, x = kept[(s.name, tau)]
            if new_head is not None and len(x):
                pred = new_head.predict(x.astype(np.float32))
            sc.add(xy, s.points, RADIUS_UM / s.mpp, scores, pred, s.labels)
        r = sc.result()
        return np.array([r["detection"]["f1"], r["f_avg"]])

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(draws):
        pick = set(rng.choice(len(tiles), n_user, replace=False).tolist())
        user = [s for i, s in enumerate(tiles) if i in pick]
        rest = [s for i, s in enumerate(tiles) if i not in pick]
        counts = sum(threshold_counts(*cands[s.name], s.points, RADIUS_UM / s.mpp) for s in user)
        tau = best_tau(counts, current=shipped)
        x = np.concatenate([user_inputs[s.name] for s in user])
        y = np.concatenate([s.labels for s in user])
        sel = rng.permutation(len(y))[:k_corrections]
        new_head = retrain_head(head, x[sel], y[sel], names, None, None, cv=False).head
        start = on(rest, shipped)
        rows.append([tau, *(on(rest, tau) - start), *(on(rest, shipped, new_head) - start), *(on(rest, tau, new_head) - start)])
    a = np.array(rows)  # tau, then (detection F1, f_avg) changes: tau fitted, head updated, both
    out = {"n_user_tiles": n_user, "draws": draws, "k_corrections": k_corrections, "median_tau": float(np.median(a[:, 0]))}
    for i, what in enumerate(("tau", "head", "both")):
        out[what] = {"mean_d_detection_f1": round(float(a[:, 1 + 2 * i].mean()), 4), "mean_d_f_avg": round(float(a[:, 2 + 2 * i].mean()), 4),
                     "worst_d_f_avg": round(float(a[:, 2 + 2 * i].min()), 4)}
    return out


def fitted_tau_within_tile(tiles, cands, shipped: float, min_nuclei: int = 30) -> dict:
    """Fit to view on the same slide: tau fitted to one quadrant of a tile (a field of view the user
    corrected, at least ``min_nuclei`` nuclei as the widget requires), detection F1 on the tile's other
    three quadrants against the shipped tau; pooled over every (tile, quadrant) of the site."""
    from napari_denuc.detection.tau_fit import best_tau, f1, threshold_counts

    fitted, start = 0, 0
    for s in tiles:
        xy, sc = cands[s.name]
        half = np.array(s.image.shape[1::-1]) / 2  # (w/2, h/2)
        r = RADIUS_UM / s.mpp
        for q in ((0, 0), (1, 0), (0, 1), (1, 1)):
            view, truth = (np.all((p // half) == q, axis=1) for p in (xy, s.points))
            if truth.sum() < min_nuclei:
                continue
            tau = best_tau(threshold_counts(xy[view], sc[view], s.points[truth], r), current=shipped)
            rest = threshold_counts(xy[~view], sc[~view], s.points[~truth], r, taus=(shipped, tau))
            start, fitted = start + rest[0], fitted + rest[1]
    return {"shipped_detection_f1": round(float(f1(np.array([start]))[0]), 4), "fitted_detection_f1": round(float(f1(np.array([fitted]))[0]), 4)}


def score(config: str, root, folds: Path, sites, context_um: float, json_out, shipped_tau: float, class_weight="balanced", weight_decay=0.3):
    from napari_denuc.context import with_context
    from napari_denuc.detection.tau_fit import TAUS as FIT_TAUS
    from napari_denuc.metrics import PointScorer

    train, val = load_samples(root)
    samples = train + val
    names = samples[0].class_names
    cands = fold_candidates(samples, folds, sites)
    det_feats = load_fold_features(config, [s for s in samples if site_of(s.name) in sites], folds)
    rows, per_tile, fitted = {}, {}, {}
    for site in sites:
        gt_feats = load_features(config.format(site=site), samples)  # the head's training features: this fold's encoder
        fit_on = [s for s in samples if site_of(s.name) != site]
        held = [s for s in samples if site_of(s.name) == site]
        feats = {s.name: {"gt": with_context(gt_feats[s.name]["gt"], s.points, s.mpp, context_um)} for s in fit_on}
        x, y = training_set(fit_on, feats, False)
        head = fit_head(x, y, names, class_weight, weight_decay)
        head.prior = prior_sample(x, y, names)  # as the shipped heads carry one, for the widget's update
        user_inputs = {s.name: with_context(gt_feats[s.name]["gt"], s.points, s.mpp, context_um) for s in held}
        kept = {}
        for tau in sorted(set(TAUS) | set(FIT_TAUS)):
            for s in held:
                xy, sc = cands[s.name]
                keep = sc > tau
                # the neighbours are the nuclei kept at this threshold, as in the widget
                x = with_context(det_feats[s.name][keep], xy[keep], s.mpp, context_um)
                kept[(s.name, tau)] = xy[keep], sc[keep], (head.predict(x) if keep.any() else np.zeros(0, int)), x.astype(np.float16)
        for tau in TAUS:
            e2e = PointScorer(names)
            for s in held:
                xy, sc, pred, _ = kept[(s.name, tau)]
                e2e.add(xy, s.points, RADIUS_UM / s.mpp, sc, pred, s.labels)
            r = e2e.result()
            rows.setdefault(tau, {})[site] = {"f_avg": round(r["f_avg"], 4), "detection_f1": round(r["detection"]["f1"], 4),
                                             "class_f1": {k: round(v["f1"], 4) for k, v in r["classes"].items()}}
        print(site, "  ".join(f"tau {t}: {rows[t][site]['f_avg']:.3f}/{rows[t][site]['detection_f1']:.3f}" for t in TAUS), flush=True)
        per_tile[site] = per_tile_thresholds(held, cands)
        fitted[site] = [fitted_tau(held, cands, kept, head, user_inputs, names, n, shipped=shipped_tau) for n in (1, 2)]
        fitted[site].append(fitted_tau_within_tile(held, cands, shipped_tau))
        print(site, "corrected tiles:", fitted[site], flush=True)
    table = [{"tau": t, "sites": v, "mean_f_avg": round(float(np.mean([x["f_avg"] for x in v.values()])), 4),
              "mean_detection_f1": round(float(np.mean([x["detection_f1"] for x in v.values()])), 4)} for t, v in rows.items()]
    for r in table:
        print(f"tau {r['tau']}: LOSO f_avg {r['mean_f_avg']:.4f}  detection F1 {r['mean_detection_f1']:.4f}  "
              + "  ".join(f"{k} {v['f_avg']:.3f}" for k, v in r["sites"].items()))
    for k in ("oracle", "count", "otsu"):
        print(f"threshold per tile, {k}: LOSO detection F1 {np.mean([v[k] for v in per_tile.values()]):.4f} ",
              {site: v[k] for site, v in per_tile.items()})
    for i, n in enumerate((1, 2)):
        v = [fitted[site][i] for site in fitted]
        print(f"{n} corrected tile(s) of the site, change on its other tiles (detection F1 / f_avg): "
              + ", ".join(f"{w} {np.mean([x[w]['mean_d_detection_f1'] for x in v]):+.4f} / {np.mean([x[w]['mean_d_f_avg'] for x in v]):+.4f}"
                          for w in ("tau", "head", "both")))
    v = [fitted[site][2] for site in fitted]
    print("tau fitted to one quadrant of a tile, detection F1 on its other three quadrants: "
          f"{np.mean([x['fitted_detection_f1'] for x in v]):.4f} against {np.mean([x['shipped_detection_f1'] for x in v]):.4f} at the shipped tau", v)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"config": config, "context_um": context_um, "folds": str(folds), "shipped_tau": shipped_tau, "rows": table,
                                              "per_tile_threshold_detection_f1": per_tile, "tau_fitted_to_user_tiles": fitted},
                                             indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["features", "score"])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--folds", type=Path, default=Path("runs/loso_long/shipped-travel"), help="<folds>/<site>/best.safetensors (the bundled recipe)")
    ap.add_argument("--context-um", type=float, default=40.0)
    ap.add_argument("--class-weight", default="balanced", help="head option (none for the effnet-lite0-nuclei head)")
    ap.add_argument("--weight-decay", type=float, default=0.3, help="head option (0.1 for the effnet-lite0-nuclei head)")
    ap.add_argument("--sites", default="A7,A8,AC", help="held-out sites to score (comma-separated; the LOSO mean needs all three)")
    ap.add_argument("--json")
    ap.add_argument("--shipped-tau", type=float, help="the threshold a fitted tau starts from and is compared with (default: the bundled detector's)")
    a = ap.parse_args()
    if a.shipped_tau is None:
        from napari_denuc.detection.checkpoint import load_detector

        a.shipped_tau = load_detector(None).tau
    sites = a.sites.split(",")
    for c in a.config:
        if a.what == "features":
            features(c, a.root, a.folds, sites)
        else:
            score(c, a.root, a.folds, sites, a.context_um, a.json, a.shipped_tau, None if a.class_weight == "none" else a.class_weight, a.weight_decay)


if __name__ == "__main__":
    main()
