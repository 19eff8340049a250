"""denuc-eval: distance-based F1 of the pipeline on an annotated data set."""

from __future__ import annotations

import json
import sys
import time


from . import common


def build_parser():
    from ..data import DATASET_NAMES
    from ..metrics import MATCHING

    p = common.parser("denuc-eval", "Score detection (and classification with --head) against dot annotations.")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--root", required=True, help="data set folder")
    p.add_argument("--split", default="val")
    p.add_argument("--detector", help="detector checkpoint (.safetensors); default: the bundled one")
    p.add_argument("--encoder", help="encoder name (default: the one --head was trained with)")
    p.add_argument("--encoder-weights", help="local state dict for the encoder (no network)")
    p.add_argument("--head", help="linear head (.safetensors), or bundled (the head shipped for --encoder); without it only "
                   "detection is scored")
    p.add_argument("--class-map", metavar="MAP", help='folder data: your class names -> the head\'s, e.g. "Tumor=tumor,Immune cells=lymphocyte,Necrosis=" '
                   "(empty: ignore); derived classes (Tumor: Positive) follow their base name")
    p.add_argument("--mpp", type=float, help="folder data: micrometres per pixel of images whose files state none (default 0.5, with a warning)")
    p.add_argument("--radius-um", type=float, default=3.0, help="match radius in micrometres (default 3.0)")
    p.add_argument("--matching", choices=MATCHING, default="greedy")
    p.add_argument("--gt-points", action="store_true", help="classify the ground-truth points instead of detections (scores the head alone)")
    p.add_argument("--tau", type=float, help="score threshold (default: the detector's, chosen on validation data)")
    p.add_argument("--nms-um", type=float, help="NMS radius in micrometres (default: the detector's)")
    p.add_argument("--device")
    p.add_argument("--json", dest="json_out", help="write the result here (JSON)")
    return p


def evaluate(args) -> dict:
    from ..data import load_dataset
    from ..errors import DenucError
    from ..evaluation import score_pipeline
    from ..pipeline import Pipeline

    from ..data.slides import parse_class_map

    options = common.folder_options(args.dataset, parse_class_map(args.class_map), args.mpp)
    if args.head:
        pipe = Pipeline.from_defaults(args.detector, common.encoder_for(args.encoder, args.head), args.head, args.device, args.encoder_weights)
        if args.dataset == "folder":  # the user's names are matched to the head's by name, not by their order
            options["class_names"] = tuple(pipe.class_names)
    else:
        if args.gt_points:
            raise DenucError("--gt-points needs --head")
        from ..detection.checkpoint import load_detector

        pipe = Pipeline(load_detector(args.detector, args.device))
    samples = load_dataset(args.dataset, args.root, args.split, **options)
    if not samples:
        raise DenucError(f"{args.dataset} split {args.split!r} under {args.root} has no images")
    if args.head and pipe.class_names != tuple(samples[0].class_names):
        raise DenucError(f"the head's classes {list(pipe.class_names)} differ from the data set's {list(samples[0].class_names)}")
    t0 = time.time()
    res = score_pipeline(pipe, samples, args.radius_um, args.gt_points, args.matching, args.tau, args.nms_um,
                         desc=f"evaluating {args.dataset}/{args.split}")
    return {
        "dataset": args.dataset,
        "split": args.split,
        "n_images": res["n_images"],
        "radius_px": float(args.radius_um / samples[0].mpp),
        "detection": res["detection"],
        "classes": res["classes"],
        "f_avg": res["f_avg"],
        "seconds": round(time.time() - t0, 2),
    }


def _main(args) -> int:
    result = evaluate(args)
    text = json.dumps(result, indent=2)
    if args.json_out:
        from ..io.atomic import atomic_write

        atomic_write(args.json_out, text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return common.run(_main, args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
