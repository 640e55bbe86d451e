"""Proposal recall: how many lesions the Region Proposal Network puts in its top-k boxes.

The second stage can only classify what the RPN proposes, so recall of the top proposals
bounds the whole detector's sensitivity; it is the RPN's own health figure. Reported, as for
proposal methods in general (Hosang et al.), from each lesion's best IoU with the leading
proposals: recall at IoU 0.5 for the top 10, 50, 100, 300 and 1000, and average recall (AR)
over IoU 0.5:0.95 for the top 100, overall and by lesion size.

Lesion size is the side of the square of the same area, sqrt(w * h) (for volumes the side of the
cube of the same volume, (w * h * d) ** (1/3)): in millimetres when the pixel spacing is known (small < 10 mm <= medium < 30 mm <= large, DeepLesion's diameter bins),
else in pixels of the original image (small < 32 px <= medium < 96 px <= large, COCO's bins).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from medrpn.metrics.coco import COCO_IOU_THRESHOLDS
from medrpn.metrics.froc import pairwise_iou

PROPOSAL_TOP_KS: tuple[int, ...] = (10, 50, 100, 300, 1000)
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
SIZE_BINS_MM: tuple[float, float] = (10.0, 30.0)
SIZE_BINS_PX: tuple[float, float] = (32.0, 96.0)


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
    best = best_proposal_iou(proposals, gt_boxes, (top_k,))
    return int((best[:, 0] >= iou_threshold).sum().item())


def best_proposal_iou(proposals: Tensor, gt_boxes: Tensor, top_ks: tuple[int, ...] = PROPOSAL_TOP_KS) -> Tensor:
    """Each lesion's best IoU with the leading proposals, for several numbers of proposals.

    Args:
        proposals: (P, 4) proposals xyxy, best first. Fewer than k proposals: all of them count.
        gt_boxes: (G, 4) lesion boxes xyxy.
        top_ks: numbers of leading proposals.

    Returns:
        (G, len(top_ks)) float32; 0 where no proposal overlaps.
    """
    if any(k < 1 for k in top_ks):
        raise ValueError(f"top_k must be at least 1, got {top_ks}")
    if proposals.ndim != 2 or proposals.shape[-1] != 4:
        raise ValueError(f"proposals must have shape (P, 4), got {tuple(proposals.shape)}")
    if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(gt_boxes.shape)}")
    n_gt, n_prop = gt_boxes.shape[0], proposals.shape[0]
    device = proposals.device
    if n_gt == 0 or n_prop == 0:
        return torch.zeros(n_gt, len(top_ks), device=device)
    kept = proposals[: max(top_ks)].detach().float()
    iou = box_iou(gt_boxes.detach().float().to(device), kept)  # (G, P)
    running_best = torch.cummax(iou, dim=1).values
    columns = torch.tensor([min(k, kept.shape[0]) - 1 for k in top_ks], device=device)
    return running_best[:, columns]


def best_proposal_iou_batch(
    proposals: list[Tensor], gt_boxes: list[Tensor], top_ks: tuple[int, ...] = PROPOSAL_TOP_KS
) -> Tensor:
    """``best_proposal_iou`` for a batch of images at once (a few large operations, not many small ones).

    Args:
        proposals: per image (P_i, 4) proposals, best first ((P_i, 6) for volumes).
        gt_boxes: per image (G_i, 4) lesion boxes ((G_i, 6) for volumes).

    Returns:
        (sum G_i, len(top_ks)) in the order of the images and their lesions.
    """
    if any(k < 1 for k in top_ks):
        raise ValueError(f"top_k must be at least 1, got {top_ks}")
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    width = gt_boxes[0].shape[-1] if gt_boxes and gt_boxes[0].ndim == 2 else 4
    kept = [p.detach().float().reshape(-1, width)[: max(top_ks)].to(device) for p in proposals]
    gts = [g.detach().float().reshape(-1, width).to(device) for g in gt_boxes]
    n_prop = torch.tensor([len(p) for p in kept], device=device)
    n_gt = torch.tensor([len(g) for g in gts], device=device)
    if not gts or int(n_gt.sum()) == 0:
        return torch.zeros(0, len(top_ks), device=device)
    if int(n_prop.sum()) == 0:
        return torch.zeros(int(n_gt.sum()), len(top_ks), device=device)
    image = torch.arange(len(gts), device=device)
    p_img, g_img = image.repeat_interleave(n_prop), image.repeat_interleave(n_gt)
    # IoU with every proposal of the batch, zero outside the lesion's own image: a running
    # maximum along the proposals (image by image, best first) then holds, at the c-th proposal
    # of the lesion's image, the best IoU among that image's first c.
    iou = pairwise_iou(torch.cat(gts), torch.cat(kept)) * (g_img[:, None] == p_img[None, :])
    running_best = torch.cummax(iou, dim=1).values
    start = torch.cumsum(n_prop, 0) - n_prop
    ks = torch.tensor(top_ks, device=device)
    count = torch.minimum(ks[None, :], n_prop[g_img][:, None])  # (G, K) proposals that count
    column = (start[g_img][:, None] + count - 1).clamp(min=0)
    return torch.where(count > 0, running_best.gather(1, column), torch.zeros((), device=device))


def lesion_size(boxes: Tensor, units_per_px: Tensor) -> Tensor:
    """Lesion sizes: sqrt(w * h) of boxes (G, 4) scaled per box by ``units_per_px`` (G, 2) = (row,
    col); for volumes (w * h * d) ** (1/3) of boxes (G, 6) scaled by (G, 3) = (x, y, z) units per voxel."""
    if boxes.shape[-1] == 6:
        sides = (boxes[:, 3:] - boxes[:, :3]).float() * units_per_px
        return sides.clamp(min=0).prod(dim=1).pow(1.0 / 3.0)
    w = (boxes[:, 2] - boxes[:, 0]).float() * units_per_px[:, 1]
    h = (boxes[:, 3] - boxes[:, 1]).float() * units_per_px[:, 0]
    return torch.sqrt((w * h).clamp(min=0))


def size_bin(sizes: np.ndarray, bins: tuple[float, float]) -> np.ndarray:
    """0 (small), 1 (medium) or 2 (large) for each size, with the bin edges ``bins``."""
    return np.searchsorted(np.asarray(bins, dtype=np.float64), sizes, side="right")


def proposal_recall(
    best_iou: np.ndarray,
    sizes_px: np.ndarray,
    sizes_mm: np.ndarray,
    top_ks: tuple[int, ...] = PROPOSAL_TOP_KS,
    ar_top_k: int = 100,
) -> tuple[dict[str, float], dict[str, list[float]], str]:
    """Recall at IoU 0.5 for every top-k and AR@``ar_top_k``, overall and per lesion size.

    Args:
        best_iou: (G, len(top_ks)) from ``best_proposal_iou``, nan rows for lesions whose
            image had no proposals given (left out).
        sizes_px / sizes_mm: (G,) lesion sizes; millimetres are used when none is nan.
        top_ks: the numbers of proposals of the columns of ``best_iou``.
        ar_top_k: the column of the average recall.

    Returns:
        ``(scalars, curves, unit)``: scalars named ``rpn_recall{k}``, ``rpn_ar{ar_top_k}`` and
        the same with ``_{small|medium|large}``; curves ``{"all"|size: recall per top-k}``;
        unit ``"mm"`` or ``"px"``. nan where a group has no lesion.
    """
    best_iou = np.asarray(best_iou, dtype=np.float64).reshape(-1, len(top_ks))
    given = ~np.isnan(best_iou).any(axis=1)
    use_mm = bool(sizes_mm.size) and not np.isnan(sizes_mm).any()
    unit = "mm" if use_mm else "px"
    bins = size_bin(sizes_mm if use_mm else sizes_px, SIZE_BINS_MM if use_mm else SIZE_BINS_PX)
    ar_col = top_ks.index(ar_top_k) if ar_top_k in top_ks else None
    scalars: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    groups = [("all", given)] + [(name, given & (bins == b)) for b, name in enumerate(SIZE_NAMES)]
    for name, mask in groups:
        suffix = "" if name == "all" else f"_{name}"
        ious = best_iou[mask]
        recalls = [float((ious[:, c] >= 0.5).mean()) if len(ious) else math.nan for c in range(len(top_ks))]
        curves[name] = recalls
        for k, value in zip(top_ks, recalls):
            scalars[f"rpn_recall{k}{suffix}"] = value
        if ar_col is not None:
            ar = float(np.mean([(ious[:, ar_col] >= t).mean() for t in COCO_IOU_THRESHOLDS])) if len(ious) else math.nan
            scalars[f"rpn_ar{ar_top_k}{suffix}"] = ar
    return scalars, curves, unit
