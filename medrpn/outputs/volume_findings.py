"""Findings on a volume, and the findings JSON written per scan.

Boxes inside medrpn are voxel ``x1, y1, z1, x2, y2, z2`` along the LPS-oriented array's axes
(`medrpn.data.volume`), edges at integers: voxel (i, j, k) spans [i, i+1) x [j, j+1) x [k, k+1)
and its centre, where the affine places it, is at box coordinates (i + 0.5, j + 0.5, k + 0.5).
This module is the edge where they also get patient coordinates: the finding's centre in DICOM
patient LPS millimetres (what a PACS viewer's crosshair and a LUNA16 ``coordX, coordY, coordZ``
show, after the sign change RAS -> LPS for a NIfTI user), and its extent in mm along each axis.

Findings JSON for volumes, ``schema_version`` "volume-1.0", one ``findings.json`` per scan::

    {
      "schema_version": "volume-1.0",
      "model": {...},                                 # as for images (`medrpn.outputs.findings.ModelInfo`)
      "scan": {
        "source": "vol001.nii.gz",                    # the file or DICOM series folder, relative to the input
        "series_instance_uid": ".." | null, "study_instance_uid": ".." | null, "modality": ".." | null,
        "shape": [X, Y, Z],                           # voxels along L, P, S
        "spacing_mm": [sx, sy, sz],
        "affine_lps": [[...4], [...4], [...4], [...4]],  # voxel index (i, j, k, 1) -> LPS mm
        "overlay": "montage.png"
      },
      "findings": [                                   # highest score first
        {
          "label": "ring", "score": 0.93,
          "box_voxels": [x1, y1, z1, x2, y2, z2],     # edges at integers, LPS-oriented array
          "centre_voxel": [i, j, k],                  # voxel index of the centre (centres at integers)
          "centre_mm_lps": [x, y, z],                 # patient coordinates, mm
          "size_mm": [dx, dy, dz],                    # extent along the array axes, mm
          "slices": [k1, k2],                         # axial slices it spans (0-based, inclusive)
          "tracking_id": "ring 1" | null,             # its name in the SR ...
          "tracking_uid": "2.25..." | null            # ... and its UID there (null: no SR)
        }
      ],
      "dicom": {"sr": "sr.dcm" | null, "gsps": ["gsps.dcm", ...], "notes": ["..."]}
    }

Coordinates are rounded to 2 decimals, scores to 4. Patient identifiers are never written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medrpn.data.volume import VolumeGeometry
from medrpn.outputs.findings import ModelInfo, _json_default, write_atomically

VOLUME_FINDINGS_SCHEMA_VERSION = "volume-1.0"


@dataclass
class VolumeFinding:
    """One finding on a scan, in voxels and in patient millimetres (see the module docstring)."""

    label: str
    score: float
    box_voxels: list[float]
    centre_voxel: list[float]
    centre_mm_lps: list[float]
    size_mm: list[float]
    slices: list[int]
    tracking_id: str | None = None
    tracking_uid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": self.score,
            "box_voxels": self.box_voxels,
            "centre_voxel": self.centre_voxel,
            "centre_mm_lps": self.centre_mm_lps,
            "size_mm": self.size_mm,
            "slices": self.slices,
            "tracking_id": self.tracking_id,
            "tracking_uid": self.tracking_uid,
        }


def make_volume_findings(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, class_names: list[str], geometry: VolumeGeometry,
    score_threshold: float,
) -> list[VolumeFinding]:
    """Findings scoring at least `score_threshold`, highest first, boxes clipped to the scan.

    Args:
        boxes: (N, 6) voxel boxes in the scan's LPS-oriented array. scores: (N,). labels: (N,) class indices.
        class_names: the model's classes. geometry: the scan's (`Volume.geometry`).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    shape = np.asarray(geometry.shape, dtype=np.float64)
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    found = []
    for index in np.argsort(-scores, kind="stable"):
        score = float(scores[index])
        if not score >= score_threshold:
            continue
        box = np.concatenate([np.clip(boxes[index, :3], 0, shape), np.clip(boxes[index, 3:], 0, shape)])
        centre = (box[:3] + box[3:]) / 2 - 0.5  # voxel index of the centre
        world = geometry.world_of_index(centre[None])[0]
        found.append(
            VolumeFinding(
                label=class_names[int(labels[index])],
                score=round(score, 4),
                box_voxels=[round(float(v), 2) for v in box],
                centre_voxel=[round(float(v), 2) for v in centre],
                centre_mm_lps=[round(float(v), 2) for v in world],
                size_mm=[round(float(v), 2) for v in (box[3:] - box[:3]) * spacing],
                slices=[int(math.floor(box[2])), max(int(math.ceil(box[5])) - 1, int(math.floor(box[2])))],
            )
        )
    return found


def write_volume_findings_json(
    path: str | Path, *, findings: list[VolumeFinding], model: ModelInfo, source: str, geometry: VolumeGeometry,
    meta: dict[str, Any] | None = None, overlay: str | None = None, sr: str | None = None,
    gsps: list[str] | None = None, notes: list[str] | None = None,
) -> Path:
    """Write one scan's findings file (schema in the module docstring), atomically."""
    meta = meta or {}
    document = {
        "schema_version": VOLUME_FINDINGS_SCHEMA_VERSION,
        "model": model.to_dict(),
        "scan": {
            "source": source,
            "series_instance_uid": meta.get("SeriesInstanceUID"),
            "study_instance_uid": meta.get("StudyInstanceUID"),
            "modality": meta.get("Modality"),
            "shape": list(geometry.shape),
            "spacing_mm": [round(s, 4) for s in geometry.spacing],
            "affine_lps": np.round(geometry.affine, 4).tolist(),
            "overlay": overlay,
        },
        "findings": [finding.to_dict() for finding in findings],
        "dicom": {"sr": sr, "gsps": list(gsps or []), "notes": list(notes or [])},
    }
    text = json.dumps(document, indent=2, default=_json_default, allow_nan=False) + "\n"
    return write_atomically(path, text.encode("utf-8"))
