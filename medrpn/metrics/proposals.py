"""Proposal recall: how many lesions the Region Proposal Network puts in its top-k boxes.

The second stage can only classify what the RPN proposes, so recall of the top proposals
bounds the whole detector's sensitivity; it is the RPN's own health figure.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import box_iou


def proposal_hits(proposals: Tensor, gt_boxes: Tensor, top_k: int = 100, iou_threshold: float = 0.5) -> int:
    """Number of ground-truth boxes covered by one of the first ``top_k`` proposals.

    Args:
        proposals: (P, 4) proposals, absolute pixel xyxy, sorted by objectness (best first).
        gt_boxes: (G, 4) ground-truth boxes, absolute pixel xyxy.
        top_k: how many of the leading proposals count.
        iou_threshold: minimum IoU for a proposal to cover a ground-truth box.

    Returns:
        How many ground-truth boxes have best IoU >= ``iou_threshold`` with the kept proposals.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if proposals.ndim != 2 or proposals.shape[-1] != 4:
        raise ValueError(f"proposals must have shape (P, 4), got {tuple(proposals.shape)}")
    if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(gt_boxes.shape)}")
    kept = proposals[:top_k].detach().float()
    if kept.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return 0
    iou = box_iou(gt_boxes.detach().float().to(kept.device), kept)
    return int((iou.amax(dim=1) >= iou_threshold).sum().item())
