"""The two data types everything in `medrpn.data` passes around: a decoded image and an annotation record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Image:
    """A decoded 2D image ready for a detector.

    Attributes:
        array: float32 array of shape (H, W) (or (H, W, 3) when colour is kept, see
            `medrpn.data.io.ReadConfig.channels`), intensities windowed into [0, 1]
            (for DICOM: modality LUT, then VOI LUT/window, MONOCHROME1 inverted).
        spacing: pixel spacing in millimetres as (row, column), or None when unknown.
        meta: identifiers worth keeping for outputs (e.g. SOPInstanceUID, StudyInstanceUID,
            SeriesInstanceUID, PatientID, Modality); never pixel data.
    """

    array: np.ndarray
    spacing: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """One image's annotations.

    Attributes:
        image_path: path of the image file.
        boxes: float32 array (N, 4) in absolute pixel xyxy of the original image (N may be 0);
            for a volume (N, 6) xyzxyz voxels in medrpn's LPS orientation (`medrpn.data.volume`).
        labels: int64 array (N,) of class indices, 0-based into the dataset's class names.
        patient_id: identifier used to keep a patient's images in one split (None if unknown).
        frame: which 2D image of the file is meant: a frame of a multi-frame DICOM or a slice of
            a NIfTI volume (along the configured axis); None for the first (or only) one.
        source: the annotation file the boxes came from (for messages), None if unknown.
        box_rows: int64 (N,) line (CSV, YOLO) or annotation id (COCO) of each box in `source`,
            -1 where unknown; lets a problem found later (a box outside its image) name its row.
    """

    image_path: Path
    boxes: np.ndarray
    labels: np.ndarray
    patient_id: str | None = None
    frame: int | None = None
    source: Path | None = None
    box_rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        boxes = np.asarray(self.boxes, dtype=np.float32)
        self.boxes = boxes if boxes.ndim == 2 and boxes.shape[1] == 6 else boxes.reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.image_path}: {len(self.boxes)} boxes but {len(self.labels)} labels")
        rows = np.full(len(self.boxes), -1) if self.box_rows is None else self.box_rows
        self.box_rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(self.box_rows) != len(self.boxes):
            raise ValueError(f"{self.image_path}: {len(self.boxes)} boxes but {len(self.box_rows)} box rows")
        if self.source is not None:
            self.source = Path(self.source)

    @property
    def spatial_dims(self) -> int:
        """2 for an image, 3 for a volume."""
        return self.boxes.shape[1] // 2

    @property
    def key(self) -> str:
        """A unique name of the 2D image: the path, plus the frame when one is chosen."""
        return str(self.image_path) if self.frame is None else f"{self.image_path}#{self.frame}"

    def keep(self, mask: np.ndarray) -> Record:
        """A copy with only the boxes where `mask` is true."""
        mask = np.asarray(mask, dtype=bool)
        return Record(
            self.image_path, self.boxes[mask], self.labels[mask], self.patient_id, self.frame, self.source, self.box_rows[mask]
        )
