"""Points as CSV: ``x,y,class,score,prob_<class>...,source,reviewed``, one nucleus per row.

Coordinates are library pixel coordinates (pixel centres at integers), with no offset.
"""

from __future__ import annotations

import csv as _csv
import io
from pathlib import Path

import numpy as np

from ..errors import DenucError
from ..results import DEFAULT_SOURCE, Detections, index_classes
from .atomic import atomic_writer

CLASS_COLUMNS = ("class", "label", "classification", "name")  # accepted names of the class column


def write_csv(path, det: Detections) -> Path:
    """Write ``det`` to ``path`` atomically, header ``x,y,class,score[,prob_<class>...],source,reviewed``.

    ``class`` holds class names; ``prob_<class>`` columns are written when ``det.probs`` is set;
    ``source`` is a string and ``reviewed`` is 0 or 1.
    """
    return write_csv_chunks(path, [det])


def write_csv_chunks(path, chunks) -> Path:
    """Write an iterable of Detections as one CSV, streaming (one chunk in memory at a time).

    The header follows the first chunk; every chunk must have its classes and probabilities.
    """
    path = Path(path)
    with atomic_writer(path) as f:
        header = None
        for det in chunks:
            if header is None:
                header = _header(det)
                f.write((",".join(header) + "\n").encode("utf-8"))
            elif _header(det) != header:
                raise ValueError(f"chunks disagree on the columns ({','.join(_header(det))} vs {','.join(header)})")
            f.write(_rows(det).encode("utf-8"))
        if header is None:
            f.write(b"x,y,class,score,source,reviewed\n")
    return path


def _header(det: Detections) -> list[str]:
    probs = [f"prob_{n}" for n in det.class_names] if det.probs is not None else []
    return ["x", "y", "class", "score", *probs, "source", "reviewed"]


def _cell(text: str) -> str:
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _rows(det: Detections) -> str:
    names = [_cell(n) for n in det.class_names]
    src = {s: _cell(s) for s in set(det.source)}
    lines = []
    for i in range(len(det)):
        row = [f"{det.xy[i, 0]:.3f}", f"{det.xy[i, 1]:.3f}", names[det.class_ids[i]], f"{det.scores[i]:.6g}"]
        if det.probs is not None:
            row += [f"{p:.6g}" for p in det.probs[i]]
        row += [src[det.source[i]], "1" if det.reviewed[i] else "0"]
        lines.append(",".join(row))
    return "".join(line + "\n" for line in lines)


def _flag(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "y"):
        return True
    if t in ("", "0", "false", "no", "n"):
        return False
    raise ValueError(f"reviewed must be 0 or 1, not {text!r}")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _decimal_comma(cell: str) -> str:
    """ "12,5" -> "12.5" when that makes a number; any other text is kept."""
    dotted = cell.strip().replace(",", ".")
    return dotted if "," in cell and _is_number(dotted) else cell


