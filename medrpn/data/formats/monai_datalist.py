"""MONAI's detection datalist JSON, 2D: sections of items ``{"image", "box": [[...], ...], "label": [...]}``.

The layout of MONAI's detection tutorials (``load_decathlon_datalist`` with ``box``/``label``
keys). Every list-valued section (``training``, ``validation``, ``test`` ...) is read: medrpn
makes its own patient-level split. Labels are 0-based class ids. Boxes are converted from
`box_mode` (a MONAI 2D mode name: ``xyxy``, ``xywh`` or ``ccwh``) to xyxy with torchvision's
`box_convert` (importing MONAI's box_utils costs seconds); boxes must be in pixels, not world coordinates.
An item may also carry ``patient_id`` and ``frame``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from medrpn.data.formats.common import Annotations, Prefixed, RecordBuilder, check_box, image_key, load_json, resolve
from medrpn.data.problems import Problems
from medrpn.errors import ConfigError, DataError

# MONAI 2D box mode -> torchvision box_convert name
BOX_MODES = {"xyxy": "xyxy", "xywh": "xywh", "ccwh": "cxcywh"}


def read_monai_datalist(
    path: str | Path, class_names: list[str] | None = None, problems: Problems | None = None, box_mode: str = "xyxy"
) -> Annotations:
    """Read a 2D MONAI detection datalist into records (image paths relative to the JSON's folder).

    Args:
        path: the datalist JSON.
        class_names: names of label ids 0, 1, ...; by default "0", "1", ... up to the largest id.
        problems: where problems go (default: the first one raises).
        box_mode: the file's box convention (MONAI mode name).
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    if box_mode not in BOX_MODES:
        raise ConfigError(f"box_mode must be one of {', '.join(BOX_MODES)} for 2D datalists, got {box_mode!r}")
    data = load_json(path)
    sections = {k: v for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}
    if not sections:
        raise DataError(path, "not a MONAI datalist: expected an object with lists of items such as 'training'")
    items = [(name, i, item) for name, section in sections.items() for i, item in enumerate(section)]
    if class_names is None:
        ids = [lab for _, _, item in items if isinstance(item, dict) for lab in _as_list(item.get("label"))]
        top = max((int(v) for v in ids if isinstance(v, (int, float)) and not isinstance(v, bool)), default=-1)
        class_names = [str(i) for i in range(top + 1)]
    builder = RecordBuilder(path)
    for name, i, item in items:
        where = f"{name}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            problems.add("bad_row", DataError(path, f"{where}: an item needs an 'image' path"))
            continue
        image_path = resolve(path.parent, item["image"])
        frame = item.get("frame")
        key = image_key(image_path, frame)
        builder.add_image(image_path, item.get("patient_id"), frame)
        boxes, labels = _as_list(item.get("box")), _as_list(item.get("label"))
        if len(boxes) != len(labels):
            problems.add("bad_row", DataError(path, f"{where}: {len(boxes)} boxes but {len(labels)} labels"), key)
            continue
        for box, label in zip(boxes, labels):
            parsed = _box(box, label, len(class_names), path, where, problems, key, box_mode)
            if parsed is not None:
                builder.add_box(image_path, parsed[1], parsed[0], None, frame)
    return builder.build(problems), list(class_names)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _box(
    box: Any, label: Any, n_classes: int, path: Path, where: str, problems: Problems, key: str, box_mode: str
) -> tuple[int, list[float]] | None:
    try:
        values = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.array([])
    if values.size == 6:
        problems.add("bad_row", DataError(path, f"{where}: a 3D box {box!r}; medrpn reads 2D datalists (4 values per box)"), key)
        return None
    if values.size != 4:
        problems.add("bad_row", DataError(path, f"{where}: a box must be 4 numbers ({box_mode}), got {box!r}"), key)
        return None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or int(label) != label or not 0 <= label < n_classes:
        problems.add("unknown_class", DataError(path, f"{where}: unknown label {label!r}; there are {n_classes} classes"), key)
        return None
    xyxy = box_convert(torch.from_numpy(values[None]), BOX_MODES[box_mode], "xyxy")[0].numpy()
    checked = check_box(xyxy.tolist(), path, None, Prefixed(problems, where), key)
    return None if checked is None else (int(label), checked)
