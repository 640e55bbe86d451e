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
        array: float32 array of shape (H, W), intensities windowed into [0, 1]
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
        boxes: float32 array (N, 4) in absolute pixel xyxy of the original image (N may be 0).
        labels: int64 array (N,) of class indices, 0-based into the dataset's class names.
        patient_id: identifier used to keep a patient's images in one split (None if unknown).
    """

    image_path: Path
    boxes: np.ndarray
    labels: np.ndarray
    patient_id: str | None = None

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.image_path}: {len(self.boxes)} boxes but {len(self.labels)} labels")
