"""The linear classification head: one ``nn.Linear(input_dim, K[+1])`` on standardised inputs.

A head reads the encoder's features of each nucleus (``feature_dim``), and with
``context_um > 0`` also the mean features of the nuclei around it and their count
(:mod:`napari_denuc.context`; ``input_dim = 2 * feature_dim + 1``). ``inputs(features, xy, mpp)``
turns one image's encoder features into the head's inputs; ``fit``, ``predict_proba`` and the
prior sample work on inputs.

Input standardisation (mean/std of the training inputs) is stored in the head, so every
encoder's raw features can be used as they come. With ``background=True`` the head has one
extra output for "not a nucleus" (label ``K`` = ``len(class_names)``); ``predict_proba`` then
returns the class probabilities renormalised over the K nucleus classes and
``background_proba`` the per-point background probability.

Saved as safetensors + a JSON sidecar ``<path>.json`` (encoder id, feature dim, class names,
colours, mpp, training summary, metrics, creation time), both written atomically. A head may
carry a **prior sample** (``prior``: a stratified sample of its training features and labels),
saved as ``<stem>.prior.safetensors`` beside it: retraining from corrections replays it so the
updated head does not forget what it knew (``napari_denuc.retrain``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .context import context_dim, with_context
from .errors import DenucError
from .io.atomic import atomic_write
from .io.naming import prior_path, sidecar_path
from .results import default_colors

FORMAT = "napari-denuc-linear-head/1"


class LinearHead:
    """Linear classifier on encoder features; see the module docstring."""

    def __init__(self, feature_dim: int, class_names, class_colors=None, encoder_id: str = "", mpp: float = 0.5,
                 background: bool = False, context_um: float = 0.0):
        import torch

        self.feature_dim = int(feature_dim)
        self.context_um = float(context_um)
        self.input_dim = context_dim(self.feature_dim) if self.context_um > 0 else self.feature_dim
        self.class_names = tuple(str(c) for c in class_names)
        if not self.class_names:
            raise DenucError("a head needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise DenucError(f"class names must be unique, got {list(self.class_names)}")
        k = len(self.class_names)
        self.class_colors = tuple(tuple(int(v) for v in c) for c in (class_colors or default_colors(k)))
        if len(self.class_colors) != k:
            raise DenucError(f"{len(self.class_colors)} colours given for {k} classes")
        self.encoder_id = str(encoder_id)
        self.mpp = float(mpp)
        self.background = bool(background)
        self.linear = torch.nn.Linear(self.input_dim, k + int(self.background))
        self.mean = np.zeros(self.input_dim, dtype=np.float32)
        self.std = np.ones(self.input_dim, dtype=np.float32)
        self.summary: dict = {}
        self.metadata: dict = {}
        self.prior: tuple | None = None  # (inputs (N, input_dim), labels (N,), class names) or None
        self.path: Path | None = None  # where it was loaded from or saved to

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def background_id(self) -> int | None:
        """The label used for background examples when ``background=True``."""
        return self.num_classes if self.background else None

    def inputs(self, features, xy, mpp: float) -> np.ndarray:
        """The head's inputs for all nuclei of one image: their encoder ``features`` (N, feature_dim),
        plus, with context, what the others within ``context_um`` of each look like. ``xy`` are the
        same nuclei in pixels of the image at ``mpp``; they are all each other's neighbours."""
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise DenucError(f"expected features of shape (N, {self.feature_dim}), got {f.shape}; was the head trained with another encoder?")
        return with_context(f, xy, mpp, self.context_um) if self.context_um > 0 else f

    # ------------------------------------------------------------------ training
    def _check_features(self, features) -> np.ndarray:
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.input_dim:
            hint = " (encoder features need head.inputs(features, xy, mpp) first)" if self.input_dim != self.feature_dim else ""
            raise DenucError(f"expected head inputs of shape (N, {self.input_dim}), got {f.shape}; was the head trained with another encoder?{hint}")
        return f

    def fit(self, features, labels, class_weight=None, epochs: int = 100, lr: float = 0.01, batch_size: int = 256,
            seed: int = 0, progress: Callable[[int, int], None] | None = None, weight_decay: float = 1e-2,
            optimizer: str = "lbfgs") -> dict:
        """Cross-entropy training on (N, input_dim) inputs and labels in [0, K) (K = background).

        ``optimizer="lbfgs"`` (default): full-batch L-BFGS, ``epochs`` iterations, ``lr`` unused;
        ``"adam"``: mini-batches of ``batch_size`` for ``epochs`` epochs at ``lr``. ``weight_decay``
        is an L2 penalty on the weights (on standardised features). ``class_weight`` is None,
        ``"balanced"`` or a sequence of per-class weights.
        """
        import torch

        t0 = time.perf_counter()
        x = self._check_features(features)
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(y) != len(x):
            raise DenucError(f"{len(x)} feature vectors but {len(y)} labels")
        n_out = self.num_classes + int(self.background)
        if len(y) and (y.min() < 0 or y.max() >= n_out):
            raise DenucError(f"labels must lie in [0, {n_out}) for classes {list(self.class_names)}"
                             + (" + background" if self.background else ""))
        if not np.isfinite(x).all():
            raise DenucError("training features contain NaN or infinity")
        counts = np.bincount(y, minlength=n_out)
        names = list(self.class_names) + (["background"] if self.background else [])
        empty = [names[i] for i in range(n_out) if counts[i] == 0]
        if empty:
            raise DenucError(
                f"no training examples for class(es) {', '.join(empty)}; annotate at least one nucleus of each class "
                "(or remove the class)"
            )
        if class_weight is None:
            w = np.ones(n_out, dtype=np.float32)
        elif isinstance(class_weight, str):
            if class_weight != "balanced":
                raise DenucError(f"class_weight must be None, 'balanced' or a list of weights, got {class_weight!r}")
            w = (len(y) / (n_out * counts)).astype(np.float32)
        else:
            w = np.asarray(class_weight, dtype=np.float32).reshape(-1)
            if len(w) != n_out:
                raise DenucError(f"class_weight has {len(w)} entries for {n_out} outputs")

        self.mean = x.mean(axis=0).astype(np.float32)
        self.std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
        torch.manual_seed(seed)
        xt = torch.from_numpy((x - self.mean) / self.std)
        yt = torch.from_numpy(y)
        wt = torch.from_numpy(w)
        lin = torch.nn.Linear(self.input_dim, n_out)
        torch.nn.init.zeros_(lin.weight)
        with torch.no_grad():  # start at the class priors
            lin.bias.copy_(torch.log(torch.from_numpy(counts.astype(np.float32) / len(y))))
        loss_fn = torch.nn.CrossEntropyLoss(weight=wt)
        history = []

        def objective(xb, yb):
            return loss_fn(lin(xb), yb) + weight_decay * 0.5 * (lin.weight**2).sum()

        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe",
                                    tolerance_change=1e-7)
            outer = max(1, int(np.ceil(epochs / 20)))
            for i in range(outer):
                def closure():
                    opt.zero_grad()
                    loss = objective(xt, yt)
                    loss.backward()
                    return loss

                loss = opt.step(closure).item()
                history.append(loss)
                if progress:
                    progress(i + 1, outer)
                if len(history) > 1 and abs(history[-2] - history[-1]) < 1e-7:
                    break
        elif optimizer == "adam":
            opt = torch.optim.Adam(lin.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            for ep in range(epochs):
                perm = torch.randperm(len(yt), generator=gen)
                total = 0.0
                for s in range(0, len(perm), batch_size):
                    idx = perm[s : s + batch_size]
                    opt.zero_grad()
                    loss = objective(xt[idx], yt[idx])
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                history.append(total / len(yt))
                if progress:
                    progress(ep + 1, epochs)
        else:
            raise DenucError(f"unknown optimizer {optimizer!r}; use 'lbfgs' or 'adam'")
        self.linear = lin
        with torch.no_grad():
            pred = lin(xt).argmax(1).numpy()
        self.summary = {
            "n_train": int(len(y)),
            "class_counts": {names[i]: int(counts[i]) for i in range(n_out)},
            "train_accuracy": float((pred == y).mean()),
            "final_loss": float(history[-1]) if history else None,
            "optimizer": optimizer,
            "epochs": int(epochs),
            "weight_decay": float(weight_decay),
            "class_weight": class_weight if class_weight is None or isinstance(class_weight, str) else [float(v) for v in w],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return dict(self.summary)

    # ------------------------------------------------------------------ inference
    def logits(self, features) -> np.ndarray:
        import torch

        x = (self._check_features(features) - self.mean) / self.std
        with torch.no_grad():
            return self.linear(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    def _softmax(self, features) -> np.ndarray:
        z = self.logits(features)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict_proba(self, features) -> np.ndarray:
        """(N, K) float32 class probabilities (renormalised over the nucleus classes if background)."""
        p = self._softmax(features)
        if self.background:
            p = p[:, : self.num_classes]
            p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        return p.astype(np.float32)

    def background_proba(self, features) -> np.ndarray:
        """(N,) probability of 'not a nucleus' (zeros when the head has no background class)."""
        if not self.background:
            return np.zeros(len(self._check_features(features)), dtype=np.float32)
        return self._softmax(features)[:, -1].astype(np.float32)

    def predict(self, features) -> np.ndarray:
        """(N,) class ids in [0, K)."""
        return self.predict_proba(features).argmax(axis=1).astype(np.int64)

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict:
        import torch

        return {
            "weight": self.linear.weight.detach().float().contiguous(),
            "bias": self.linear.bias.detach().float().contiguous(),
            "mean": torch.from_numpy(self.mean.astype(np.float32)).contiguous(),
            "std": torch.from_numpy(self.std.astype(np.float32)).contiguous(),
        }

    def save(self, path, metadata: dict | None = None) -> Path:
        """Write ``path`` (safetensors) and ``<path>.json`` atomically."""
        from safetensors.torch import save as st_save

        path = Path(path)
        meta = {
            "format": FORMAT,
            "encoder_id": self.encoder_id,
            "feature_dim": self.feature_dim,
            "context_um": self.context_um,
            "class_names": list(self.class_names),
            "class_colors": [list(c) for c in self.class_colors],
            "mpp": self.mpp,
            "background": self.background,
            "training": self.summary,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        extra = dict(self.metadata)
        extra.update(metadata or {})
        for k, v in extra.items():
            meta.setdefault(k, v) if k in ("format", "encoder_id", "feature_dim", "class_names") else meta.__setitem__(k, v)
        data = st_save(self.state_tensors(), metadata={"format": FORMAT, "encoder_id": self.encoder_id})
        if self.prior is not None:
            self._save_prior(prior_path(path))
        atomic_write(path, data)
        atomic_write(sidecar_path(path), (json.dumps(meta, indent=2, default=str) + "\n").encode())
        self.path = path
        return path

    def _save_prior(self, path: Path) -> None:
        import torch
        from safetensors.torch import save as st_save

        x, y, names = self.prior
        tensors = {"features": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16)),
                   "labels": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))}
        atomic_write(path, st_save(tensors, metadata={"class_names": json.dumps(list(names))}))

    @staticmethod
    def _load_prior(path: Path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                names = tuple(json.loads(f.metadata()["class_names"]))
                return f.get_tensor("features").astype(np.float32), f.get_tensor("labels").astype(np.int64), names
        except Exception as exc:
            raise DenucError(f"could not read the prior sample {path} ({exc.__class__.__name__}); delete it to use the head without it") from None

    @classmethod
    def load(cls, path, encoder=None) -> "LinearHead":
        """Load a head; with ``encoder``, check it was trained on that encoder's features."""
        from safetensors.torch import load_file

        path = Path(path)
        side = sidecar_path(path)
        if not path.is_file():
            raise DenucError(f"head file {path} not found; train one first or check the path")
        if not side.is_file():
            raise DenucError(f"head sidecar {side} is missing; it must sit next to the head file")
        try:
            meta = json.loads(side.read_text())
            tensors = load_file(str(path))
        except Exception as exc:
            raise DenucError(f"could not read head {path}: {exc.__class__.__name__}: {exc}") from None
        try:
            head = cls(
                feature_dim=int(meta["feature_dim"]),
                class_names=meta["class_names"],
                class_colors=[tuple(c) for c in meta.get("class_colors") or []] or None,
                encoder_id=meta.get("encoder_id", ""),
                mpp=float(meta.get("mpp", 0.5)),
                background=bool(meta.get("background", False)),
                context_um=float(meta.get("context_um", 0.0)),
            )
            import torch

            with torch.no_grad():
                head.linear.weight.copy_(tensors["weight"])
                head.linear.bias.copy_(tensors["bias"])
            head.mean = tensors["mean"].numpy().astype(np.float32)
            head.std = tensors["std"].numpy().astype(np.float32)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise DenucError(f"{path} is not a valid napari-denuc head ({exc.__class__.__name__}: {exc})") from None
        head.summary = meta.get("training", {}) or {}
        head.metadata = {k: v for k, v in meta.items() if k not in ("format", "training")}
        head.path = path
        if prior_path(path).is_file():
            head.prior = cls._load_prior(prior_path(path))
        if encoder is not None:
            enc_id = getattr(encoder, "id", "")
            enc_dim = int(getattr(encoder, "feature_dim", -1))
            if (head.encoder_id and enc_id != head.encoder_id) or enc_dim != head.feature_dim:
                raise DenucError(
                    f"head {path.name} was trained on encoder {head.encoder_id!r} ({head.feature_dim}-d features) "
                    f"but the current encoder is {enc_id!r} ({enc_dim}-d); pick that encoder or retrain the head"
                )
        return head
