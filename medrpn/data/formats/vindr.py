"""VinDr-CXR (and the Kaggle VinBigData copy): ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``.

Each training image was read by three radiologists (``rad_id``); each row is one reader's box
in pixels of the original DICOM, or a "No finding" row with empty coordinates. The reader
boxes are fused into one ground truth per image by `medrpn.data.fusion` (IoU clustering with a
minimum number of readers, configurable as `data.fusion`). Images are ``<image_dir>/<image_id>.dicom``
(``train/`` beside the CSV by default). The file names no patients: splits fall back to the
DICOM PatientID/StudyInstanceUID.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medrpn.data.formats.common import Annotations, RecordBuilder, check_box, class_index, image_folder, number, read_csv_rows
from medrpn.data.fusion import FusionConfig, fuse_readers
from medrpn.data.problems import Problems
from medrpn.errors import DataError

COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
NO_FINDING = "No finding"
IMAGE_DIR = "train"
SUFFIX = ".dicom"


@dataclass
class ReaderBoxes:
    """One image's boxes as drawn, before fusion: boxes (N, 4), labels (N,), readers, CSV lines."""

    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


def read_vindr_reader_boxes(
    path: str | Path, class_names: list[str] | None = None, problems: Problems | None = None, image_dir: str | Path | None = None
) -> tuple[dict[Path, ReaderBoxes], list[str]]:
    """Every reader's boxes per image file (images with only "No finding" rows have none), and the class names.

    Default class names: the findings ordered by ``class_id`` ("No finding" excluded).
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    header, rows = read_csv_rows(path, COLUMNS, HEADER)
    col = {name: header.index(name) for name in header}
    if class_names is None:
        class_names = _class_names(rows, col)
    folder = image_folder(path, image_dir, IMAGE_DIR)
    images: dict[Path, ReaderBoxes] = {}
    for line, row in rows:
        if len(row) < len(header):
            problems.add("bad_row", DataError(path, f"expected {len(header)} fields as in the header, got {len(row)}", row=line))
            continue
        image_id, name = row[col["image_id"]], row[col["class_name"]]
        if not image_id:
            problems.add("bad_row", DataError(path, "empty 'image_id' field", row=line))
            continue
        image_path = folder / f"{image_id}{SUFFIX}"
        key = str(image_path)
        entry = images.setdefault(image_path, ReaderBoxes())
        coords = [row[col[c]] for c in COLUMNS[3:]]
        if name == NO_FINDING:
            if any(coords):
                problems.add("bad_row", DataError(path, f"a '{NO_FINDING}' row with a box", row=line), key)
            continue
        label = class_index(name, class_names, path, line, problems, key)
        if label is None:
            continue
        try:
            xyxy = [number(v, c, path, line) for v, c in zip(coords, COLUMNS[3:])]
        except DataError as error:
            problems.add("bad_row", error, key)
            continue
        box = check_box(xyxy, path, line, problems, key)
        if box is not None:
            entry.boxes.append(box)
            entry.labels.append(label)
            entry.readers.append(row[col["rad_id"]])
            entry.rows.append(line)
    bad = problems.images
    return {k: v for k, v in images.items() if str(k) not in bad}, list(class_names)


def read_vindr(
    path: str | Path,
    class_names: list[str] | None = None,
    problems: Problems | None = None,
    image_dir: str | Path | None = None,
    fusion: FusionConfig | None = None,
) -> Annotations:
    """Read the VinDr-CXR annotations with the readers' boxes fused (see `medrpn.data.fusion`).

    Args:
        path: ``train.csv`` (or ``annotations_train.csv``; ``.gz`` is read too).
        class_names: findings to use, in label order; by default all, ordered by class_id.
        problems: where problems go (default: the first one raises).
        image_dir: folder of ``<image_id>.dicom`` files, relative to the CSV; default ``train``.
        fusion: the fusion rule's settings.
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    fusion = fusion or FusionConfig()
    images, class_names = read_vindr_reader_boxes(path, class_names, problems, image_dir)
    builder = RecordBuilder(path)
    for image_path, entry in images.items():
        builder.add_image(image_path)
        if not entry.boxes:
            continue
        boxes, labels, _ = fuse_readers(np.array(entry.boxes), np.array(entry.labels), entry.readers, fusion)
        for box, label in zip(boxes, labels):
            builder.add_box(image_path, box.tolist(), int(label), None)
    return builder.build(problems), class_names


def _class_names(rows: list[tuple[int, list[str]]], col: dict[str, int]) -> list[str]:
    """Finding names ordered by class_id when the column exists, else alphabetically."""
    ids: dict[str, float] = {}
    for _, row in rows:
        if len(row) <= max(col.values()):
            continue
        name = row[col["class_name"]]
        if name and name != NO_FINDING:
            try:
                ids.setdefault(name, float(row[col["class_id"]]) if "class_id" in col else 0.0)
            except ValueError:
                ids.setdefault(name, float("inf"))
    return sorted(ids, key=lambda n: (ids[n], n))
