"""Export benchmark: peak memory and time of writing a whole slide's nuclei from the per-tile store.

    python training/bench_export.py                     # 2,000,000 nuclei, all formats, GeoJSON plain
    python training/bench_export.py --nuclei 200000 --gzip
    python training/bench_export.py --in-memory         # the old way: merge all tiles, then write

A resumable-run tile store (``wsi/store.py``) is filled with synthetic nuclei (``--per-tile``
per tile, 3 classes with probabilities), as ``predict_slides`` leaves it before the merge.
Then a fresh child process (so filling the store does not count) writes GeoJSON, CSV and
Parquet from it exactly as ``predict_slides`` does (``TileStore.iter_detections`` ->
``wsi.outputs.write_outputs``) and reports its peak RSS (``ru_maxrss``), its RSS after the
imports, the time, and the file sizes. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fill_store(folder: Path, n_nuclei: int, per_tile: int, seed: int = 0):
    from napari_denuc.wsi.store import TileStore

    n_tiles = -(-n_nuclei // per_tile)
    store = TileStore(folder, {"bench": "export", "n": n_nuclei, "per_tile": per_tile}, {"tiles": n_tiles})
    rng = np.random.default_rng(seed)
    names, colors = ["tumor", "lymphocyte", "stromal"], [[230, 0, 0], [0, 200, 0], [0, 120, 255]]
    left = n_nuclei
    for i in range(n_tiles):
        n = min(per_tile, left)
        left -= n
        p = rng.dirichlet(np.ones(3), n).astype(np.float32)
        x0, y0 = (i % 100) * 1024.0, (i // 100) * 1024.0
        store.commit(
            i,
            {
                "xy": rng.random((n, 2)) * 1024 + (x0, y0),
                "scores": rng.random(n).astype(np.float32),
                "class_ids": p.argmax(1).astype(np.int64),
                "probs": p,
                "class_names": names,
                "class_colors": colors,
            },
        )
    return n_tiles


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def export(folder: Path, out: Path, gzip: bool, in_memory: bool) -> dict:
    """Runs in the child: what predict_slides does after the last tile."""
    from napari_denuc.results import Detections
    from napari_denuc.wsi.outputs import output_paths, write_outputs
    from napari_denuc.wsi.store import TileStore

    import pyarrow.parquet  # noqa: F401  (imported before the baseline, as in a real run)

    manifest = json.loads((folder / "manifest.json").read_text())
    store = TileStore(folder, manifest["config"], manifest["plan"])
    assert store.reused, "the store was not reused"
    indices = sorted(store.done())
    base = rss_mb()
    paths = output_paths(out, "bench", gzip=gzip)
    t0 = time.perf_counter()
    if in_memory:  # the pre-streaming path: concatenate every tile, then write
        parts = list(store.iter_detections(indices, None))
        det = Detections(
            np.concatenate([d.xy for d in parts]),
            np.concatenate([d.scores for d in parts]),
            np.concatenate([d.class_ids for d in parts]),
            parts[0].class_names,
            parts[0].class_colors,
            np.concatenate([d.probs for d in parts]),
        )
        del parts
        written = write_outputs(paths, lambda: iter([det]), gzip=gzip)
    else:
        written = write_outputs(paths, lambda: store.iter_detections(indices, None), gzip=gzip)
    elapsed = time.perf_counter() - t0
    return {
        "rss_after_imports_mb": round(base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "write_s": round(elapsed, 1),
        "sizes_mb": {k: round(p.stat().st_size / 2**20, 1) for k, p in written.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuclei", type=int, default=2_000_000)
    ap.add_argument("--per-tile", type=int, default=2000, help="nuclei per tile (a 1024 px tile at 0.5 mpp holds up to ~2000)")
    ap.add_argument("--gzip", action="store_true", help="write .geojson.gz")
    ap.add_argument("--in-memory", action="store_true", help="merge all tiles in memory first (the old way)")
    ap.add_argument("--workdir", help="folder for the store and outputs (default: a temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        folder, out = Path(args.child), Path(args.child).parent / "out"
        print(json.dumps(export(folder, out, args.gzip, args.in_memory)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / ".bench.tiles"
        t0 = time.perf_counter()
        n_tiles = fill_store(folder, args.nuclei, args.per_tile)
        fill_s = time.perf_counter() - t0
        cmd = (
            [sys.executable, __file__, "--child", str(folder)]
            + (["--gzip"] if args.gzip else [])
            + (["--in-memory"] if args.in_memory else [])
        )
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode:
            sys.stderr.write(res.stderr)
            return res.returncode
        child = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "nuclei": args.nuclei,
                "tiles": n_tiles,
                "per_tile": args.per_tile,
                "gzip": args.gzip,
                "in_memory": args.in_memory,
                "fill_store_s": round(fill_s, 1),
                **child,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
