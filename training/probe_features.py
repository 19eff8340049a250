"""Probes (issue 9): features and heads that might classify better at an unseen site.

Each writes cached features that ``training/loso_heads.py select`` scores under
leave-one-site-out, or scores a head itself on those caches (shipped options: 40 um context,
balanced, weight decay 0.3):

    python training/probe_features.py flips --flips 2      # eff0@0.5+flip2, lite+flip2: features averaged over the tile and its mirror
    python training/probe_features.py flips --flips 4      # ... and its vertical and double mirrors (+flip4)
    python training/probe_features.py rays                 # radial nucleus profiles (rays): a star-convex shape descriptor
    python training/probe_features.py heads                # MLP heads and several context radii on eff0@0.5|lite
    python training/probe_features.py confusion            # where the shipped head errs: confusion per site, oracle classes at detections
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import loso_heads as L  # noqa: E402

SITES = ("A7", "A8", "AC")
MIRRORS = ((False, False), (True, False), (False, True), (True, True))  # (left-right, top-bottom)


def _samples(root):
    from napari_denuc.detection.checkpoint import load_detector

    train, val = L.load_samples(root)
    samples = train + val
    return samples, L.detections(load_detector(None), samples), train[0].class_names


def _cache(name, samples, dets, fn):
    """Features of ``fn(sample, points)`` at each tile's ground-truth points and detections."""
    out = L.RUNS / name
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        path = out / f"{Path(s.name).stem}.npz"
        if not path.is_file():
            f = fn(s, np.concatenate([s.points, dets[s.name][0]]))
            np.savez(path, gt=f[: len(s.points)].astype(np.float16), det=f[len(s.points):].astype(np.float16))
    print(f"{name}: done")


def flips(samples, dets, n):
    from napari_denuc.encoders.lite import bundled_neck

    def averaged(enc):
        def fn(s, pts):
            h, w = s.image.shape[:2]
            acc = 0.0
            for lr, tb in MIRRORS[:n]:
                img, q = s.image, pts.copy()
                if lr:
                    img, q[:, 0] = img[:, ::-1], w - 1 - q[:, 0]
                if tb:
                    img, q[:, 1] = img[::-1], h - 1 - q[:, 1]
                acc = acc + enc.features_at(np.ascontiguousarray(img), q, s.mpp)
            return acc / n
        return fn

    for config in ("eff0@0.5", "lite"):
        _cache(f"{config}+flip{n}", samples, dets, averaged(L.build_encoder(config, bundled_neck())))


def ray_features(image, xy, mpp, n_angles=16, max_um=10.0, step_um=0.5):
    """Per point: the mean and the spread over 16 rays of haematoxylin, eosin and optical density
    sampled every 0.5 um out to 10 um, and from the haematoxylin rays a boundary (where it falls
    half way to its value 10 um out): mean, spread, min and max radius, minor/major axis ratio,
    area, and the nucleus-to-surround contrast."""
    from scipy import ndimage as ndi

    from napari_denuc.encoders.lite import iter_stain_channels
    from napari_denuc.encoders.query import bilinear_sample

    chans = np.stack([ndi.gaussian_filter(c, 0.7) for i, c in enumerate(iter_stain_channels(image)) if i in (0, 1, 3)])
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    radii = np.arange(0, max_um + 1e-6, step_um) / mpp
    u = xy[:, 0, None, None] + np.cos(angles)[None, :, None] * radii[None, None]
    v = xy[:, 1, None, None] + np.sin(angles)[None, :, None] * radii[None, None]
    prof = bilinear_sample(chans, u.ravel(), v.ravel()).reshape(len(xy), n_angles, len(radii), len(chans))
    h = prof[..., 0]
    centre, outer = h[:, :, :2].mean(axis=(1, 2)), np.median(h[:, :, -4:], axis=(1, 2))
    below = h < ((centre + outer) / 2)[:, None, None]
    below[:, :, -1] = True
    b = radii[np.argmax(below, axis=2)] * mpp  # boundary radius per ray, um
    px, py = b * np.cos(angles), b * np.sin(angles)
    cxx, cyy, cxy = (px * px).mean(1), (py * py).mean(1), (px * py).mean(1)
    disc = np.sqrt(np.maximum((cxx - cyy) ** 2 / 4 + cxy ** 2, 0))
    major, minor = np.maximum((cxx + cyy) / 2 + disc, 1e-6), np.maximum((cxx + cyy) / 2 - disc, 1e-6)
    shape = np.stack([b.mean(1), b.std(1), b.min(1), b.max(1), np.sqrt(minor / major), np.pi * (b ** 2).mean(1),
                      centre - outer, np.clip((centre - outer) / (np.abs(outer) + 0.05), -20, 20)], 1)
    return np.concatenate([prof.mean(1).reshape(len(xy), -1), prof.std(1).reshape(len(xy), -1), shape], 1)


def _loso(samples, dets, names, feats, predictor):
    """(per-site (gt, e2e) f_avg, their means) for ``predictor(x, y) -> predict(features)``."""
    from napari_denuc.metrics import PointScorer

    rows = []
    for site in SITES:
        fit_on = [s for s in samples if L.site_of(s.name) != site]
        predict = predictor(*L.training_set(fit_on, feats, False))
        gt, e2e = PointScorer(names), PointScorer(names)
        for s in (s for s in samples if L.site_of(s.name) == site):
            r = L.RADIUS_UM / s.mpp
            xy, sc = dets[s.name]
            gt.add(s.points, s.points, r, None, predict(feats[s.name]["gt"]), s.labels)
            e2e.add(xy, s.points, r, sc, predict(feats[s.name]["det"]), s.labels)
        rows.append((gt.result()["f_avg"], e2e.result()["f_avg"]))
    return rows, np.mean(rows, axis=0)


