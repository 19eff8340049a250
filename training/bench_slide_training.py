"""Benchmark: denuc-train head --data slides=LIST.csv on a generated 8192 x 8192 pyramidal TIFF.

2,000 QuPath-style points either in two encoder windows (``--spread local``, a corrected region)
or spread over the whole slide (``--spread whole``). Reports the wall time, the RSS growth over
the run (after a warm-up that loads the libraries and the bundled detector) and the level-0
pixels read from the slide, against the slide's 67 MP. Encoder: ``lite`` with the bundled
detector (the CLI default).

    python training/bench_slide_training.py --spread local
    python training/bench_slide_training.py --spread whole
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np


def status_mb(key: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (this process's peak; ``ru_maxrss`` would include a parent's at exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/bench_slide_training")
    ap.add_argument("--spread", choices=["local", "whole"], default="local")
    ap.add_argument("--points", type=int, default=2000)
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    slide = d / "slide8k.tif"
    if not slide.is_file() or not (d / "nuclei.npy").is_file():
        from napari_denuc.wsi.synthetic import make_test_slide

        np.save(d / "nuclei.npy", make_test_slide(slide, 8192, mpp=0.5, seed=1))
    nuclei = np.load(d / "nuclei.npy")
    rng = np.random.default_rng(0)
    if args.spread == "local":  # the cores of lite windows (1, 1) and (2, 1): step 1664, window 2048
        c = np.array([[1664 + 1023.5, 1664 + 1023.5], [3328 + 1023.5, 1664 + 1023.5]])
        near = (np.abs(nuclei[:, None, :] - c[None]) < 832).all(-1).any(1)
        pool = nuclei[near]
    else:
        pool = nuclei
    pts = pool[rng.permutation(len(pool))[: args.points]]
    names = np.where(rng.random(len(pts)) < 0.5, "Tumor", "Stroma")
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(x) + 0.5, float(y) + 0.5]},
              "properties": {"objectType": "detection", "classification": {"name": str(n)}}} for (x, y), n in zip(pts, names)]
    (d / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    (d / "LIST.csv").write_text(f"slide,points\n{slide},{d / 'points.geojson'}\n")

    from napari_denuc.cli.train import main as train
    from napari_denuc.encoders.lite import LiteEncoder, bundled_neck
    from napari_denuc.wsi import slides

    with slides.open_slide(slide) as src:
        LiteEncoder(bundled_neck()).window_features(src.read_level(0, 0, 0, 64, 64), np.array([[30.0, 30.0]]))
    read = {"px": 0}
    real = slides.TiffSlideSource._read

    def counting(self, x, y, level, w, h):
        read["px"] += w * h * 4**level
        return real(self, x, y, level, w, h)

    slides.TiffSlideSource._read = counting
    out = d / f"head_{args.spread}.safetensors"
    for p in (out, out.with_name(out.name + ".json")):
        p.unlink(missing_ok=True)
    base = status_mb()
    t0 = time.perf_counter()
    rc = train(["head", "--encoder", "lite", "--data", f"slides={d / 'LIST.csv'}", "--class-map", "Tumor=tumour,Stroma=stromal",
                "--out", str(out)])
    print(json.dumps({"spread": args.spread, "points": len(pts), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                      "rss_growth_mb": round(status_mb("VmHWM") - base, 1),
                      "level0_pixels_read_mp": round(read["px"] / 1e6, 1), "slide_mp": round(8192 * 8192 / 1e6, 1)}))


if __name__ == "__main__":
    main()
