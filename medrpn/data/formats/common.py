"""Helpers shared by the annotation readers: opening files, resolving image paths, checking boxes.

Every reader turns its format's box convention into absolute pixel xyxy with `check_box`, which
records a bad box (negative, inverted, zero-sized, not a number, outside a known image size)
as a problem naming the file and row. Under the `fail` policy that is an immediate `DataError`;
under `skip` the image is left out (see `medrpn.data.problems`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medrpn.data.problems import Problems
from medrpn.data.records import Record
from medrpn.errors import DataError

Annotations = tuple[list[Record], list[str]]

# A box may cross the image border by this many pixels (rounding in the annotation tool) and is clipped.
BORDER_TOLERANCE = 1.0
COORDINATES = ("x1", "y1", "x2", "y2")
COORDINATES_3D = ("x1", "y1", "z1", "x2", "y2", "z2")


def resolve(base: Path, image: str) -> Path:
    """An image path as written in an annotation file: relative to `base` (a folder) unless absolute."""
    image_path = Path(image)
    return image_path if image_path.is_absolute() else base / image_path


def image_folder(annotation_file: Path, image_dir: str | Path | None, default: str) -> Path:
    """The folder of images for formats that name images by id: `image_dir` (relative to the file) or the default."""
    folder = Path(image_dir) if image_dir is not None else Path(default)
    return folder if folder.is_absolute() else annotation_file.parent / folder


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file for reading, transparently gunzipping ``.gz``; a `DataError` if it cannot be opened."""
    try:
        if path.is_dir():
            raise DataError(path, "is a folder, expected an annotation file")
        if path.name.lower().endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
    except OSError as e:
        raise DataError(path, f"unreadable file ({e})") from e


def load_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors name the line."""
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", row=e.lineno) from e
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(path, f"unreadable file ({e})") from e


def read_csv_rows(path: Path, required: Sequence[str], expected: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the data rows (with their line numbers, fields stripped) of a CSV file.

    Args:
        path: the CSV file (``.gz`` is read transparently).
        required: header names that must be present.
        expected: the expected header, for the error message.
    """
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(path, f"missing column(s) {', '.join(missing)}; expected header {expected}", row=1)
            rows = [(reader.line_num, [v.strip() for v in row]) for row in reader if any(v.strip() for v in row)]
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as e:
        raise DataError(path, f"unreadable CSV ({e})") from e
    return header, rows


def number(value: str, column: str, path: Path, line: int) -> float:
    """A float from a CSV field, else a `DataError` naming the column and row ("nan" and "inf" are
    numbers here: `check_box` refuses them, as it does for every format)."""
    try:
        return float(value)
    except ValueError:
        raise DataError(path, f"{column} is not a number: {value!r}", row=line) from None


def check_box(
    box: Sequence[float], path: Path, row: int | None, problems: Problems, image: str, size: tuple[float, ...] | None = None
) -> list[float] | None:
    """Check a box; return it (clipped to `size` within the tolerance) or None after recording why it is bad.

    A box is xyxy pixels with `size` (H, W) for an image, or xyzxyz voxels with `size` (X, Y, Z)
    for a volume. Every reader passes its boxes through here, so this is the one place that
    refuses a coordinate that is not a finite number (nan, inf): it would pass every comparison
    below, and the augmentation would later drop the box without a word, training a lesion as
    background.
    """
    values = [float(v) for v in box]
    dims = len(values) // 2
    names = COORDINATES if dims == 2 else COORDINATES_3D
    unit = "xyxy pixels" if dims == 2 else "xyzxyz voxels"
    lo, hi = values[:dims], values[dims:]
    shown = "[" + ", ".join(f"{v:g}" for v in values) + "]"
    not_finite = [n for n, v in zip(names, values) if not math.isfinite(v)]
    if not_finite:
        verb = "is" if len(not_finite) == 1 else "are"
        reason = f"{', '.join(not_finite)} {verb} not a finite number in box {shown} ({unit})"
        problems.add("not_finite", DataError(path, reason, row), image)
        return None
    negative = [n for n, v in zip(names, values) if v < -BORDER_TOLERANCE]
    if negative:
        problems.add("negative", DataError(path, f"{negative[0]} is negative in box {shown} ({unit})", row), image)
        return None
    need = " and ".join(f"{n}2 > {n}1" for n in "xyz"[:dims])
    if any(b < a for a, b in zip(lo, hi)):
        problems.add("inverted", DataError(path, f"empty or inverted box: need {need}, got {shown}", row), image)
        return None
    if any(b == a for a, b in zip(lo, hi)):
        problems.add("zero_size", DataError(path, f"empty or inverted box (zero-sized): need {need}, got {shown}", row), image)
        return None
    if size is not None:
        extent = [float(size[1]), float(size[0])] if dims == 2 else [float(n) for n in size]
        if any(b > e + BORDER_TOLERANCE for b, e in zip(hi, extent)):
            what = f"{extent[0]:g}x{extent[1]:g} (width x height) image" if dims == 2 else "x".join(f"{e:g}" for e in extent) + " voxel volume"
            problems.add("outside", DataError(path, f"box {shown} lies outside its {what} {image}", row), image)
            return None
        return [max(v, 0.0) for v in lo] + [min(v, e) for v, e in zip(hi, extent)]
    return [max(v, 0.0) for v in lo] + hi


