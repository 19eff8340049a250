"""The result of running the pipeline on one image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Colours that read well on H&E (pink/purple): QuPath needs an RGB colour per class.
DEFAULT_COLORS = (
    (0, 200, 0),  # green
    (230, 0, 0),  # red
    (0, 120, 255),  # blue
    (255, 200, 0),  # yellow
    (255, 0, 255),  # magenta
    (0, 230, 230),  # cyan
    (255, 128, 0),  # orange
    (128, 0, 255),  # violet
    (128, 128, 128),  # grey
    (0, 0, 0),
)


DEFAULT_SOURCE = "model"  # source of a nucleus when a file or caller says nothing


def default_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n))


def index_classes(labels, class_names=None, source: str = "", hint: str = "") -> tuple[tuple[str, ...], list[int]]:
    """Class names and per-point indices for string ``labels``.

    Without ``class_names`` the classes are the labels in order of first appearance; with them,
    a label outside ``class_names`` is a DenucError naming ``source`` (``hint`` says what to do).
    """
    from .errors import DenucError

    if class_names is None:
        names = tuple(dict.fromkeys(labels)) or ("nucleus",)
    else:
        names = tuple(class_names)
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise DenucError(
                f"{source}: class(es) {', '.join(map(repr, unknown))} not among the expected classes "
                f"{', '.join(names)}{'; ' + hint if hint else ''}"
            )
    index = {n: k for k, n in enumerate(names)}
    return names, [index[lab] for lab in labels]


@dataclass
class Detections:
    """Nuclei found in one image.

    ``xy`` is (N, 2) in full-resolution pixel coordinates of the input image,
    x to the right and y down (the QuPath / GeoJSON convention).
    ``class_ids`` index ``class_names``; ``probs`` is (N, K) or None.

    ``source`` (N,) str says where each nucleus comes from (``"model"``, ``"user"``,
    ``"imported"``... free text) and ``reviewed`` (N,) bool whether a person checked it.
    Both may be given as one scalar for all nuclei; absent they are ``"model"`` and ``False``.
    """

    xy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: tuple[str, ...] = ("nucleus",)
    class_colors: tuple[tuple[int, int, int], ...] = field(default=())
    probs: np.ndarray | None = None
    source: np.ndarray | str | None = None
    reviewed: np.ndarray | bool | None = None

    def __post_init__(self):
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        n = len(self.xy)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(n)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(n)
        self.class_names = tuple(self.class_names)
        if not self.class_colors:
            self.class_colors = default_colors(len(self.class_names))
        self.class_colors = tuple(tuple(int(v) for v in c) for c in self.class_colors)
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32).reshape(n, len(self.class_names))
        # object dtype, not a fixed-width "<U": a later "imported" must fit where "user" was
        src = DEFAULT_SOURCE if self.source is None else self.source
        self.source = np.array(np.broadcast_to(np.asarray(src, dtype=object), (n,)), dtype=object)
        if not all(isinstance(v, str) for v in self.source):
            self.source = np.array([str(v) for v in self.source], dtype=object)
        rev = False if self.reviewed is None else self.reviewed
        self.reviewed = np.broadcast_to(np.asarray(rev, dtype=bool), (n,)).copy()

    def __len__(self) -> int:
        return len(self.xy)

    def take(self, index) -> Detections:
        """The nuclei at ``index`` (a boolean mask or integer indices), same classes and colours."""
        index = np.asarray(index)
        if index.dtype != bool:
            index = index.astype(np.intp)  # an empty list arrives as float64
        return Detections(
            self.xy[index],
            self.scores[index],
            self.class_ids[index],
            self.class_names,
            self.class_colors,
            None if self.probs is None else self.probs[index],
            self.source[index],
            self.reviewed[index],
        )

    def counts(self) -> dict[str, int]:
        return {name: int((self.class_ids == k).sum()) for k, name in enumerate(self.class_names)}
