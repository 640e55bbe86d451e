"""COCO detection JSON: ``images``, ``annotations`` (bbox ``[x, y, w, h]`` in pixels), ``categories``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medrpn.data.formats.common import Annotations, Prefixed, RecordBuilder, check_box, image_key, load_json, resolve
from medrpn.data.problems import Problems
from medrpn.errors import DataError


def read_coco(path: str | Path, class_names: list[str] | None = None, problems: Problems | None = None) -> Annotations:
    """Read COCO detection JSON into records.

    Labels follow the categories sorted by id (0-based), or ``class_names`` matched by category
    name when given. Every listed image is a record, with no boxes if it has no annotation;
    ``iscrowd`` annotations are skipped. An image may carry a ``patient_id`` and a ``frame``
    (multi-frame DICOM / NIfTI slice). When an image gives ``width`` and ``height``, boxes are
    checked against them. Problems name the annotation id.
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(path, "not COCO detection JSON: the top level is not an object")
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

    builder = RecordBuilder(path)
    images: dict[Any, dict[str, Any]] = {}
    for image in data["images"]:
        if image["id"] in images:
            raise DataError(path, f"image id {image['id']!r} is listed twice")
        images[image["id"]] = image
        builder.add_image(resolve(path.parent, str(image["file_name"])), image.get("patient_id"), image.get("frame"))
    for ann in data["annotations"]:
        if ann.get("iscrowd"):
            continue
        ann_id = ann.get("id")
        where = f"annotation {ann_id if ann_id is not None else '(no id)'}"
        image = images.get(ann.get("image_id"))
        if image is None:
            raise DataError(path, f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise DataError(path, f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        image_path = resolve(path.parent, str(image["file_name"]))
        key = image_key(image_path, image.get("frame"))
        xyxy = _coco_box(ann.get("bbox"), path, where, problems, key)
        if xyxy is None:
            continue
        size = (image["height"], image["width"]) if _positive(image.get("height")) and _positive(image.get("width")) else None
        box = check_box(xyxy, path, None, Prefixed(problems, where), key, size)
        if box is not None:
            builder.add_box(image_path, box, label_of[ann["category_id"]], None, image.get("frame"))
    return builder.build(problems), list(class_names)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _require_keys(path: Path, items: list[Any], what: str, keys: tuple[str, ...]) -> None:
    for i, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise DataError(path, f"{what} number {i + 1} has no {', '.join(repr(k) for k in missing)}")


def _coco_box(bbox: Any, path: Path, where: str, problems: Problems, image: str) -> list[float] | None:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``; a malformed or empty bbox is a problem (nan and inf
    are left to `check_box`, like every reader's)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        problems.add("bad_row", DataError(path, f"{where}: bbox must be [x, y, width, height], got {bbox!r}"), image)
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        problems.add("bad_row", DataError(path, f"{where}: bbox values must be numbers, got {bbox!r}"), image)
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        kind = "zero_size" if min(w, h) == 0 else "inverted"
        problems.add(kind, DataError(path, f"{where}: bbox width and height must be positive, got {bbox!r}"), image)
        return None
    return [x, y, x + w, y + h]
