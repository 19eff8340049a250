"""Retraining the linear head from a user's corrections without forgetting what it knew. No Qt.

A fresh head fitted on a few hundred corrections knows only those nuclei: on a new site's
other tiles it did worse than the head it replaced (f_avg 0.48 -> 0.37 after 100 corrections).
So the new head *updates* the old one instead (:func:`update_head`):

* it starts from the old head's weights, in the old head's feature standardisation;
* on the old head's **prior sample** (``LinearHead.prior``: a stratified sample of its training
  features, stored beside it as ``<head>.prior.safetensors``) the new head is taught the old
  head's own probabilities (distillation, as in "Learning without Forgetting"), and on the
  corrections their labels, each weighted ``CORRECTION_WEIGHT`` times (all of them together at
  most as much as the prior). With no corrections the optimum is exactly the old head; a
  refit on the prior's labels instead drifted from it (f_avg -0.02 after one correction);
* the penalty pulls the weights toward the old head's (not toward zero), so with no prior
  sample (a head trained elsewhere) the update is still a small step from the old head;
* classes new to the head get a fresh row (the old classes keep theirs); their examples weigh
  at least NEW_CLASS_SHARE of the prior, and the distillation ignores them (the old head's
  silence about a class it never knew is no evidence against it).

Nothing is refused for having few examples: one correction makes one small step. Accuracy
before/after is estimated by k-fold cross-validation over the user's nuclei (each fold's
update never sees that fold) on the nuclei the old head never learned from (a head kept from an earlier
update learned from those corrections: they are trained on, not scored) when there are enough of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DenucError

CORRECTION_WEIGHT = 2.0  # chosen with training/bench_adapt.py: x5 and x20 overfitted the corrected tiles (docs/benchmarks.md)
# Pull toward the old weights, on the scale of the shipped heads' weight decay (0.3). With the
# neighbourhood-context head, 0.03 let two tiles' corrections pull the head toward those tiles
# (mean f_avg change down to -0.010 on the site's other tiles); 0.3 keeps it >= -0.002 (docs/benchmarks.md).
ANCHOR = 0.3
NEW_ROW_DECAY = 0.03  # a new class's row has no old weights to stay near: only a light pull toward zero
PRIOR_SIZE = 6000  # nuclei in a head's prior sample (fp16: 18.9 MB for the default head's 1569-d inputs)
NEW_CLASS_SHARE = 0.05  # least total weight of a new class's examples, as a share of the prior
MIN_CV_EXAMPLES = 20  # below this many user nuclei a cross-validated accuracy is noise
# Two folds, not three: with the 1569-d context head three made the widget's retrain of 20,000
# nuclei take 5.2 s (target < 5 s); the head itself does not depend on it, only its estimate.
CV_FOLDS = 2
CV_MAX_EXAMPLES = 1500  # user nuclei used for the held-out before/after estimate


@dataclass
class RetrainResult:
    head: object
    path: Path | None
    n_examples: int
    per_class: dict
    acc_before: float | None  # old head on the user's nuclei (all held out for it)
    acc_after: float | None  # updated head, k-fold cross-validated on the same nuclei
    n_eval: int  # how many user nuclei the two accuracies were measured on (0: not estimated)
    seconds: float
    fit_info: dict = field(default_factory=dict)

    def summary(self, reclassified: int | None = None, changed: int | None = None) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.per_class.items() if v)
        lines = [f"Updated the head with {self.n_examples} of your nuclei ({per}) in {self.seconds:.1f} s."]
        if self.acc_before is not None and self.acc_after is not None:
            lines.append(
                f"Accuracy on your nuclei, held out: before {100 * self.acc_before:.1f}%, after {100 * self.acc_after:.1f}% "
                f"({self.n_eval} nuclei, {self.fit_info.get('folds', '?')}-fold)."
            )
        else:
            lines.append(f"Too few nuclei (< {MIN_CV_EXAMPLES}) to measure accuracy before/after.")
        if reclassified is not None:
            lines.append(f"Reclassified {reclassified} unedited nuclei; {changed or 0} changed class.")
        if self.path is not None:
            lines.append(f"Saved as {Path(self.path).name}.")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- prior sample


def stratified_sample(labels, n_max: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``n_max`` examples keeping the class proportions (>= 1 per class)."""
    labels = np.asarray(labels)
    if len(labels) <= n_max:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        m = max(1, int(round(n_max * len(idx) / len(labels))))
        keep.append(rng.choice(idx, size=min(m, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


# ----------------------------------------------------------------------------- the update


def prior_sample(features, labels, class_names, size: int = PRIOR_SIZE) -> tuple:
    """A head's prior sample: at most ``size`` of its training examples, class proportions kept."""
    keep = stratified_sample(labels, size)
    return np.asarray(features)[keep], np.asarray(labels)[keep], tuple(class_names)


def _relabel(labels, from_names, to_names) -> np.ndarray:
    index = {n: i for i, n in enumerate(to_names)}
    missing = sorted(set(from_names) - set(index))
    if missing:
        raise DenucError(f"class(es) {', '.join(missing)} of the current head are missing from the new class list")
    return np.array([index[n] for n in from_names], dtype=np.int64)[np.asarray(labels, dtype=np.int64)]


def update_head(old_head, features, labels, class_names, class_colors=None, prior=None,
                correction_weight: float = CORRECTION_WEIGHT, anchor: float = ANCHOR, iterations: int = 60):
    """A new head: ``old_head`` updated with (``features``, ``labels`` indexing ``class_names``).

    ``prior`` = (features, labels, class_names): with an old head, the new head is taught the
    old head's own probabilities on these features (distillation: with no corrections the
    optimum *is* the old head); without one, their labels. See the module docstring.
    """
    import torch

    from .head import LinearHead

    x = np.asarray(features, dtype=np.float32).reshape(len(labels), -1)
    y = np.asarray(labels, dtype=np.int64)
    names = tuple(class_names)
    k = len(names)
    if k < 2:
        raise DenucError("the head needs at least two classes; add a class, label some nuclei with it and retrain")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DenucError(f"labels must index the classes {list(names)}")
    dim = x.shape[1] if len(x) else old_head.input_dim
    if old_head is not None:
        if getattr(old_head, "background", False):
            raise DenucError("heads with a background class cannot be updated from corrections; train one with denuc-train head")
        if old_head.input_dim != dim:
            raise DenucError(f"the current head expects {old_head.input_dim}-d inputs, the corrections have {dim}-d")
        to_new = _relabel(np.arange(old_head.num_classes), old_head.class_names, names)  # old class i -> new index
    targets = np.eye(k, dtype=np.float32)[y]
    n_prior = len(prior[1]) if prior is not None else 0
    known = np.ones(k, dtype=bool)  # classes the prior speaks about
    if old_head is not None:
        known[:] = False
        known[to_new] = True
    # Each correction counts ``correction_weight`` times, but all of them together never
    # outweigh the prior: the head must keep working where the user said nothing.
    weight = min(float(correction_weight), max(n_prior, PRIOR_SIZE) / max(len(y), 1))
    w = np.full(len(y), weight, dtype=np.float32)
    # A class the user just added has no prior to lean on: its few examples together weigh at
    # least NEW_CLASS_SHARE of the prior, or five labelled plasma cells would never win a nucleus.
    for c in np.flatnonzero(~known):
        mine = y == c
        if mine.any():
            w[mine] = max(weight, NEW_CLASS_SHARE * max(n_prior, PRIOR_SIZE) / mine.sum())
    if n_prior:
        px = np.asarray(prior[0], np.float32)
        if old_head is not None:
            soft = np.zeros((n_prior, k), np.float32)
            soft[:, to_new] = old_head.predict_proba(px)
        else:
            soft = np.eye(k, dtype=np.float32)[_relabel(prior[1], prior[2], names)]
        x, targets = np.concatenate([px, x]), np.concatenate([soft, targets])
        w = np.concatenate([np.ones(n_prior, np.float32), w])
    if not len(x):
        raise DenucError("nothing to train on: label or review some nuclei first")

    colors = class_colors
    if colors is None and old_head is not None:
        by_name = dict(zip(old_head.class_names, old_head.class_colors))
        colors = [by_name.get(n) for n in names]
        colors = None if any(c is None for c in colors) else colors
    if old_head is not None:  # same encoder, same neighbourhood context
        head = LinearHead(old_head.feature_dim, names, class_colors=colors, encoder_id=old_head.encoder_id, mpp=old_head.mpp,
                          context_um=old_head.context_um)
    else:
        head = LinearHead(dim, names, class_colors=colors)
    w0 = torch.zeros(k, dim)
    counts = (targets * w[:, None]).sum(axis=0) + 1.0
    b0 = torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))
    if old_head is not None:
        head.mean, head.std = old_head.mean.copy(), old_head.std.copy()  # the old weights live in this space
        st = old_head.state_tensors()
        w0[torch.from_numpy(to_new)] = st["weight"]
        b0[torch.from_numpy(to_new)] = st["bias"]
    else:
        head.mean = x.mean(axis=0).astype(np.float32)
        head.std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
    xt = torch.from_numpy((x - head.mean) / head.std)
    tt = torch.from_numpy(targets)
    # Normalised as if the prior held at least PRIOR_SIZE examples: without a prior sample, a few
    # corrections are a few examples among the many the old head was fitted on, a small step.
    wt = torch.from_numpy(w / max(float(w.sum()), PRIOR_SIZE + float(w[n_prior:].sum())))
    lin = torch.nn.Linear(dim, k)
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.copy_(b0)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_change=1e-9)

    # On the prior, the softmax runs over the classes the old head knew: its silence about a
    # class the user just added is no evidence against that class (as in Learning without Forgetting).
    unknown = torch.from_numpy(~known)
    row_pull = torch.where(unknown, torch.tensor(min(anchor, NEW_ROW_DECAY)), torch.tensor(float(anchor)))
    is_prior = torch.arange(len(xt)) < n_prior

    def closure():
        opt.zero_grad()
        z = lin(xt)
        z = torch.where(is_prior[:, None] & unknown[None, :], torch.full_like(z, -1e4), z)
        ce = torch.nn.functional.cross_entropy(z, tt, reduction="none")
        # The bias is anchored too: otherwise its optimum is the corrections' alone, whatever their weight.
        pull = (((lin.weight - w0) ** 2).sum(1) + (lin.bias - b0) ** 2) * row_pull
        loss = (ce * wt).sum() + 0.5 * pull.sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.linear = lin
    head.summary = {"update": {"corrections": int(len(y)), "prior": n_prior, "correction_weight": weight, "anchor": float(anchor)}}
    return head


