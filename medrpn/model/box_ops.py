"""Box arithmetic that torchvision.ops lacks.

torchvision's ``box_iou`` gives the IoU of every box with every other (an N x M matrix); the
anchor planner and the quality focal loss need the IoU of boxes paired element by element, which
the matrix would give only as its diagonal, at N x N the cost. NMS suppresses by IoU, so a small
box inside a large one (IoU about their area ratio) survives it: ``suppress_contained`` removes
such nested duplicates by the share of the smaller box that the other covers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def paired_box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """IoU of ``boxes`` (..., 4) with ``others`` (..., 4), xyxy (or (..., 6) xyzxyz), element by
    element (broadcast)."""
    d = boxes.shape[-1] // 2
    lt = torch.maximum(boxes[..., :d], others[..., :d])
    rb = torch.minimum(boxes[..., d:], others[..., d:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (boxes[..., d:] - boxes[..., :d]).prod(dim=-1)
    area_b = (others[..., d:] - others[..., :d]).prod(dim=-1)
    return inter / (area_a + area_b - inter)


def intersection_over_smaller(boxes: Tensor) -> Tensor:
    """(N, N): the area (volume) two boxes (N, 4) xyxy or (N, 6) xyzxyz share, over the smaller
    box's (1 for a box inside another, whatever their sizes)."""
    d = boxes.shape[1] // 2
    lt = torch.maximum(boxes[:, None, :d], boxes[None, :, :d])
    rb = torch.minimum(boxes[:, None, d:], boxes[None, :, d:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area = (boxes[:, d:] - boxes[:, :d]).prod(dim=1)
    return inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)


def suppress_contained(boxes: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """Indices of the boxes to keep, best score first: taken in score order, a box is dropped when
    at least ``threshold`` of the smaller of it and a kept box lies inside the other (a box nested
    in a better one, or a better one nested in it). ``threshold`` 1.0 drops only exact nesting."""
    order = scores.argsort(descending=True)
    if len(order) < 2:
        return order
    nested = intersection_over_smaller(boxes[order]) >= threshold
    dropped = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for k in range(len(order)):
        if not dropped[k]:
            keep.append(k)
            dropped |= nested[k]
    return order[torch.tensor(keep, device=boxes.device)]
