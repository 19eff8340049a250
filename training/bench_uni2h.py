"""Seconds per 224 x 224 window for the exact UNI2-h architecture (random init) on CPU float32.

    python training/bench_uni2h.py [--windows 2] [--threads 2] [--batch 1]

No download: the architecture is built from the registry's kwargs with pretrained=False.
Prints JSON (seconds/window, windows/s, parameter count). Expect ~7-10 s per window on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main(argv=None):
    import numpy as np
    import timm
    import torch

    from napari_denuc.encoders import get_spec
    from napari_denuc.encoders.timm_encoder import resolve_kwargs

    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2, help="timed windows (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = get_spec("uni2-h")
    t = time.perf_counter()
    model = timm.create_model(spec.arch, pretrained=False, **resolve_kwargs(spec.kwargs)).eval()
    build_s = time.perf_counter() - t
    assert model.num_prefix_tokens == spec.prefix_tokens
    x = torch.randn(args.batch, 3, args.size, args.size)

    def run():
        with torch.inference_mode():
            return model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[0]

    out = run()  # warm-up
    times = []
    n_batches = max(1, -(-args.windows // args.batch))
    for _ in range(n_batches):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    per_window = float(np.median(times)) / args.batch
    print(json.dumps({
        "encoder": "uni2-h (random init, exact architecture)",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "window": args.size, "batch": args.batch, "threads": args.threads, "dtype": "float32",
        "grid": list(out.shape[1:]),
        "seconds_per_window": round(per_window, 3),
        "windows_per_second": round(1.0 / per_window, 4),
        "build_seconds": round(build_s, 1),
        "timed_batches": len(times),
        "torch": torch.__version__, "machine": platform.machine(),
    }, indent=1))


if __name__ == "__main__":
    main()
