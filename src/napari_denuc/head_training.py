"""Training the linear head on whole data sets: features at annotated nuclei, then a fit.

Features are read at the ground-truth points of each training image (cached by the
encoder), optionally plus a background class from detections that match no
nucleus, so the head can reject false detections. The result is scored on the val
split twice: classifying the ground-truth points (the head alone) and end to end
(detector + encoder + head), both with the distance-based F1.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import distributed
from .errors import DenucError
from .evaluation import score_pipeline
from .metrics import match_points

BACKGROUND = "background"


def sample_features(pipeline, sample, background: bool = False, radius_um: float = 3.0, context_um: float = 0.0):
    """(head inputs, labels) of one sample's annotated nuclei, plus unmatched detections as class K.

    With ``context_um`` each nucleus also reads its neighbours among the sample's points
    (:mod:`napari_denuc.context`), so the points must be all the nuclei of the image or region.
    A whole slide (``data.slides.SlideSample``) is read only in windows around its points.
    """
    from .context import with_context
    from .data.slides import SlideSample

    pts, lab = sample.points, sample.labels
    if isinstance(sample, SlideSample):
        if background:
            raise DenucError("--background needs whole images to detect on; it is not available for slides")
        from .wsi.slide_features import slide_features

        feats = slide_features(pipeline.encoder, sample.path, pts, sample.mpp)
        return (with_context(feats, pts, sample.mpp, context_um) if context_um else feats), np.asarray(lab, dtype=np.int64)
    if background:
        xy, scores = pipeline.detect(sample.image, sample.mpp)
        matched, _ = match_points(xy, sample.points, radius_um / sample.mpp, scores)
        spare = np.setdiff1d(np.arange(len(xy)), matched)
        pts = np.concatenate([pts, xy[spare]])
        lab = np.concatenate([lab, np.full(len(spare), len(sample.class_names))])
    feats = pipeline.features_at(sample.image, pts, sample.mpp) if len(pts) else np.zeros((0, pipeline.encoder.feature_dim), np.float32)
    return (with_context(feats, pts, sample.mpp, context_um) if context_um else feats), np.asarray(lab, dtype=np.int64)


def collect_features(pipeline, samples, background: bool = False, radius_um: float = 3.0, desc: str = "features",
                     context_um: float = 0.0):
    """(head inputs, labels) over ``samples``; labels index the samples' classes, K = background.

    Under torchrun each rank encodes every world-th sample and the pieces are gathered back in
    sample order, so all ranks hold exactly what one process would have computed.
    """
    from tqdm import tqdm

    rank, world = distributed.setup()
    mine = range(rank, len(samples), world)
    done = {i: sample_features(pipeline, samples[i], background, radius_um, context_um)
            for i in tqdm(mine, desc=desc, disable=rank > 0 or not sys.stderr.isatty(), leave=False)}
    parts = {i: fl for shard in distributed.all_gather(done) for i, fl in shard.items()}
    feats = [parts[i][0] for i in range(len(samples))]
    labels = [parts[i][1] for i in range(len(samples))]
    if not sum(len(y) for y in labels):
        raise DenucError("the training images hold no annotated nuclei")
    return np.concatenate(feats), np.concatenate(labels)


def train_head(pipeline, train, val=(), background=False, class_weight="balanced", weight_decay=0.03, epochs=100, lr=0.01,
               radius_um=3.0, log=print, context_um: float = 0.0):
    """Fit a new LinearHead for ``pipeline.encoder`` on ``train``; attach it to the pipeline and score it on ``val``."""
    from .head import LinearHead

    names = tuple(train[0].class_names)
    if any(tuple(s.class_names) != names for s in list(train) + list(val)):
        raise DenucError("all training and validation data sets must share the same class names; map them first")
    t0 = time.time()
    x, y = collect_features(pipeline, train, background, radius_um, "train features", context_um)
    t_feat = time.time() - t0
    head = LinearHead(pipeline.encoder.feature_dim, names, encoder_id=pipeline.encoder.id, mpp=pipeline.encoder.mpp, background=background,
                      context_um=context_um)
    t1 = time.time()
    fit = head.fit(x, y, class_weight=class_weight, weight_decay=weight_decay, epochs=epochs, lr=lr)
    t_fit = time.time() - t1
    if not background:  # the sample that retraining from corrections replays (napari_denuc.retrain)
        from .retrain import prior_sample

        head.prior = prior_sample(x, y, names)
    pipeline.head = head
    report = {
        "n_train_points": int(len(y)),
        "train_counts": {n: int((y == i).sum()) for i, n in enumerate(names + ((BACKGROUND,) if background else ()))},
        "feature_seconds": round(t_feat, 1),
        "fit_seconds": round(t_fit, 2),
        "fit": fit,
    }
    if val and distributed.setup()[0] == 0:
        report["val_gt_points"] = score_pipeline(pipeline, val, radius_um, gt_points=True)
        report["val_end_to_end"] = score_pipeline(pipeline, val, radius_um)
        log(
            f"val f_avg {report['val_end_to_end']['f_avg']:.4f} end to end, "
            f"{report['val_gt_points']['f_avg']:.4f} at ground-truth points"
        )
    return head, report


def retrain_from_samples(pipeline, old_head, samples, save_path, metadata=None):
    """Never-forget retraining of ``old_head`` from corrected nuclei (e.g. QuPath exports on slides).

    Features are read at the samples' points and handed, with their classes, to
    ``retrain.retrain_head``, which starts from the old head and its prior sample and adds the
    corrections. The samples' classes start with the old head's; any after them are new classes
    (``data.slides.load_slides(class_names=old_head.class_names, extend=True)``).
    Returns what ``retrain_head`` returns (``.head`` is the new head, saved at ``save_path``).
    """
    from pathlib import Path

    from .results import default_colors
    from .retrain import retrain_head

    old = tuple(old_head.class_names)
    names = tuple(samples[0].class_names) if samples else old
    if any(tuple(s.class_names) != names for s in samples) or names[: len(old)] != old:
        raise DenucError(f"the corrections' classes must start with the head's ({', '.join(old)}); map them with --class-map")
    x, y = collect_features(pipeline, samples, desc="correction features", context_um=old_head.context_um)
    colors = tuple(old_head.class_colors) + tuple(default_colors(len(names))[len(old):])
    return retrain_head(old_head, x, y, names, colors, Path(save_path), metadata={"n_corrections": len(y), **(metadata or {})})
