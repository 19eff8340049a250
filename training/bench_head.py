"""Linear-head fit time at the size of a whole data set's features. Prints JSON.

    python training/bench_head.py                 # 20,000 x 256, 3 classes, L-BFGS (the default)
    python training/bench_head.py --n 100000 --dim 1536 --optimizer adam

Timings belong here rather than in tests (a shared machine makes wall-clock asserts flaky).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--optimizer", default="lbfgs", choices=("lbfgs", "adam"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from napari_denuc.head import LinearHead

    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, args.n)
    x = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    x[:, : args.classes] += 3 * np.eye(args.classes, dtype=np.float32)[y]
    times = []
    for _ in range(args.repeats):
        head = LinearHead(args.dim, [f"c{k}" for k in range(args.classes)])
        t0 = time.perf_counter()
        head.fit(x, y, optimizer=args.optimizer)
        times.append(time.perf_counter() - t0)
    acc = float((head.predict(x) == y).mean())
    print(
        json.dumps(
            {
                "n": args.n,
                "dim": args.dim,
                "classes": args.classes,
                "optimizer": args.optimizer,
                "fit_s": [round(t, 3) for t in times],
                "train_accuracy": round(acc, 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