def mlp(hidden, dropout, weight_decay=0.05, epochs=30, seed=0):
    """A one-hidden-layer MLP with input and hidden dropout, balanced cross-entropy, AdamW."""
    import torch

    def fit(x, y):
        torch.manual_seed(seed)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        xt, yt = torch.from_numpy((x - mu) / sd).float(), torch.from_numpy(y).long()
        w = torch.tensor(len(y) / (3 * np.bincount(y, minlength=3)), dtype=torch.float32)
        net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                  torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 3))
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=weight_decay)
        for _ in range(epochs):
            perm = torch.randperm(len(yt))
            for i in range(0, len(yt), 256):
                b = perm[i:i + 256]
                loss = torch.nn.functional.cross_entropy(net(xt[b]), yt[b], weight=w)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        return lambda f: net(torch.from_numpy((f - mu) / sd).float()).argmax(1).numpy()
    return fit


def with_radii(raw, samples, dets, radii):
    """Each point's features plus the neighbours' mean and count at every radius in ``radii``."""
    from napari_denuc.context import with_context

    out = {}
    for s in samples:
        out[s.name] = {}
        for k, v in raw[s.name].items():
            xy = dets[s.name][0] if k == "det" else s.points
            out[s.name][k] = np.concatenate([v] + [with_context(v, xy, s.mpp, r)[:, v.shape[1]:] for r in radii], 1)
    return out


def heads(samples, dets, names):
    import torch

    torch.set_num_threads(1)
    raw = L.load_features("eff0@0.5|lite", samples)

    def linear(x, y):
        return L.fit_head(x, y, names, "balanced", 0.3).predict

    def report(label, rows_mean):
        rows, mean = rows_mean
        print(f"{label:34} LOSO gt {mean[0]:.4f} e2e {mean[1]:.4f} | " + "  ".join(f"{s} {a:.3f}/{b:.3f}" for s, (a, b) in zip(SITES, rows)), flush=True)

    for radii in ((40,), (20, 60), (20, 40, 80)):
        report(f"linear, context {'+'.join(map(str, radii))} um", _loso(samples, dets, names, with_radii(raw, samples, dets, radii), linear))
    ctx = with_radii(raw, samples, dets, (40,))
    for hidden, dropout in ((256, 0.3), (64, 0.5)):
        report(f"MLP {hidden}, dropout {dropout}, context 40 um", _loso(samples, dets, names, ctx, mlp(hidden, dropout)))
    report("linear, the two sites weighed equally", _loso_site_balanced(samples, dets, names, ctx))


def _loso_site_balanced(samples, dets, names, feats):
    """LOSO with each training site's nuclei repeated up to the larger site's count (AC has 17
    tiles, A7 and A8 36-37: the head may learn the big sites' look)."""
    rows = []
    for site in SITES:
        fit_on = [s for s in samples if L.site_of(s.name) != site]
        x = np.concatenate([feats[s.name]["gt"] for s in fit_on])
        y = np.concatenate([s.labels for s in fit_on])
        g = np.concatenate([np.full(len(s.labels), L.site_of(s.name)) for s in fit_on])
        _, inv, cnt = np.unique(g, return_inverse=True, return_counts=True)
        idx = np.repeat(np.arange(len(y)), np.round(cnt.max() / cnt[inv]).astype(int))
        head = L.fit_head(x[idx], y[idx], names, "balanced", 0.3)
        rows.append(L.score(head, [s for s in samples if L.site_of(s.name) == site], feats, dets, names))
    return rows, np.mean(rows, axis=0)


def confusion(samples, dets, names):
    from scipy.spatial import cKDTree

    from napari_denuc.metrics import PointScorer

    feats = L.add_context(L.load_features("eff0@0.5|lite", samples), samples, dets, 40.0)
    print("classes:", names, "(rows: truth, columns: predicted)")
    for site in SITES:
        fit_on = [s for s in samples if L.site_of(s.name) != site]
        held = [s for s in samples if L.site_of(s.name) == site]
        head = L.fit_head(*L.training_set(fit_on, feats, False), names, "balanced", 0.3)
        m = np.zeros((len(names),) * 2, int)
        e2e, oracle = PointScorer(names), PointScorer(names)
        for s in held:
            np.add.at(m, (s.labels, head.predict(feats[s.name]["gt"])), 1)
            r = L.RADIUS_UM / s.mpp
            xy, sc = dets[s.name]
            pred = head.predict(feats[s.name]["det"])
            d, i = cKDTree(s.points).query(xy)
            e2e.add(xy, s.points, r, sc, pred, s.labels)
            oracle.add(xy, s.points, r, sc, np.where(d <= r, s.labels[i], pred), s.labels)
        f1 = 2 * np.diag(m) / (m.sum(0) + m.sum(1))
        print(f"{site}: per-class F1 at ground-truth points {np.round(f1, 3).tolist()}; end to end {e2e.result()['f_avg']:.4f}, "
              f"with the true class at every matched detection {oracle.result()['f_avg']:.4f}\n{m}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["flips", "rays", "heads", "confusion"])
    ap.add_argument("--flips", type=int, choices=[2, 4], default=2)
    ap.add_argument("--root", default="../shared/data/brca_m2c")
    a = ap.parse_args()
    samples, dets, names = _samples(a.root)
    if a.what == "flips":
        flips(samples, dets, a.flips)
    elif a.what == "rays":
        _cache("rays", samples, dets, lambda s, pts: ray_features(s.image, pts, s.mpp))
    elif a.what == "heads":
        heads(samples, dets, names)
    else:
        confusion(samples, dets, names)


if __name__ == "__main__":
    main()