def _folds(labels, k: int, seed: int = 0) -> np.ndarray:
    """Stratified fold index per example."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % k  # rotate so small classes spread over folds
        offset += len(idx)
    return fold


def held_out_accuracy(old_head, features, labels, class_names, prior=None, scored=None, **update_options):
    """(before, after, n, folds): old head vs. updated head on the same held-out folds of the user's
    nuclei; (None, None, 0, 0) when there are fewer than MIN_CV_EXAMPLES.

    ``scored`` (bool per example, default all): the examples the two heads are scored on. The
    others (those the old head already learned from: its accuracy on them is not held out) are
    only trained on.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scored = np.ones(len(labels), bool) if scored is None else np.asarray(scored, dtype=bool)
    # The estimate, not the head, uses a stratified sample: k updates on 20,000 nuclei would keep
    # the user waiting for a number that 1,500 of them give as well.
    sub = stratified_sample(labels, CV_MAX_EXAMPLES)
    features, labels, scored = np.asarray(features)[sub], labels[sub], scored[sub]
    n = int(scored.sum())
    if n < MIN_CV_EXAMPLES:
        return None, None, 0, 0
    k = CV_FOLDS
    fold = np.empty(len(labels), dtype=np.int64)
    for part in (scored, ~scored):  # stratified within the scored ones: each fold holds its share of them
        fold[part] = _folds(labels[part], k)
    names = tuple(class_names)
    before = after = 0
    if old_head is not None:
        old_to_new = {i: names.index(c) for i, c in enumerate(old_head.class_names) if c in names}
        pred_old = np.array([old_to_new.get(int(p), -1) for p in old_head.predict(features[scored])])
        before = int((pred_old == labels[scored]).sum())
    for f in range(k):
        tr, te = fold != f, (fold == f) & scored
        h = update_head(old_head, features[tr], labels[tr], names, prior=prior, **update_options)
        after += int((h.predict(features[te]) == labels[te]).sum())
    return (before / n if old_head is not None else None), after / n, n, k


