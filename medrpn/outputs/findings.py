"""Detections as findings a reader can use, and the findings JSON file written per study.

The box convention inside medrpn is absolute pixel ``xyxy`` in array index space; this module is
the edge where boxes also get millimetres. Coordinates are continuous: pixel (row r, column c)
covers ``[c, c+1) x [r, r+1)``, so ``(0, 0)`` is the top-left corner of the image (not the centre
of its first pixel), ``x`` runs along columns (left to right) and ``y`` along rows (top to bottom).
This is also DICOM's convention for image coordinates in structured reports and presentation
states, so the same numbers go into the SR and GSPS unchanged.

Findings JSON, schema version ``FINDINGS_SCHEMA_VERSION`` ("2.2"), one ``findings.json`` per
output folder (one per DICOM study; PNG/JPEG images are grouped by their folder)::

    {
      "schema_version": "2.2",
      "study_instance_uid": "1.2.3..." | null,       # null for PNG/JPEG folders
      "anonymized_paths": false,                     # true: no input path or checkpoint path below
      "model": {
        "name": "medrpn", "version": "0.1.0",
        "checkpoint": "/abs/path/best.ckpt" | null,  # null with anonymized paths: see its sha256
        "checkpoint_sha256": "...",
        "class_names": ["nodule", ...],
        "score_threshold": 0.42,                      # findings below it are not reported
        "threshold_source": "checkpoint operating point" | "command line" | "default",
        "operating_point": {"score_threshold": .., "fp_per_image": .., "sensitivity": ..} | null,
        "proposal_settings": {                        # the RPN's test-time settings used
          "proposals_per_image": 100, "pre_nms_per_level": 500, "nms_thresh": 0.5,
          "test_flips": [], "changed": ["nms_thresh"]  # those given on the command line
        } | null
      },
      "images": [                                     # in study/series/instance order
        {
          "source": "sub/IM0001.dcm",                 # input file, relative to the input folder;
                                                      # anonymized: its SOPInstanceUID (DICOM), else
                                                      # 16 hex digits of the SHA-256 of that path
          "frame": null | 0,                          # 0-based frame (multi-frame DICOM) or
                                                      # slice (NIfTI); null for a single image
          "height": H, "width": W,                    # pixels of the ORIGINAL image
          "pixel_spacing_mm": [row, column] | null,   # PixelSpacing (else ImagerPixelSpacing)
          "study_instance_uid": .., "series_instance_uid": .., "sop_instance_uid": ..,
          "sop_class_uid": .., "modality": ..,        # null for PNG/JPEG
          "overlay": "IM0001.png",                    # overlay PNG in the same folder (named
                                                      # after "source"; long names shortened)
          "findings": [                               # sorted by score, highest first
            {
              "label": "nodule",                      # class name
              "score": 0.93,                          # detector confidence in [0, 1]
              "box_px": [x1, y1, x2, y2],             # pixels, original image
              "box_mm": [x1, y1, x2, y2] | null,      # mm from the image's top-left corner
              "size_mm": [width, height] | null,      # mm; null when spacing is unknown
              "tracking_id": "nodule 1" | null,       # its name in the SR and GSPS ...
              "tracking_uid": "2.25..." | null        # ... and its UID there (null: no DICOM output)
            }
          ]
        }
      ],
      "dicom": {"sr": "sr.dcm" | null, "gsps": ["gsps.dcm", ...], "notes": ["..."]},
      "skipped": [{"source": "..", "reason": ".."}]   # files of this folder/study not analysed
    }

Millimetres are ``x * column spacing`` and ``y * row spacing``. Scores are rounded to 4 decimals and
coordinates to 2 in the file (well below a pixel or a tenth of a millimetre); the DICOM outputs use
the same rounded coordinates. Patient identifiers (PatientName, PatientID, ...) are never written:
only UIDs and Modality describe an image, so a findings file can leave the hospital without
carrying who the patient is. Input file and folder names and the checkpoint's path can still name
a patient or a person; with ``anonymized_paths`` (``medrpn predict --anonymize-paths``) none is
written: sources are SOP Instance UIDs or path pseudonyms (a hash: whoever has the input files can
match them, and a guessed path can be checked against it, so it is not a secret), and the
checkpoint is known by its SHA-256 only.

Schema history: 1.0 was one file per image with the UIDs under ``image.meta``; 2.1 added
``model.proposal_settings`` to 2.0; 2.2 added ``anonymized_paths`` (and ``model.checkpoint`` can
be null).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FINDINGS_SCHEMA_VERSION = "2.2"

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
        tracking_id: "<label> <n>", the name of this finding in the DICOM SR and GSPS (None until set).
        tracking_uid: the UID of this finding in the DICOM SR and GSPS (None until set).
    """

    label: str
    score: float
    box_px: list[float]
    box_mm: list[float] | None = None
    size_mm: list[float] | None = field(init=False)
    tracking_id: str | None = None
    tracking_uid: str | None = None

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
            "tracking_id": self.tracking_id,
            "tracking_uid": self.tracking_uid,
        }

    @property
    def rounded_box_px(self) -> list[float]:
        """``box_px`` as written to every output (JSON, SR, GSPS): rounded to 2 decimals."""
        return [round(v, _COORD_DECIMALS) for v in self.box_px]


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


