"""Candidates for the second stage: which boxes of a detector's output it looks at, and what
each one is (for training) by its overlap with the ground truth.

Candidates are the detector's detections (re-scoring the RoI head's findings) or its RPN proposals
(the RoI head bypassed: the crop classifier *is* the second stage, as in LUNA16 pipelines), with
at least ``min_score`` (class score or objectness probability). For training, a candidate with
IoU >= 0.5 with a lesion is that lesion's class, one with IoU < 0.3 with every lesion is background,
and those in between are left out: half a lesion is neither.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import box_iou

from medrpn.model.detector import DetectorOutput

CandidateSource = Literal["detections", "proposals"]
CANDIDATE_SOURCES: tuple[str, ...] = ("detections", "proposals")

IGNORE = -1
"""Label of a candidate that is neither background nor a lesion (left out of training)."""


def select_candidates(output: DetectorOutput, source: CandidateSource, min_score: float) -> list[dict[str, Tensor]]:
    """Per image the candidate ``boxes``, ``scores`` and ``labels`` (detector labels; 0 for
    proposals, which have none) scoring at least ``min_score``."""
    if source == "detections":
        found = output.detections
    elif source == "proposals":
        found = [
            {"boxes": b, "scores": s, "labels": torch.zeros(len(b), dtype=torch.int64, device=b.device)}
            for b, s in zip(output.proposals, output.proposal_scores)
        ]
    else:
        raise ValueError(f"candidates must be one of {CANDIDATE_SOURCES}, got {source!r}")
    selected = []
    for candidate in found:
        keep = candidate["scores"] >= min_score
        selected.append({k: candidate[k][keep] for k in ("boxes", "scores", "labels")})
    return selected


def label_candidates(
    boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, positive_iou: float = 0.5, negative_iou: float = 0.3
) -> Tensor:
    """The training label of each candidate: its best-overlapping lesion's class + 1 at IoU >=
    ``positive_iou``, 0 (background) below ``negative_iou``, `IGNORE` in between.

    Args:
        boxes: (N, 4) candidate boxes, absolute pixel xyxy.
        gt_boxes: (G, 4) lesion boxes of the same image; G may be 0 (every candidate is background).
        gt_labels: (G,) 0-based lesion classes.
    """
    labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return labels
    best, index = box_iou(boxes.float(), gt_boxes.float().to(boxes.device)).max(dim=1)
    labels = gt_labels.to(boxes.device)[index].long() + 1
    labels[best < positive_iou] = IGNORE
    labels[best < negative_iou] = 0
    return labels