def retrain_head(old_head, features, labels, class_names, class_colors, save_path, metadata=None, cv: bool = True,
                 prior=None, scored=None, **update_options) -> RetrainResult:
    """Update ``old_head`` with the user's corrections and save it to ``save_path`` (never overwritten;
    None: do not save). The prior sample is ``prior`` or else ``old_head.prior``. ``scored``: the
    corrections the before/after accuracy is measured on (see :func:`held_out_accuracy`).

    ``features`` are the head's inputs for the corrected nuclei: ``old_head.inputs(...)`` of the
    encoder features of all nuclei of their image, rows picked after (the context needs them all).
    """
    t0 = time.perf_counter()
    features = np.asarray(features, dtype=np.float32).reshape(len(labels), -1)
    labels = np.asarray(labels, dtype=np.int64)
    names = tuple(class_names)
    if save_path is not None and Path(save_path).exists():
        raise DenucError(f"{save_path} already exists; heads are never overwritten")
    if prior is None and old_head is not None:
        prior = old_head.prior
    if prior is not None and old_head is not None and int(prior[0].shape[1]) != old_head.input_dim:
        prior = None  # a prior of another encoder cannot be replayed
    before, after, n_eval, folds = (held_out_accuracy(old_head, features, labels, names, prior, scored, **update_options)
                                    if cv else (None, None, 0, 0))
    head = update_head(old_head, features, labels, names, class_colors, prior=prior, **update_options)
    per_class = {c: int((labels == i).sum()) for i, c in enumerate(names)}
    # The new head's prior: the old prior (capped) + these corrections, so the next update remembers both.
    if prior is not None:
        py = _relabel(prior[1], prior[2], names)
        keep = stratified_sample(py, max(0, PRIOR_SIZE - len(labels)))
        head.prior = (np.concatenate([prior[0][keep], features]), np.concatenate([py[keep], labels]), names)
    else:
        head.prior = (features, labels, names)
    head.metadata = dict(metadata or {})  # in memory as in the sidecar (e.g. which nuclei it learned from)
    if save_path is not None:
        meta = {"trained_on": "napari-denuc corrections", "n_examples": int(len(labels)), "per_class": per_class,
                "parent": str(getattr(old_head, "path", None) or "")}
        if after is not None:
            meta["held_out"] = {"accuracy_before": before, "accuracy_after": after, "n": n_eval, "folds": folds}
        head.save(save_path, metadata={**meta, **(metadata or {})})
    info = {"folds": folds, "prior": 0 if prior is None else int(len(prior[1]))}
    return RetrainResult(head, None if save_path is None else Path(save_path), int(len(labels)), per_class,
                         before, after, n_eval, time.perf_counter() - t0, info)