@dataclass
class ModelInfo:
    """Which model produced the findings, and at which operating threshold.

    Attributes:
        checkpoint: path of the checkpoint file; None to leave it out (it can name a person).
        checkpoint_sha256: hex SHA-256 of that file, so findings can be traced to exact weights.
        class_names: the model's classes, in label order.
        score_threshold: findings scoring below it are not reported.
        threshold_source: where the threshold came from: "checkpoint operating point",
            "command line" or "default".
        operating_point: the checkpoint's operating point (``score_threshold``, ``fp_per_image``,
            ``sensitivity``) when it has one.
        proposal_settings: the RPN's test-time settings the findings were made with
            (``proposals_per_image``, ``pre_nms_per_level``, ``nms_thresh``, ``test_flips``) and
            which of them were ``changed`` from the checkpoint's; None when not known.
        name, version: the software.
    """

    checkpoint: str | None
    checkpoint_sha256: str
    class_names: list[str]
    score_threshold: float
    threshold_source: str = "default"
    operating_point: dict[str, float] | None = None
    proposal_settings: dict[str, Any] | None = None
    name: str = "medrpn"
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "checkpoint_sha256": self.checkpoint_sha256,
            "class_names": list(self.class_names),
            "score_threshold": float(self.score_threshold),
            "threshold_source": self.threshold_source,
            "operating_point": None if self.operating_point is None else {
                # JSON has no NaN: a sensitivity measured without lesions is written as null
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in self.operating_point.items()
            },
            "proposal_settings": None if self.proposal_settings is None else dict(self.proposal_settings),
        }


@dataclass
class ImageFindings:
    """One analysed image (or frame) and its findings, as written in the findings JSON.

    Attributes:
        source: the input file, relative to the input folder (or its pseudonym, `medrpn.inference.scan.scan_inputs`).
        height, width: size of the original image in pixels.
        spacing: pixel spacing ``(row, column)`` mm, or None.
        findings: from :func:`make_findings`, highest score first.
        frame: 0-based frame of a multi-frame DICOM file or slice of a NIfTI volume; None for a
            file holding one image. (DICOM outputs name frames 1-based, as DICOM does.)
        uids: for DICOM, ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID``,
            ``SOPClassUID`` and ``Modality`` of the source (only these keys are ever written).
        overlay: file name of the overlay PNG in the same output folder.
    """

    source: str
    height: int
    width: int
    spacing: tuple[float, float] | None
    findings: list[Finding]
    frame: int | None = None
    uids: dict[str, str] = field(default_factory=dict)
    overlay: str | None = None

    def __post_init__(self) -> None:
        self.spacing = _check_spacing(self.spacing)
        self.height, self.width = int(self.height), int(self.width)

    def to_dict(self) -> dict[str, Any]:
        def uid(keyword: str) -> str | None:
            value = self.uids.get(keyword)
            return None if value in (None, "") else str(value)

        return {
            "source": self.source,
            "frame": self.frame,
            "height": self.height,
            "width": self.width,
            "pixel_spacing_mm": None if self.spacing is None else list(self.spacing),
            "study_instance_uid": uid("StudyInstanceUID"),
            "series_instance_uid": uid("SeriesInstanceUID"),
            "sop_instance_uid": uid("SOPInstanceUID"),
            "sop_class_uid": uid("SOPClassUID"),
            "modality": uid("Modality"),
            "overlay": self.overlay,
            "findings": [f.to_dict() for f in self.findings],
        }


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
    images: Sequence[ImageFindings],
    model: ModelInfo,
    study_instance_uid: str | None = None,
    sr: str | None = None,
    gsps: Sequence[str] = (),
    notes: Sequence[str] = (),
    skipped: Sequence[tuple[str, str]] = (),
    anonymized_paths: bool = False,
) -> Path:
    """Write one study's (or folder's) findings file (schema in this module's docstring), atomically.

    The file is written to a temporary file in the same folder and renamed into place, so a reader
    never sees half a file, even if prediction is interrupted. Parent folders are created.

    Args:
        path: where to write the JSON.
        images: the analysed images, in the order to list them.
        model: the model and threshold that produced the findings.
        study_instance_uid: the DICOM study, or None for a folder of PNG/JPEG images.
        sr: file name of the structured report written beside it, if any.
        gsps: file names of the presentation states written beside it.
        notes: what a reader should know about the DICOM outputs (e.g. why there is no GSPS).
        skipped: ``(source, reason)`` of the files of this study that could not be analysed.
        anonymized_paths: whether sources are pseudonyms and the checkpoint path is left out.

    Returns:
        The path written.

    Raises:
        ValueError: a NaN/infinite value (not valid JSON).
    """
    document = {
        "schema_version": FINDINGS_SCHEMA_VERSION,
        "study_instance_uid": study_instance_uid,
        "anonymized_paths": bool(anonymized_paths),
        "model": model.to_dict(),
        "images": [image.to_dict() for image in images],
        "dicom": {"sr": sr, "gsps": list(gsps), "notes": list(notes)},
        "skipped": [{"source": str(source), "reason": reason} for source, reason in skipped],
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


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (a checkpoint), read in 1 MiB blocks: what findings and second-stage
    checkpoints record so results can be traced to exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
