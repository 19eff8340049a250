"""denuc-predict: nuclei in images and whole-slide images -> QuPath GeoJSON, CSV, Parquet.

Every input (file, folder, glob or CSV list of ``path[,mpp]``) is tiled at the model's
resolution; tiles are committed as they finish, so a killed run started again resumes.
``--dask`` spreads tiles over a local cluster or the one at ``--scheduler``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import common


def build_parser():
    p = common.parser("denuc-predict", "Detect and classify nuclei; write QuPath GeoJSON, CSV and Parquet per input.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image or slide files, folders, globs, or a .csv list (path[,mpp])")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sample", action="store_true", help="also run on the bundled BRCA-M2C sample tile")
    p.add_argument("--mpp", type=float, help="micrometres per pixel of inputs whose files state none (0.5 = 20x, 0.25 = 40x)")
    p.add_argument("--detector", help="detector checkpoint (default: bundled)")
    p.add_argument("--encoder", help="encoder name (default: the one --head was trained with; without --head uni2-h when "
                   "its weights are cached, else effnet-lite0-nuclei)")
    p.add_argument("--encoder-weights", help="local encoder state dict (no network)")
    p.add_argument("--head", help="linear head (default, or bundled: the head shipped for the encoder)")
    p.add_argument("--tau", type=float,
                   help="detection score threshold, 0-1 (default: the detector's own; the widget's 'Fit to view' finds one from corrected nuclei)")
    p.add_argument("--format", default=None, help="comma-separated outputs among geojson,csv,parquet (default: all available)")
    p.add_argument("--gzip", action="store_true", help="write .geojson.gz")
    p.add_argument(
        "--geojson-per-class", action="store_true",
        help="also write <stem>.<class>.geojson per class (to import classes into QuPath as separate layers)",
    )
    p.add_argument("--overlay", action="store_true", help="also write <stem>.overlay.png (images up to 64 megapixels)")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--no-tissue-mask", action="store_true", help="process background tiles too")
    p.add_argument("--overwrite", action="store_true", help="recompute inputs whose outputs are complete")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: GPU when present)")
    p.add_argument("--batch-size", type=int, help="detector windows per forward pass")
    p.add_argument("--threads", type=int, help="torch threads per process (default: all cores; 1 per Dask worker)")
    p.add_argument("--dask", action="store_true", help="run tiles as Dask tasks on a LocalCluster")
    p.add_argument("--scheduler", help="Dask scheduler address (tcp://HOST:PORT) of an existing cluster")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes with --dask")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _formats(value: str | None) -> tuple[str, ...]:
    if value:
        return tuple(f.strip() for f in value.split(",") if f.strip())
    try:
        import pyarrow  # noqa: F401

        return ("geojson", "csv", "parquet")
    except ImportError:
        return ("geojson", "csv")


def _write_overlays(result, out: Path, quiet: bool) -> None:
    from ..errors import DenucError
    from ..io.images import read_image
    from ..io.overlay import SUFFIX, write_overlay
    from ..io.points import read_points

    for r in result.slides:
        if not r.ok:
            continue
        try:
            image, _ = read_image(r.path)
        except DenucError:
            image = None  # a whole-slide image (SVS, NDPI...) that tifffile/PIL cannot read whole
        if image is None or image.shape[0] * image.shape[1] > 64e6:
            if not quiet:
                print(f"no overlay for {r.path}: larger than 64 megapixels (open it with its GeoJSON in QuPath or napari)",
                      file=sys.stderr)
            continue
        target = out / f"{r.stem}{SUFFIX}"
        write_overlay(target, image, read_points(r.outputs["geojson"]))
        if not quiet:
            print(f"overlay: {target}", file=sys.stderr)


def _main(args) -> int:
    from ..errors import DenucError
    from ..wsi.run import PipelineFactory, predict_slides

    inputs = list(args.inputs)
    if args.sample:
        from .._sample_data import SAMPLE_IMAGE, SAMPLE_MPP

        inputs.append((str(SAMPLE_IMAGE), SAMPLE_MPP))
    if not inputs:
        raise DenucError("no inputs: give image/slide paths, a folder, a glob, a .csv list, or --sample")
    inputs = [(Path(i[0]), i[1]) if isinstance(i, tuple) else i for i in inputs]
    if args.overlay and "geojson" not in _formats(args.format):
        raise DenucError("--overlay draws the nuclei from the GeoJSON output; add geojson to --format")
    if args.tau is not None and not 0 < args.tau < 1:
        raise DenucError(f"--tau must be between 0 and 1 (a detection score), got {args.tau}")
    factory = PipelineFactory(
        detector=args.detector, encoder=common.encoder_for(args.encoder, args.head), head=args.head, device=args.device,
        batch_size=args.batch_size, threads=args.threads if args.threads else (1 if args.dask or args.scheduler else None),
        encoder_weights=args.encoder_weights, tau=args.tau,
    )
    result = predict_slides(
        inputs, args.out, factory, mpp=args.mpp, tile_size=args.tile_size, overlap=args.overlap,
        formats=_formats(args.format), gzip=args.gzip, tissue=not args.no_tissue_mask, overwrite=args.overwrite,
        dask=args.dask, scheduler=args.scheduler, n_workers=args.workers, progress=not args.quiet,
        geojson_per_class=args.geojson_per_class,
    )
    if args.overlay:
        _write_overlays(result, Path(args.out), args.quiet)
    for r in result.slides:
        if r.ok:
            counts = (r.summary or {}).get("counts", {})
            print(f"{r.path}: {r.status}, {sum(counts.values())} nuclei {json.dumps(counts)}")
        else:
            print(f"{r.path}: FAILED: {r.error}", file=sys.stderr)
    return result.exit_code


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return common.run(_main, args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