def read_csv(path, class_names=None) -> Detections:
    """Read points from a CSV file.

    Columns (case-insensitive): ``x`` and ``y`` are required; optional ``class`` (also
    ``label``, ``classification`` or ``name``), ``score`` (default 1.0), ``prob_<class>``,
    ``source`` (default ``"model"``) and ``reviewed`` (0/1 or true/false, default false).
    A file whose first row is numeric has no header and is read as ``x,y[,class[,score]]``
    (the OCELOT layout). Fields separated by ``;`` with ``,`` as the decimal mark (what
    spreadsheets save in many European locales) are read as such.

    The class column holds either names or, when every value is an integer, **1-based class
    ids**: ``1`` is ``class_names[0]``. Integer ids without ``class_names`` become the names
    ``"1"``, ``"2"``, ... up to the largest id, so ids keep their meaning. Without a class
    column every point is of class ``"nucleus"`` (or the only entry of ``class_names``).

    Without ``class_names``, name classes are ordered by first appearance; with it, unknown
    names raise DenucError listing them.

    A malformed row (missing or non-numeric coordinate, bad score) raises DenucError naming
    its line: user point files should be fixed rather than silently shortened. Empty lines
    are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DenucError(f"point file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DenucError(f"{path} is not a text CSV file") from None
    # Spreadsheets in many European locales save CSV with ";" between fields and "," as the
    # decimal mark: read such a file as it was meant (fields split at ";", "12,5" is 12.5).
    head = next((line for line in text.splitlines() if line.strip()), "")
    semicolons = ";" in head and (len(head.split(";")) > len(head.split(",")) or "," not in head)
    reader = _csv.reader(io.StringIO(text), delimiter=";" if semicolons else ",")
    rows = [(n, [_decimal_comma(c) for c in r] if semicolons else r) for n, r in enumerate(reader, 1) if r and any(c.strip() for c in r)]
    if not rows:
        raise DenucError(f"{path} is empty; a point CSV needs at least the header x,y")
    first = [c.strip() for c in rows[0][1]]
    if len(first) >= 2 and _is_number(first[0]) and _is_number(first[1]):
        cols = {"x": 0, "y": 1}
        if len(first) >= 3:
            cols["class"] = 2
        if len(first) >= 4:
            cols["score"] = 3
        prob_cols = {}
    else:
        header = [c.lower() for c in first]
        if "x" not in header or "y" not in header:
            raise DenucError(f"{path}: the header must name columns x and y (found: {','.join(first)})")
        cols = {"x": header.index("x"), "y": header.index("y")}
        for alias in CLASS_COLUMNS:
            if alias in header:
                cols["class"] = header.index(alias)
                break
        for opt in ("score", "source", "reviewed"):
            if opt in header:
                cols[opt] = header.index(opt)
        prob_cols = {first[j][5:]: j for j, h in enumerate(header) if h.startswith("prob_")}
        rows = rows[1:]

    xy, labels, scores, probs, sources, reviewed = [], [], [], [], [], []
    for lineno, r in rows:
        r = [c.strip() for c in r]
        try:
            x, y = float(r[cols["x"]]), float(r[cols["y"]])
            if not np.isfinite([x, y]).all():
                raise ValueError("coordinate is not finite")
            label = r[cols["class"]] if "class" in cols else None
            if label == "":
                raise ValueError("empty class")
            score = float(r[cols["score"]]) if "score" in cols and r[cols["score"]] != "" else 1.0
            pr = {name: float(r[j]) for name, j in prob_cols.items()}
            src = r[cols["source"]] if "source" in cols and r[cols["source"]] != "" else DEFAULT_SOURCE
            rev = _flag(r[cols["reviewed"]]) if "reviewed" in cols else False
        except (ValueError, IndexError) as exc:
            raise DenucError(f"{path}, line {lineno}: malformed row {','.join(r)!r} ({exc}); fix or delete it") from None
        xy.append((x, y))
        labels.append(label)
        scores.append(score)
        probs.append(pr)
        sources.append(src)
        reviewed.append(rev)

    if "class" not in cols:
        names = tuple(class_names) if class_names is not None else ("nucleus",)
        if len(names) != 1:
            raise DenucError(f"{path} has no class column but {len(names)} classes are expected; add a class column")
        ids = [0] * len(xy)
    elif labels and all(lab.lstrip("+").isdigit() for lab in labels):
        ints = [int(lab) for lab in labels]
        names = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(1, max(ints) + 1))
        bad = sorted({k for k in ints if not 1 <= k <= len(names)})
        if bad:
            raise DenucError(
                f"{path}: class id(s) {', '.join(map(str, bad))} out of range 1..{len(names)} "
                f"(ids are 1-based into {', '.join(names)})"
            )
        ids = [k - 1 for k in ints]
    else:
        names, ids = index_classes(labels, class_names, str(path))

    prob_arr = None
    if prob_cols and set(names) <= set(prob_cols):
        prob_arr = np.array([[p[n] for n in names] for p in probs], dtype=np.float32).reshape(len(xy), len(names))
    return Detections(
        xy=np.asarray(xy, dtype=np.float64).reshape(-1, 2),
        scores=np.asarray(scores, dtype=np.float32),
        class_ids=np.asarray(ids, dtype=np.int64),
        class_names=names,
        probs=prob_arr,
        source=np.array(sources, dtype=object),
        reviewed=np.array(reviewed, dtype=bool),
    )
