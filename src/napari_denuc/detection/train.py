"""Training the point detector, P2PNet style (paper section 2.2, "Learning").

Each ground-truth nucleus is assigned one-to-one to a grid proposal by Hungarian
matching on a cost of distance minus score; matched proposals learn their offset
(L2, in units of the grid stride) and a positive score, all others a negative
score (binary cross-entropy, background down-weighted). Several data sets can
be trained jointly: each is resampled to the model's mpp first.

Training is resumable: ``<out>/last.safetensors`` + ``last.json`` hold the model,
the optimiser and the epoch; the best checkpoint on validation data is
``<out>/best.safetensors`` (a normal detector checkpoint). Under ``torchrun``
(``WORLD_SIZE`` set) it runs DistributedDataParallel: gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .. import distributed
from ..errors import DenucError
from ..geometry import rescale_points
from .augment import Augment, augment
from .infer import detect_at_model_mpp, point_nms, resample
from .model import STRIDE, PointDetector


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)  # [(dataset name, root), ...]
    val: list = field(default_factory=list)  # [(dataset name, root, split), ...]; default: the same roots, split "val"
    out: str = "runs/detector"
    backbone: str = "shufflenet_v2_x0_5"
    pretrained: bool = False
    mpp: float = 0.5
    epochs: int = 100
    crop: int = 256
    batch_size: int = 16
    crops_per_image: int = 4  # crops drawn per training image per epoch
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    reg_coef: float = 1.0
    neg_weight: float = 0.5
    match_point_cost: float = 0.8  # cost per stride of distance, against 1.0 per unit of score
    eval_every: int = 2
    radius_um: float = 3.0
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch default
    max_images: int = 0  # for smoke tests: use only this many training images (0 = all)
    micro_batches: int = 1  # split each process's share of a batch into this many forward passes
    augment: dict = field(default_factory=dict)  # Augment.from_dict: optional "preset" + fields; empty = the shipped recipe
    freeze_stages: int = 0  # pretrained timm backbones: freeze the stem and this many first stages (kept in eval mode)
    keep_tables: bool = False  # store the whole tau x NMS table of every evaluation in the history (LOSO selection)


def hungarian_targets(logits, xy, gt, cfg: TrainConfig):
    """Matched proposal indices and ground-truth indices for one image."""
    if len(gt) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    with torch.no_grad():
        dist = torch.cdist(xy.reshape(-1, 2), gt) / STRIDE
        cost = cfg.match_point_cost * dist - torch.sigmoid(logits.reshape(-1, 1))
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows, cols


def detector_loss(logits, xy, gts, cfg: TrainConfig):
    """Loss for a batch: logits (B, h, w), xy (B, h, w, 2), gts list of (M, 2) tensors."""
    b = logits.shape[0]
    target = torch.zeros_like(logits).reshape(b, -1)
    reg_terms = []
    for i in range(b):
        rows, cols = hungarian_targets(logits[i], xy[i], gts[i], cfg)
        if len(rows):
            rows_t = torch.as_tensor(rows, device=logits.device)
            target[i, rows_t] = 1.0
            pred = xy[i].reshape(-1, 2)[rows_t]
            reg_terms.append(((pred - gts[i][torch.as_tensor(cols, device=logits.device)]) / STRIDE).pow(2).sum(1))
    weight = torch.where(target > 0, 1.0, cfg.neg_weight)
    cls = F.binary_cross_entropy_with_logits(logits.reshape(b, -1), target, weight=weight, reduction="sum") / weight.sum()
    reg = torch.cat(reg_terms).mean() if reg_terms else logits.sum() * 0
    return cls + cfg.reg_coef * reg, {"cls": cls.item(), "reg": reg.item()}


def prepare(samples, mpp: float):
    """Resample each sample to ``mpp``; returns [(image, points)]."""
    out = []
    for s in samples:
        k = s.mpp / mpp
        img = resample(s.image, k)
        out.append((img, rescale_points(s.points, k) if abs(k - 1) >= 1e-3 else s.points))
    return out


TAUS = [round(t, 2) for t in np.arange(0.2, 0.81, 0.05)]  # score thresholds tried on validation data
NMS_UMS = (2.0, 3.0, 4.0, 5.0)


def evaluate_detector(model, val, radius_um: float, mpp: float, taus=None, nms_ums=NMS_UMS):
    """Detection F1 on prepared val data for a grid of thresholds; returns the best and the table."""
    from ..metrics import PointScorer

    taus = taus if taus is not None else TAUS
    model.eval()
    raw = [detect_at_model_mpp(model, img, tau=min(taus)) for img, _ in val]
    table = []
    for nms in nms_ums:
        kept = [(xy[point_nms(xy, sc, nms / mpp)], sc[point_nms(xy, sc, nms / mpp)]) for xy, sc in raw]
        for tau in taus:
            scorer = PointScorer()
            for (xy, sc), (_, gt) in zip(kept, val):
                m = sc > tau
                scorer.add(xy[m], gt, radius_um / mpp, scores=sc[m])
            tp, fp, fn = (int(v) for v in scorer.det)
            table.append({"tau": tau, "nms_um": nms, "tp": tp, "fp": fp, "fn": fn, **scorer.result()["detection"]})
    best = max(table, key=lambda r: r["f1"])
    return best, table


def _lr_at(cfg: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay; ``progress`` in epochs (fractional)."""
    if progress < cfg.warmup_epochs:
        return cfg.lr * (progress + 1e-3) / cfg.warmup_epochs
    t = (progress - cfg.warmup_epochs) / max(1e-9, cfg.epochs - cfg.warmup_epochs)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_state(path: Path, model, opt, epoch: int, best: dict, history: list, cfg: TrainConfig):
    """Resume state: model + optimiser tensors in safetensors, the rest in JSON (no pickles)."""
    from safetensors.torch import save

    from ..io.atomic import atomic_write

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    atomic_write(path.with_suffix(".safetensors"), save(tensors))
    info = {"epoch": epoch, "best": best, "history": history, "config": asdict(cfg)}
    atomic_write(path.with_suffix(".json"), json.dumps(info, indent=1))


