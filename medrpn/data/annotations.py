"""Reading annotation files (COCO JSON, CSV) into `Record`s plus the list of class names.

Each reader converts its format's box convention to the one used inside medrpn (absolute pixel
xyxy) and resolves image paths against the annotation file's folder, so the rest of the code never
sees a format. Readers do not open the images: the dataset reports missing or unreadable ones.
A bad entry is a `DataError` naming the file and the row (CSV) or annotation id (COCO).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medrpn.data.records import Record
from medrpn.errors import DataError

Annotations = tuple[list[Record], list[str]]

CSV_COLUMNS = ("image", "x1", "y1", "x2", "y2", "label")  # then an optional "patient_id"


def read_annotations(path: str | Path, class_names: list[str] | None = None) -> Annotations:
    """Read an annotation file, choosing the format by suffix (``.json`` COCO, ``.csv`` CSV).

    Args:
        path: the annotation file; image paths in it are relative to its folder.
        class_names: the classes to use, in label order; None takes them from the file.

    Returns:
        The records (one per image, also images without boxes) and the class names
        (``class_names[label]`` names a label).
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(path, f"unknown annotation format {path.suffix!r}: expected one of {', '.join(_READERS)}")
    return reader(path, class_names)


def read_coco(path: str | Path, class_names: list[str] | None = None) -> Annotations:
    """Read COCO detection JSON: ``images``, ``annotations`` (bbox ``[x, y, w, h]``), ``categories``.

    Labels follow the categories sorted by id (0-based), or ``class_names`` matched by category
    name when given. Every listed image is a record, with no boxes if it has no annotation;
    ``iscrowd`` annotations are skipped. An image may carry a ``patient_id``.
    """
    path = Path(path)
    data = _load_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, f"not COCO detection JSON: no '{key}' list")

    _require_keys(path, data["categories"], "category", ("id", "name"))
    _require_keys(path, data["images"], "image", ("id", "file_name"))
    _require_keys(path, data["annotations"], "annotation", ("image_id", "category_id", "bbox"))
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    if class_names is None:
        class_names = names
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise DataError(path, f"categories {unknown} are not among the given class names {class_names}")
    label_of = {c["id"]: class_names.index(str(c["name"])) for c in categories}

    boxes: dict[Any, list[list[float]]] = {}
    labels: dict[Any, list[int]] = {}
    for image in data["images"]:
        if image["id"] in boxes:
            raise DataError(path, f"image id {image['id']!r} is listed twice")
        boxes[image["id"]], labels[image["id"]] = [], []
    for ann in data["annotations"]:
        if ann.get("iscrowd"):
            continue
        where = f"annotation {ann.get('id', '(no id)')}"
        if ann.get("image_id") not in boxes:
            raise DataError(path, f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise DataError(path, f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        boxes[ann["image_id"]].append(_coco_box(ann.get("bbox"), path, where))
        labels[ann["image_id"]].append(label_of[ann["category_id"]])

    records = []
    for image in data["images"]:
        patient = image.get("patient_id")
        records.append(
            Record(
                image_path=_resolve(path, image["file_name"]),
                boxes=np.array(boxes[image["id"]], dtype=np.float32).reshape(-1, 4),
                labels=np.array(labels[image["id"]], dtype=np.int64),
                patient_id=None if patient in (None, "") else str(patient),
            )
        )
    return records, list(class_names)


def read_csv(path: str | Path, class_names: list[str] | None = None) -> Annotations:
    """Read a CSV with header ``image,x1,y1,x2,y2,label[,patient_id]`` (absolute pixel xyxy).

    Rows of one image are grouped into one record (in order of first appearance); a row whose
    x1..label are all empty lists an image with no lesion. Class names are ``class_names`` when
    given (a label outside them is an error), else the sorted unique labels.
    Errors give the line number in the file (the header is line 1).
    """
    path = Path(path)
    rows = _load_csv_rows(path)
    if class_names is None:
        class_names = sorted({row["label"] for _, row in rows if row["label"]})

    grouped: dict[Path, tuple[list[list[float]], list[int], list[str]]] = {}
    for line, row in rows:
        if not row["image"]:
            raise DataError(path, "empty 'image' field", row=line)
        boxes, labels, patients = grouped.setdefault(_resolve(path, row["image"]), ([], [], []))
        if row.get("patient_id"):
            patients.append(row["patient_id"])
        fields = [row[c] for c in CSV_COLUMNS[1:]]
        if not any(fields):
            continue  # an image with no lesion
        if not all(fields):
            empty = [c for c in CSV_COLUMNS[1:] if not row[c]]
            raise DataError(
                path, f"incomplete box: {', '.join(empty)} empty (leave all of x1..label empty for no box)", row=line
            )
        if row["label"] not in class_names:
            raise DataError(path, f"unknown class {row['label']!r}; known: {class_names}", row=line)
        boxes.append(_csv_box(row, path, line))
        labels.append(class_names.index(row["label"]))

    records = []
    for image_path, (boxes, labels, patients) in grouped.items():
        if len(set(patients)) > 1:
            raise DataError(path, f"image {image_path} has several patient ids: {sorted(set(patients))}")
        records.append(Record(image_path, np.array(boxes).reshape(-1, 4), labels, patients[0] if patients else None))
    return records, list(class_names)


_READERS: dict[str, Callable[[Path, list[str] | None], Annotations]] = {".json": read_coco, ".csv": read_csv}


def _resolve(annotation_file: Path, image: str) -> Path:
    """An image path as written in the file, relative to the file's folder unless absolute."""
    image_path = Path(image)
    return image_path if image_path.is_absolute() else annotation_file.parent / image_path


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", row=e.lineno) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"unreadable file ({e})") from e
    if not isinstance(data, dict):
        raise DataError(path, "not COCO detection JSON: the top level is not an object")
    return data


def _require_keys(path: Path, items: list[Any], what: str, keys: tuple[str, ...]) -> None:
    for i, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise DataError(path, f"{what} number {i + 1} has no {', '.join(repr(k) for k in missing)}")


def _coco_box(bbox: Any, path: Path, where: str) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``, refusing non-numbers and empty boxes."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(path, f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise DataError(path, f"{where}: bbox values must be finite numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DataError(path, f"{where}: bbox width and height must be positive, got {bbox!r}")
    return [x, y, x + w, y + h]


def _load_csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The data rows with their line numbers, fields stripped; checks the header and field counts."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                expected = ",".join(CSV_COLUMNS) + "[,patient_id]"
                raise DataError(path, f"missing column(s) {', '.join(missing)}; expected header {expected}", row=1)
            reader.fieldnames = header
            rows = []
            for row in reader:
                if None in row or None in row.values():  # more or fewer fields than the header
                    raise DataError(path, f"expected {len(header)} fields as in the header", row=reader.line_num)
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"unreadable CSV ({e})") from e
    return rows


def _csv_box(row: dict[str, str], path: Path, line: int) -> list[float]:
    """Parse and check x1, y1, x2, y2: finite, non-negative, x2 > x1 and y2 > y1."""
    box = []
    for column in CSV_COLUMNS[1:5]:
        try:
            value = float(row[column])
        except ValueError:
            raise DataError(path, f"{column} is not a number: {row[column]!r}", row=line) from None
        if not math.isfinite(value):
            raise DataError(path, f"{column} is not a finite number: {row[column]!r}", row=line)
        if value < 0:
            raise DataError(path, f"{column} is negative: {value:g}", row=line)
        box.append(value)
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DataError(path, f"empty or inverted box: need x2 > x1 and y2 > y1, got {box}", row=line)
    return box
