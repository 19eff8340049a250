"""Train the shipped head of an encoder on all 90 BRCA-M2C train+val tiles, with the options
chosen by leave-one-site-out (training/loso_heads.py), and its prior sample.

    python training/train_default_head.py --config "eff0@0.5|lite" --encoder effnet-lite0 --context-um 40 \\
        --loso-json docs/results/loso_heads_X.json --out src/napari_denuc/weights/effnet_lite0_head.safetensors

Class weight and weight decay default to the best row (LOSO end to end) of ``--loso-json`` for this
configuration and context (``loso_heads.py select``); the sidecar records that row's figures.
Features come from the LOSO cache (runs/loso/det-<detector>-neck-<lite neck>/<config>/, keyed by
fingerprints; computed there if missing: ~10 min on 2 cores).
``training/rebuild_heads.sh`` runs the whole chain for both bundled heads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loso_heads import RUNS, add_context, detections, features, load_features, load_samples  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="eff0@0.5|lite")
    ap.add_argument("--encoder", default="effnet-lite0")
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    ap.add_argument("--weight-decay", type=float, help="default: the best row of --loso-json (end to end) for --config, --context-um")
    ap.add_argument("--class-weight", help="none or balanced; default: as --weight-decay")
    ap.add_argument("--context-um", type=float, default=0.0, help="neighbourhood context radius (0: none)")
    ap.add_argument("--loso-json", default="docs/results/loso_heads.json")
    ap.add_argument("--loso-config", help="the configuration's name in --loso-json when it differs from --config "
                    "(e.g. eff0ft-{site}|lite: fold encoders, for the all-tile eff0ft-none|lite)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from napari_denuc.detection.checkpoint import load_detector
    from napari_denuc.encoders import get_encoder
    from napari_denuc.encoders.lite import bundled_neck
    from napari_denuc.head import LinearHead
    from napari_denuc.retrain import prior_sample

    rows = json.loads(Path(a.loso_json).read_text())["rows"] if Path(a.loso_json).is_file() else []
    mine = [r for r in rows if r["config"] == (a.loso_config or a.config) and r.get("context_um", 0.0) == a.context_um]
    if a.weight_decay is None or a.class_weight is None:
        if not mine:
            raise SystemExit(f"no LOSO rows for {a.config} at context {a.context_um:g} um in {a.loso_json}: give --weight-decay and --class-weight")
        best = max(mine, key=lambda r: r["loso_end_to_end"])
        a.weight_decay = best["weight_decay"] if a.weight_decay is None else a.weight_decay
        a.class_weight = str(best["class_weight"]).lower() if a.class_weight is None else a.class_weight
        print(f"options chosen by leave-one-site-out ({a.loso_json}): class weight {a.class_weight}, weight decay {a.weight_decay:g}")

    for part in a.config.split("|"):  # e.g. eff0@0.5|litefb: two caches side by side
        if len(list((RUNS / part).glob("*.npz"))) < 90:
            features(part, a.root)
    train, val = load_samples(a.root)
    samples = train + val
    feats = load_features(a.config, samples)
    if a.context_um:
        feats = add_context(feats, samples, detections(load_detector(None), samples), a.context_um)
    x = np.concatenate([feats[s.name]["gt"] for s in samples])
    y = np.concatenate([s.labels for s in samples])
    names = samples[0].class_names
    enc = get_encoder(a.encoder, detector=bundled_neck())  # lite's neck
    head = LinearHead(enc.feature_dim, names, encoder_id=enc.id, mpp=enc.mpp, context_um=a.context_um)
    if head.input_dim != x.shape[1]:
        raise SystemExit(f"{a.encoder} gives {enc.feature_dim}-d features, the cache of {a.config} {x.shape[1]}-d")
    cw = None if a.class_weight == "none" else a.class_weight
    fit = head.fit(x, y, class_weight=cw, weight_decay=a.weight_decay)
    head.prior = prior_sample(x, y, names)
    loso = next((r for r in mine if (r["class_weight"] or None) == cw and r["weight_decay"] == a.weight_decay), None)
    head.save(a.out, metadata={"training": {
        "data": "BRCA-M2C train + val (90 tiles, sites A7, A8, AC), ground-truth points",
        "recipe": " ".join(sys.argv), **fit},
        "leave_one_site_out": loso})
    print(f"{a.out}: {len(y)} nuclei, {enc.id}, LOSO: {None if loso is None else {k: loso[k] for k in ('loso_gt_points', 'loso_end_to_end')}}")


if __name__ == "__main__":
    main()