def _load_state(path: Path, model, opt):
    from safetensors.torch import load_file

    tensors = load_file(str(path.with_suffix(".safetensors")))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    return json.loads(path.with_suffix(".json").read_text())


def load_training_data(cfg: TrainConfig):
    from ..data import load_dataset

    train, val = [], []
    for name, root in cfg.data:
        train += load_dataset(name, root, "train")
    for entry in cfg.val or [(n, r, "val") for n, r in cfg.data]:
        val += load_dataset(*entry)
    if cfg.max_images:
        train = train[: cfg.max_images]
        val = val[: max(1, cfg.max_images // 4)]
    if not train:
        raise DenucError("no training images found; check --data")
    return train, val


def train_detector(cfg: TrainConfig, progress=True, log=print, samples=None) -> dict:
    """Train (or resume) a detector; returns the best validation result.

    ``samples=(train, val)`` (lists of data.Sample) replaces loading ``cfg.data``: the
    leave-one-site-out protocol (training/loso_detector.py) passes its own split.
    """
    from tqdm import tqdm

    from .checkpoint import save_detector

    rank, world = distributed.setup()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    # The model and the augmentation first: a bad backbone, --freeze-stages or preset fails before the data load.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PointDetector(cfg.backbone, pretrained=cfg.pretrained).to(device)
    if cfg.freeze_stages:
        model.backbone.freeze(cfg.freeze_stages)
    aug = Augment.from_dict(cfg.augment)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_samples, val_samples = samples if samples is not None else load_training_data(cfg)
    train = prepare(train_samples, cfg.mpp)
    val = prepare(val_samples, cfg.mpp)
    summary = {
        "datasets": [n for n, _ in cfg.data],
        "n_train_images": len(train),
        "n_train_nuclei": int(sum(len(p) for _, p in train)),
        "n_val_images": len(val),
    }

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, best, history = 0, {"f1": -1.0}, []
    last = out / "last"
    if last.with_suffix(".json").is_file():
        state = _load_state(last, model, opt)
        start, best, history = state["epoch"], state["best"], state["history"]
        log(f"resuming from epoch {start} (best val F1 so far {best['f1']:.4f})")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    # One step = one global batch of ``batch_size`` crops. Crop i of a step is drawn from its own
    # random stream, so a rank (torchrun) or a micro-batch only makes the crops it uses, and
    # 2 ranks x half a batch computes the same update as 1 process with 2 micro-batches.
    if cfg.batch_size % (world * cfg.micro_batches):
        raise DenucError(f"--batch-size {cfg.batch_size} must divide evenly over {world} process(es) x {cfg.micro_batches} micro-batch(es)")
    steps = max(1, len(train) * cfg.crops_per_image // cfg.batch_size)
    chunks = np.array_split(np.arange(cfg.batch_size), world * cfg.micro_batches)[rank * cfg.micro_batches : (rank + 1) * cfg.micro_batches]
    for epoch in range(start, cfg.epochs):
        model.train()
        t_epoch = time.time()
        picks = np.random.default_rng([cfg.seed, epoch]).integers(0, len(train), size=(steps, cfg.batch_size))
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank > 0, leave=False)
        losses = []
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, epoch + step / steps)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for chunk in chunks:
                crops, gts = [], []
                for i in chunk:
                    crop, pts = augment(*train[picks[step, i]], cfg.crop, np.random.default_rng([cfg.seed, epoch, step, i]), aug)
                    crops.append(crop)
                    gts.append(torch.as_tensor(pts, dtype=torch.float32, device=device))
                x = model.normalize(torch.from_numpy(np.stack(crops)).to(device))
                logits, xy = net(x)
                loss, _ = detector_loss(logits, xy, gts, cfg)
                (loss / cfg.micro_batches).backward()
                step_loss += loss.item() / cfg.micro_batches
            opt.step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"], "train_s": round(time.time() - t_epoch, 1)}
        if rank == 0 and val and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            t0 = time.time()
            res, table = evaluate_detector(model, val, cfg.radius_um, cfg.mpp)
            if cfg.keep_tables:
                record["table"] = [[r["tau"], r["nms_um"], r["tp"], r["fp"], r["fn"]] for r in table]
            record.update(val_f1=res["f1"], val_precision=res["precision"], val_recall=res["recall"], tau=res["tau"], nms_um=res["nms_um"], eval_s=round(time.time() - t0, 1))
            if res["f1"] > best["f1"]:
                best = {**res, "epoch": epoch + 1}
                save_detector(
                    model, out / "best.safetensors", mpp=cfg.mpp, tau=res["tau"], nms_um=res["nms_um"],
                    training={**summary, "epochs": epoch + 1, "config": asdict(cfg)},
                    metrics={"val_detection": {k: res[k] for k in ("precision", "recall", "f1")}, "radius_um": cfg.radius_um},
                )
        history.append(record)
        if rank == 0:
            log(json.dumps(record))
            _save_state(last, model, opt, epoch + 1, best, history, cfg)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0 and not val:
        save_detector(model, out / "best.safetensors", mpp=cfg.mpp, training={**summary, "epochs": cfg.epochs, "config": asdict(cfg)})
    return best
