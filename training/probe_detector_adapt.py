"""Probe: can the detector learn a new site from 2 corrected tiles? (issues 9 and 10)

Only the detector's last 1x1 layers are fine-tuned (the score, or score and offset), so its neck,
which the `lite` features hold, and with it both heads stay valid. For each held-out site: the fold
detector that never saw it; 2 random tiles of the site are the user's (their ground truth; the
P2PNet loss, Adam, an L2 pull of --anchor toward the old weights); detection F1 on the site's
*other* tiles at tau 0.45, against the fold detector as it was and against tau fitted to the 2
tiles (`tau_fit.best_tau`, the widget's Fit to view). The "user" figures score the 2 tiles
themselves (seen in the fine-tuning: in-sample).

    python training/probe_detector_adapt.py --folds runs/loso_long/shipped-travel-200 --steps 20 --anchor 1.0
"""

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loso_heads import load_samples, site_of  # noqa: E402

from napari_denuc.detection import tau_fit  # noqa: E402
from napari_denuc.detection.checkpoint import load_detector  # noqa: E402
from napari_denuc.detection.model import PointDetector  # noqa: E402
from napari_denuc.detection.train import TrainConfig, detector_loss, prepare  # noqa: E402
from napari_denuc.metrics import PointScorer  # noqa: E402

TAU = 0.45


def fused_features(model, image):
    """The stride-8 features the score layer reads (frozen), on the image padded with white to x32."""
    h, w = image.shape[:2]
    padded = np.full((-(-h // 32) * 32, -(-w // 32) * 32, 3), 255, np.uint8)
    padded[:h, :w] = image
    with torch.no_grad():
        return model.neck_features(model.normalize(torch.from_numpy(padded[None])))


def head_output(head, fused):
    return head.score(fused)[:, 0], PointDetector.positions(head.offset(fused))


def detection_f1(cands, tiles, tau):
    scorer = PointScorer()
    for s in tiles:
        xy, p = cands[s.name]
        scorer.add(xy[p > tau], s.points, 3.0 / s.mpp, scores=p[p > tau])
    return scorer.result()["detection"]["f1"]


def fine_tuned(head, user, fused, points, layers, steps, anchor, lr):
    head = copy.deepcopy(head)
    params = [head.score.weight, head.score.bias] + ([head.offset.weight, head.offset.bias] if layers == "both" else [])
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    cfg = TrainConfig()
    for _ in range(steps):
        opt.zero_grad()
        loss = anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
        for s in user:
            logits, xy = head_output(head, fused[s.name])
            loss = loss + detector_loss(logits, xy, [torch.from_numpy(points[s.name].astype(np.float32))], cfg)[0] / len(user)
        loss.backward()
        opt.step()
    return head


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=Path, required=True)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--anchor", type=float, default=1.0)
    ap.add_argument("--layers", choices=["score", "both"], default="score")
    ap.add_argument("--lr", type=float, default=1e-2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    train, val = load_samples("../shared/data/brca_m2c")
    keys = ("start", "tau_fitted", "fine_tuned", "fine_tuned_tau_fitted", "user_start", "user_fine_tuned")
    means = []
    for site in ("A7", "A8", "AC"):
        det = load_detector(a.folds / site / "best.safetensors")
        model = det.model.eval()
        held = [s for s in train + val if site_of(s.name) == site]
        prepared = {s.name: prepare([s], det.mpp)[0] for s in held}
        fused = {n: fused_features(model, img) for n, (img, _) in prepared.items()}
        points = {n: pts for n, (_, pts) in prepared.items()}
        start = {s.name: det.candidates(s.image, s.mpp, nms_um=4.0) for s in held}
        original = model.head
        rng = np.random.default_rng(0)
        rows = []
        for _ in range(a.draws):
            pick = set(rng.choice(len(held), 2, replace=False).tolist())
            user = [s for i, s in enumerate(held) if i in pick]
            rest = [s for i, s in enumerate(held) if i not in pick]
            model.head = fine_tuned(original, user, fused, points, a.layers, a.steps, a.anchor, a.lr)
            tuned = {s.name: det.candidates(s.image, s.mpp, nms_um=4.0) for s in held}
            model.head = original

            def fitted(cands):
                counts = sum(tau_fit.threshold_counts(*cands[s.name], s.points, 3.0 / s.mpp) for s in user)
                return tau_fit.best_tau(counts, current=TAU)

            rows.append([detection_f1(start, rest, TAU), detection_f1(start, rest, fitted(start)), detection_f1(tuned, rest, TAU),
                         detection_f1(tuned, rest, fitted(tuned)), detection_f1(start, user, TAU), detection_f1(tuned, user, TAU)])
        rows = np.array(rows)
        means.append(rows.mean(0))
        print(site, {k: round(float(v), 4) for k, v in zip(keys, rows.mean(0))},
              "worst fine_tuned - start", round(float((rows[:, 2] - rows[:, 0]).min()), 4), flush=True)
    print("mean", {k: round(float(v), 4) for k, v in zip(keys, np.mean(means, 0))})


if __name__ == "__main__":
    main()
