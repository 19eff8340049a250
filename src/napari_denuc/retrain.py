"""Retraining the linear head from the user's reviewed and edited nuclei. No Qt.

The widget gathers the examples (cached features + the user's classes), this module checks
there are enough of each class, measures accuracy before (the current head on the examples,
which it never saw) and after (k-fold cross-validation of the new head), fits the new head on
all examples and saves it under a new version name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import DenucError

MIN_PER_CLASS = 3
MAX_FOLDS = 3
CV_MAX_EXAMPLES = 4000  # cross-validate on a stratified sample: the estimate, not the head, uses it
FAST_FIT_ABOVE = 5000  # above this many examples, fewer L-BFGS iterations (converged well before)


@dataclass
class RetrainResult:
    head: object
    path: object
    n_examples: int
    per_class: dict
    acc_before: float | None
    acc_after: float | None
    seconds: float
    fit_info: dict = field(default_factory=dict)

    def summary(self, reclassified: int | None = None, changed: int | None = None) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.per_class.items())
        lines = [f"Trained on {self.n_examples} nuclei ({per}) in {self.seconds:.1f} s."]
        if "points_sampled" in self.fit_info:
            lines.append(f"Features: {self.fit_info['points_sampled']} nuclei newly sampled, the rest from the cache.")
        if self.acc_before is not None or self.acc_after is not None:
            b = "n/a" if self.acc_before is None else f"{100 * self.acc_before:.1f}%"
            a = "n/a" if self.acc_after is None else f"{100 * self.acc_after:.1f}%"
            lines.append(f"Accuracy on your nuclei: before {b} (old head), after {a} (cross-validated).")
        if reclassified is not None:
            lines.append(f"Reclassified {reclassified} unedited nuclei; {changed or 0} changed class.")
        lines.append(f"Saved as {getattr(self.path, 'name', self.path)}.")
        return "\n".join(lines)


def check_examples(labels, class_names, min_per_class: int = MIN_PER_CLASS) -> dict:
    """Per-class example counts; raise DenucError saying what is missing when a class has too few."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = {n: int((labels == k).sum()) for k, n in enumerate(class_names)}
    if len(class_names) < 2:
        raise DenucError(
            "the head needs at least two classes; add a class, label some nuclei with it and retrain"
        )
    short = {n: c for n, c in counts.items() if c < min_per_class}
    if short:
        what = ", ".join(f"'{n}' has {c}" for n, c in short.items())
        raise DenucError(
            f"not enough examples to retrain: {what} (need at least {min_per_class} reviewed or edited nuclei "
            f"per class); label or review more nuclei of {'that class' if len(short) == 1 else 'those classes'} and retrain"
        )
    return counts


def _folds(labels, k: int, seed: int = 0) -> np.ndarray:
    """Stratified fold index per example."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _new_head(template, feature_dim, class_names, class_colors, encoder_id="", mpp=0.5):
    """A fresh head of the template's type (LinearHead by default) for the same encoder."""
    if template is not None:
        cls = type(template)
        encoder_id, mpp = getattr(template, "encoder_id", encoder_id), getattr(template, "mpp", mpp)
    else:
        from .head import LinearHead as cls
    return cls(feature_dim, tuple(class_names), class_colors=tuple(class_colors), encoder_id=encoder_id, mpp=mpp)


def _fit(head, features, labels):
    import inspect

    if "epochs" in inspect.signature(head.fit).parameters:
        return head.fit(features, labels, epochs=40 if len(labels) > FAST_FIT_ABOVE else 100)
    return head.fit(features, labels)


def _stratified_sample(labels, n_max, seed=0):
    if len(labels) <= n_max:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        m = max(MIN_PER_CLASS, int(round(n_max * len(idx) / len(labels))))
        keep.append(rng.choice(idx, size=min(m, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def cross_val_accuracy(features, labels, class_names, class_colors, template=None, k: int = MAX_FOLDS) -> float | None:
    labels = np.asarray(labels)
    sub = _stratified_sample(labels, CV_MAX_EXAMPLES)
    features, labels = np.asarray(features)[sub], labels[sub]
    k = int(min(k, np.bincount(labels, minlength=len(class_names)).min()))
    if k < 2:
        return None
    fold = _folds(labels, k)
    correct = 0
    for f in range(k):
        tr, te = fold != f, fold == f
        h = _new_head(template, features.shape[1], class_names, class_colors)
        _fit(h, features[tr], labels[tr])
        correct += int((np.asarray(h.predict(features[te])) == labels[te]).sum())
    return correct / len(labels)


def retrain_head(old_head, features, labels, class_names, class_colors, save_path, metadata=None, cv: bool = True) -> RetrainResult:
    """Fit a new head on ``features``/``labels`` and save it to ``save_path`` (which must not exist)."""
    t0 = time.perf_counter()
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    per_class = check_examples(labels, class_names)
    acc_before = None
    if old_head is not None and tuple(old_head.class_names) == tuple(class_names):
        acc_before = float((np.asarray(old_head.predict(features)) == labels).mean())
    acc_after = cross_val_accuracy(features, labels, class_names, class_colors, template=old_head) if cv else None
    head = _new_head(old_head, features.shape[1], class_names, class_colors)
    info = _fit(head, features, labels) or {}
    if save_path.exists():
        raise DenucError(f"{save_path} already exists; heads are never overwritten")
    meta = {"trained_on": "napari-denuc corrections", "n_examples": int(len(labels)), "per_class": per_class}
    if acc_before is not None:
        meta["accuracy_before"] = acc_before
    if acc_after is not None:
        meta["cv_accuracy"] = acc_after
    meta.update(metadata or {})
    head.save(save_path, metadata=meta)
    return RetrainResult(head, save_path, int(len(labels)), per_class, acc_before, acc_after, time.perf_counter() - t0, info)