def class_index(name: str, class_names: list[str], path: Path, row: int | None, problems: Problems, image: str) -> int | None:
    """Index of `name` in `class_names`, or None after recording an unknown class."""
    try:
        return class_names.index(name)
    except ValueError:
        problems.add("unknown_class", DataError(path, f"unknown class {name!r}; known: {class_names}", row), image)
        return None


class RecordBuilder:
    """Gathers boxes per image in order of first appearance, then builds the records.

    Images with a recorded problem are left out (policy skip); `add_image` lists an image
    without boxes.
    """

    def __init__(self, source: Path, spatial_dims: int = 2) -> None:
        self.source, self.spatial_dims = source, spatial_dims
        self._images: dict[tuple[Path, int | None], dict[str, Any]] = {}

    def add_image(self, image_path: Path, patient_id: str | None = None, frame: int | None = None) -> dict[str, Any]:
        entry = self._images.setdefault(
            (image_path, frame), {"boxes": [], "labels": [], "rows": [], "patients": set(), "frame": frame}
        )
        if patient_id not in (None, ""):
            entry["patients"].add(str(patient_id))
        return entry

    def add_box(self, image_path: Path, box: list[float], label: int, row: int | None, frame: int | None = None) -> None:
        entry = self.add_image(image_path, frame=frame)
        entry["boxes"].append(box)
        entry["labels"].append(label)
        entry["rows"].append(-1 if row is None else row)

    def build(self, problems: Problems) -> list[Record]:
        bad = problems.images
        records = []
        for (image_path, frame), entry in self._images.items():
            record = Record(
                image_path,
                np.array(entry["boxes"], dtype=np.float32).reshape(-1, 2 * self.spatial_dims),
                np.array(entry["labels"], dtype=np.int64),
                None,
                frame,
                self.source,
                np.array(entry["rows"], dtype=np.int64),
            )
            if record.key in bad:
                continue
            if len(entry["patients"]) > 1:
                problems.add(
                    "bad_row",
                    DataError(self.source, f"image {image_path} has several patient ids: {sorted(entry['patients'])}"),
                    record.key,
                )
                continue
            record.patient_id = next(iter(entry["patients"]), None)
            records.append(record)
        return records


class Prefixed:
    """A `Problems` front that puts where an entry is (e.g. "annotation 42: ") before each reason,
    for formats whose entries have no line number."""

    def __init__(self, problems: Problems, prefix: str) -> None:
        self.problems, self.prefix = problems, prefix

    def add(self, kind: str, error: DataError, image: str | None = None) -> None:
        self.problems.add(kind, DataError(error.path, f"{self.prefix}: {error.reason}", error.row), image)


def image_key(image_path: Path, frame: int | None = None) -> str:
    """The key `Record.key` gives this image (used to tie problems to images before records exist)."""
    return str(image_path) if frame is None else f"{image_path}#{frame}"


def sorted_unique(values: Iterable[str]) -> list[str]:
    return sorted({v for v in values if v})
