"""YOLO labels: one text file per image, a line ``class x_center y_center width height`` per box.

Coordinates are normalised to the image's width and height (0..1), so the reader opens each
image's header for its size (no pixels are decoded). Class ids index a names list: the config's
`class_names`, else the ``names`` of an Ultralytics ``data.yaml``, else a ``classes.txt`` or
``obj.names`` file (one name per line) in the folder. An image without a label file, or with an
empty one, has no lesion.

The path given is either a folder (searched recursively for images; a label file lies next to
its image, or in the parallel ``labels/`` folder of the Ultralytics ``images/`` layout) or an
Ultralytics ``data.yaml`` whose ``train``/``val``/``test`` entries name such folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from medrpn.data.formats.common import Annotations, RecordBuilder, check_box, open_text, resolve
from medrpn.data.io import IMAGE_SUFFIXES, ReadConfig, probe_image
from medrpn.data.problems import Problems
from medrpn.errors import DataError

NAME_FILES = ("classes.txt", "obj.names")
_IMAGE_SUFFIXES = {s for s in IMAGE_SUFFIXES if s and not s.startswith(".nii")}


def read_yolo(
    path: str | Path,
    class_names: list[str] | None = None,
    problems: Problems | None = None,
    read: ReadConfig | None = None,
) -> Annotations:
    """Read a YOLO dataset (a folder, or an Ultralytics data.yaml) into records with pixel xyxy boxes.

    Args:
        path: the folder of images and label files, or a data.yaml.
        class_names: names of class ids 0, 1, ...; by default from data.yaml, classes.txt or obj.names.
        problems: where problems go (default: the first one raises).
        read: reading settings, for the NIfTI axis when an image's size is probed.
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    folders, names = _folders_and_names(path)
    class_names = class_names if class_names is not None else names
    if class_names is None:
        raise DataError(
            path,
            f"YOLO class ids need names: give data.class_names, or put {' or '.join(NAME_FILES)} (one name per line) in the folder",
        )
    builder = RecordBuilder(path)
    for image_path in _find_images(folders, problems):
        key = str(image_path)
        builder.add_image(image_path)
        label_file = _label_file(image_path)
        if label_file is None:
            continue
        try:
            height, width, _, _ = probe_image(image_path, None, read)
        except DataError as error:
            problems.add("missing_image" if error.reason == "file not found" else "unreadable_image", error, key)
            continue
        try:
            with open_text(label_file) as f:
                lines = f.read().splitlines()
        except (DataError, UnicodeDecodeError) as error:
            reason = error.reason if isinstance(error, DataError) else f"not a text file ({error})"
            problems.add("bad_file", DataError(label_file, reason), key)
            continue
        for line_no, line in enumerate(lines, start=1):
            box = _parse_line(line, label_file, line_no, class_names, (height, width), problems, key)
            if box is not None:
                builder.add_box(image_path, box[1], box[0], line_no)
    return builder.build(problems), list(class_names)


def _parse_line(
    line: str, label_file: Path, line_no: int, class_names: list[str], size: tuple[int, int], problems: Problems, key: str
) -> tuple[int, list[float]] | None:
    fields = line.split()
    if not fields:
        return None
    if len(fields) != 5:
        problems.add(
            "bad_row",
            DataError(label_file, f"expected 'class x_center y_center width height', got {len(fields)} values", line_no),
            key,
        )
        return None
    try:
        class_id = int(fields[0])
        cx, cy, w, h = (float(v) for v in fields[1:])
    except ValueError:
        problems.add("bad_row", DataError(label_file, f"not numbers: {line.strip()!r}", line_no), key)
        return None
    if not 0 <= class_id < len(class_names):
        problems.add(
            "unknown_class",
            DataError(label_file, f"unknown class id {class_id}; the names list has {len(class_names)}: {class_names}", line_no),
            key,
        )
        return None
    height, width = size
    xyxy = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    box = check_box(xyxy, label_file, line_no, problems, key, (height, width))
    return None if box is None else (class_id, box)


def _folders_and_names(path: Path) -> tuple[list[Path], list[str] | None]:
    """The image folders to search and the class names found beside them (None if none)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            with open_text(path) as f:
                spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise DataError(path, f"invalid YAML ({e})") from e
        if not isinstance(spec, dict):
            raise DataError(path, "not an Ultralytics data.yaml: the top level is not a mapping")
        root = resolve(path.parent, str(spec.get("path", ".")))
        folders = [resolve(root, str(entry)) for key in ("train", "val", "test") for entry in _as_list(spec.get(key))]
        if not folders:
            raise DataError(path, "no 'train', 'val' or 'test' folder listed")
        return folders, _names(spec.get("names"), path)
    try:
        is_dir = path.is_dir()
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
    if not is_dir:
        raise DataError(path, "file not found" if not path.exists() else "expected a folder of images and YOLO label files, or a data.yaml")
    for name in NAME_FILES:
        if (path / name).is_file():
            with open_text(path / name) as f:
                return [path], [n.strip() for n in f.read().splitlines() if n.strip()]
    return [path], None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _names(value: Any, path: Path) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, dict):  # {0: name, 1: name}
        ids = sorted(int(k) for k in value)
        if ids != list(range(len(ids))):
            raise DataError(path, f"'names' ids must be 0..{len(ids) - 1}, got {ids}")
        return [str(value[k]) for k in sorted(value, key=int)]
    return [str(v) for v in value]


def _find_images(folders: list[Path], problems: Problems) -> list[Path]:
    """Image files below the folders (sorted, hidden files skipped); unreadable folders are problems."""
    found: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            problems.add("unreadable_folder", DataError(folder, "folder not found"))
            continue

        def on_error(error: OSError) -> None:
            problems.add("unreadable_folder", DataError(error.filename or folder, f"cannot list this folder ({error.strerror or error})"))

        for root, dirs, files in os.walk(folder, onerror=on_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "labels")
            stems = {Path(n).stem for n in files if Path(n).suffix.lower() in _IMAGE_SUFFIXES}
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in _IMAGE_SUFFIXES:
                    found.append(Path(root) / name)
                elif stems and name.endswith(".txt") and name not in NAME_FILES and Path(name).stem not in stems:
                    label = Path(root) / name
                    problems.add("missing_image", DataError(label, "label file without its image (no image file of the same name)"))
    return sorted(set(found))


def _label_file(image_path: Path) -> Path | None:
    """The label file of an image: beside it, or in the parallel labels/ folder; None if there is none."""
    candidates = [image_path.with_suffix(".txt")]
    parts = image_path.parts
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        candidates.append(Path(*parts[:i], "labels", *parts[i + 1 :]).with_suffix(".txt"))
    return next((c for c in candidates if c.is_file()), None)
