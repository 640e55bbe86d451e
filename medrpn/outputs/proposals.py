"""The RPN's proposals as a JSON file, for users who bring their own second stage.

In LUNA16-style pipelines a first stage generates candidates with high recall and a second stage
(often the user's own classifier) decides among them. `medrpn predict --proposals` writes
``proposals.json`` beside ``findings.json`` in every output folder, for any checkpoint (an
RPN-only one or a full detector, whose proposals are those its RoI heads start from). Every
proposal the RPN keeps is written, with no score threshold: at most the model's
``rpn.post_nms_top_n_test`` per image, after its NMS, best objectness first. How many, and at
which NMS IoU, can be changed for the export (``predict --proposals-per-image / --proposal-nms``):
a candidate generator is tuned for recall, which is not what the detector was trained for.

Coordinates follow `medrpn.outputs.findings` (the same helpers make them): absolute pixel
``xyxy`` in the ORIGINAL image, ``(0, 0)`` its top-left corner, ``x`` along columns; millimetres
from that corner when the pixel spacing is known; coordinates rounded to 2 decimals, scores to 4.
The network saw the image resized by ``scale`` and padded at the right/bottom to a square of
``input_size`` pixels, so a box in network-input pixels is ``box_px * scale`` (no offset).

Schema version ``PROPOSALS_SCHEMA_VERSION`` ("1.1", which added ``model.proposal_settings`` to 1.0)::

    {
      "schema_version": "1.1",
      "study_instance_uid": "1.2.3..." | null,       # null for PNG/JPEG/NIfTI folders
      "model": {
        "name": "medrpn", "version": "0.1.0",
        "checkpoint": "/abs/path/best.ckpt" | null,  # null with --anonymize-paths, as in findings.json
        "checkpoint_sha256": "...",
        "proposal_settings": {..} | null              # as in findings.json: how many, which NMS
      },
      "images": [                                     # in the order of findings.json
        {
          "source": "sub/IM0001.dcm",                 # as in findings.json (a pseudonym there, here too)
          "frame": null | 0,                          # 0-based frame (multi-frame DICOM) / NIfTI slice
          "height": H, "width": W,                    # pixels of the ORIGINAL image
          "pixel_spacing_mm": [row, column] | null,
          "study_instance_uid": .., "series_instance_uid": .., "sop_instance_uid": ..,
          "sop_class_uid": .., "modality": ..,        # null for non-DICOM images
          "scale": 0.5,                               # network-input pixels per original pixel
          "input_size": 256,                          # side of the square network input
          "proposals": [                              # objectness, highest first
            {
              "score": 0.97,                          # RPN objectness probability in [0, 1]
              "box_px": [x1, y1, x2, y2],             # pixels, original image
              "box_mm": [x1, y1, x2, y2] | null,      # mm from the image's top-left corner
              "size_mm": [width, height] | null
            }
          ]
        }
      ]
    }

A proposal that lies entirely in the padding (less than a pixel of the image once clipped to it)
is left out. Like findings.json, the file names no patient: only UIDs and Modality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image

from medrpn.outputs.findings import Finding, ImageFindings, ModelInfo, make_findings, write_atomically

PROPOSALS_SCHEMA_VERSION = "1.1"
PROPOSALS_NAME = "proposals.json"

_PROPOSAL_KEYS = ("score", "box_px", "box_mm", "size_mm")  # of a Finding's JSON form


@dataclass
class ImageProposals:
    """One image's proposals, in its original pixels (and millimetres when spacing is known).

    Attributes:
        image: the image as `medrpn.inference.predict` describes it in findings.json (source, frame, size,
            spacing, UIDs); only that description is used, not its findings.
        scale: network-input pixels per original pixel.
        input_size: side of the square network input, in pixels.
        proposals: best objectness first; ``label`` is unused and ``score`` is the objectness.
    """

    image: ImageFindings
    scale: float
    input_size: int
    proposals: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        described = self.image.to_dict()
        for key in ("overlay", "findings"):
            described.pop(key)
        return {
            **described,
            "scale": float(self.scale),
            "input_size": int(self.input_size),
            "proposals": [{k: p.to_dict()[k] for k in _PROPOSAL_KEYS} for p in self.proposals],
        }


def image_proposals(
    image: ImageFindings, boxes: torch.Tensor, scores: torch.Tensor, scale: float, input_size: int
) -> ImageProposals:
    """One image's RPN proposals, moved from network-input pixels to its original pixels.

    Args:
        image: the image's description (its ``height``, ``width`` and ``spacing`` are used here).
        boxes: (P, 4) proposals in network-input pixels ``xyxy``.
        scores: (P,) objectness probabilities.
        scale: network-input pixels per original pixel (`medrpn.data.transforms.fit_scale`).
        input_size: side of the square network input.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    original = clip_boxes_to_image(boxes.detach().float().cpu().reshape(-1, 4) / scale, (image.height, image.width))
    keep = (original[:, 2] - original[:, 0] >= 1) & (original[:, 3] - original[:, 1] >= 1)
    kept_scores = scores.detach().float().cpu().reshape(-1)[keep].numpy()
    proposals = make_findings(
        original[keep].numpy(), kept_scores, np.zeros(len(kept_scores), dtype=np.int64), ["proposal"], image.spacing
    )
    return ImageProposals(image=image, scale=float(scale), input_size=int(input_size), proposals=proposals)


def write_proposals(
    path: str | Path,
    items: Sequence[ImageProposals],
    model: ModelInfo | None = None,
    study_instance_uid: str | None = None,
) -> Path:
    """Write one study's (or folder's) proposals file (schema in this module's docstring), atomically.

    Args:
        path: where to write the JSON (parent folders are created).
        items: the images, in the order to list them.
        model: the model that made the proposals (its threshold does not apply: none is written).
        study_instance_uid: the DICOM study, or None for a folder of other images.

    Returns:
        The path written.
    """
    about = model.to_dict() if model is not None else {"name": "medrpn"}
    document = {
        "schema_version": PROPOSALS_SCHEMA_VERSION,
        "study_instance_uid": study_instance_uid,
        "model": {k: about[k] for k in ("name", "version", "checkpoint", "checkpoint_sha256", "proposal_settings")
                  if k in about},
        "images": [item.to_dict() for item in items],
    }
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    return write_atomically(path, text.encode("utf-8"))
