"""Detections as findings a reader can use, and the findings JSON file written per image.

The box convention inside medrpn is absolute pixel ``xyxy`` in array index space; this module is
the edge where boxes also get millimetres. Coordinates are continuous: pixel (row r, column c)
covers ``[c, c+1) x [r, r+1)``, so ``(0, 0)`` is the top-left corner of the image (not the centre
of its first pixel), ``x`` runs along columns (left to right) and ``y`` along rows (top to bottom).

Findings JSON, schema version ``FINDINGS_SCHEMA_VERSION`` ("1.0"), one file per image::

    {
      "schema_version": "1.0",
      "source": "<image file the findings are about>",
      "image": {
        "height": H, "width": W,                      # pixels of the ORIGINAL image
        "pixel_spacing_mm": [row, column] | null,     # as DICOM PixelSpacing; null when unknown
        "meta": {"StudyInstanceUID": ..., "SeriesInstanceUID": ..., "SOPInstanceUID": ...,
                 "Modality": ...}                     # only *UID keys and Modality, as strings
      },
      "model": {"name": ..., "version": ..., "checkpoint": ..., "checkpoint_sha256": ...,
                "score_threshold": ...},              # as given by the caller
      "findings": [                                   # sorted by score, highest first
        {
          "label": "nodule",                          # class name
          "score": 0.93,                              # detector confidence in [0, 1]
          "box_px": [x1, y1, x2, y2],                 # pixels, original image
          "box_mm": [x1, y1, x2, y2] | null,          # mm from the image's top-left corner
          "size_mm": [width, height] | null           # mm; null when spacing is unknown
        }
      ]
    }

Millimetres are ``x * column spacing`` and ``y * row spacing``. Scores are rounded to 4 decimals and
coordinates to 2 in the file (well below a pixel or a tenth of a millimetre). Patient identifiers
(PatientName, PatientID, ...) are never written: only UID keys and Modality are copied from the
image metadata, so a findings file can leave the hospital without carrying who the patient is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FINDINGS_SCHEMA_VERSION = "1.0"

_SCORE_DECIMALS = 4
_COORD_DECIMALS = 2


@dataclass
class Finding:
    """One detection, in pixels of the original image and (when spacing is known) millimetres.

    Attributes:
        label: class name.
        score: detector confidence in [0, 1].
        box_px: ``[x1, y1, x2, y2]`` in pixels of the original image (x = column, y = row).
        box_mm: the same box in millimetres from the image's top-left corner, or None when the
            pixel spacing is unknown.
        size_mm: ``[width, height]`` of the box in millimetres, derived from ``box_mm`` (None with it).
    """

    label: str
    score: float
    box_px: list[float]
    box_mm: list[float] | None = None
    size_mm: list[float] | None = field(init=False)

    def __post_init__(self) -> None:
        self.score = float(self.score)
        self.box_px = [float(v) for v in self.box_px]
        if self.box_mm is not None:
            self.box_mm = [float(v) for v in self.box_mm]
        if self.box_mm is None:
            self.size_mm = None
        else:
            self.size_mm = [self.box_mm[2] - self.box_mm[0], self.box_mm[3] - self.box_mm[1]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the same keys, scores and coordinates rounded for reading."""

        def coords(values: list[float] | None) -> list[float] | None:
            return None if values is None else [round(v, _COORD_DECIMALS) for v in values]

        return {
            "label": self.label,
            "score": round(self.score, _SCORE_DECIMALS),
            "box_px": coords(self.box_px),
            "box_mm": coords(self.box_mm),
            "size_mm": coords(self.size_mm),
        }


def _check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    row, col = (float(v) for v in spacing)
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        raise ValueError(f"pixel spacing must be two positive finite millimetre values (row, column), got {spacing!r}")
    return row, col


def make_findings(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    spacing: tuple[float, float] | None,
) -> list[Finding]:
    """Turn one image's detections into findings, highest score first.

    Args:
        boxes: (N, 4) absolute pixel ``xyxy`` in the original image (x = column, y = row).
        scores: (N,) confidences.
        labels: (N,) 0-based class indices into ``class_names``.
        class_names: name of each class index.
        spacing: pixel spacing ``(row, column)`` in mm, as DICOM PixelSpacing; None when unknown,
            in which case ``box_mm`` and ``size_mm`` are None.

    Raises:
        ValueError: mismatched lengths, non-finite boxes or scores, a label outside ``class_names``, or a
            spacing that is not two positive numbers.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels: they must match")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError("boxes or scores contain NaN or infinite values")
    bad = labels[(labels < 0) | (labels >= len(class_names))]
    if bad.size:
        raise ValueError(f"label index {int(bad[0])} is outside the {len(class_names)} class names {list(class_names)}")
    spacing = _check_spacing(spacing)

    findings = []
    for i in np.argsort(-scores, kind="stable"):
        box = boxes[i].tolist()
        box_mm = None
        if spacing is not None:
            row_mm, col_mm = spacing
            box_mm = [box[0] * col_mm, box[1] * row_mm, box[2] * col_mm, box[3] * row_mm]
        label = str(class_names[labels[i]])
        findings.append(Finding(label=label, score=float(scores[i]), box_px=box, box_mm=box_mm))
    return findings


def _safe_meta(image_meta: dict[str, Any]) -> dict[str, str]:
    """Only UIDs and Modality: identifiers of the image, never of the patient."""
    kept = {str(k): v for k, v in image_meta.items() if str(k).endswith("UID") or k == "Modality"}
    return {k: str(v) for k, v in kept.items() if v is not None}


def _json_default(value: Any) -> Any:
    """Let model info carry paths and numpy scalars/arrays without the caller converting them."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_findings_json(
    path: str | Path,
    *,
    source: str,
    image_size: tuple[int, int],
    spacing: tuple[float, float] | None,
    findings: list[Finding],
    image_meta: dict[str, Any],
    model: dict[str, Any],
) -> Path:
    """Write one image's findings file (schema in this module's docstring), atomically.

    The file is written to a temporary file in the same folder and renamed into place, so a reader
    never sees half a file, even if prediction is interrupted. Parent folders are created.

    Args:
        path: where to write the JSON.
        source: the image file the findings are about.
        image_size: ``(H, W)`` of the original image in pixels.
        spacing: pixel spacing ``(row, column)`` mm, or None.
        findings: from :func:`make_findings`; written in the given order.
        image_meta: image metadata; only keys ending in ``UID`` and ``Modality`` are copied.
        model: model description (name, version, checkpoint, checkpoint_sha256, score_threshold...).

    Returns:
        The path written.

    Raises:
        ValueError: a bad spacing, or a NaN/infinite value (not valid JSON) in ``model``.
        TypeError: a ``model`` value that cannot be written as JSON.
    """
    spacing = _check_spacing(spacing)
    height, width = (int(v) for v in image_size)
    document = {
        "schema_version": FINDINGS_SCHEMA_VERSION,
        "source": str(source),
        "image": {
            "height": height,
            "width": width,
            "pixel_spacing_mm": None if spacing is None else list(spacing),
            "meta": _safe_meta(image_meta),
        },
        "model": dict(model),
        "findings": [f.to_dict() for f in findings],
    }
    text = json.dumps(document, indent=2, default=_json_default, allow_nan=False) + "\n"
    return write_atomically(path, text.encode("utf-8"))


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    A reader (a viewer, a PACS router watching the folder) then sees either no file or the whole
    file, never half of one. Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
